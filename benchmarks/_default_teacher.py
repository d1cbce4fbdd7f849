"""The benchmarks' teacher: the default config's (``teacher=edm``, composed by Hydra exactly as ``hkd pipeline``
does), and the shipped weights it adopts."""

from __future__ import annotations

from hkd_core.config import DataConfig, TeacherConfig
from hkd_core.shipped import ShippedTeacher, find_shipped


def default_teacher() -> tuple[DataConfig, TeacherConfig, ShippedTeacher | None]:
    from orchestrator.config import load

    run = load([]).run
    return run.data, run.teacher, find_shipped(run.data, run.teacher)

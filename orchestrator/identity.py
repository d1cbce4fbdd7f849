"""Who a run is: stage prefixes in storage, MLflow run keys, lineage tags. One function for each.

A stage's identity is its content hash (hkd_core.config.stage_hashes: its config and the hashes of what it
consumes); its output lives under ``<storage root>/<stage>-<hash>/`` and its MLflow run is found again by
the tag ``hkd.run_key``, so a restart reopens the same run. Everything that names a stage or finds a run
(the pipeline, sweeps, the study, ``hkd edit``) calls these.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

STAGES = ("teacher", "trajectories", "distill", "evaluate")
ROOT = Path(__file__).resolve().parents[1]


def stage_prefix(pc, stage: str) -> str:
    """The stage's folder under the storage root: ``<stage>-<hash>``."""
    return f"{stage}-{pc.stages()[stage]}"


def pipeline_hash(pc) -> str:
    """The whole pipeline's identity: the last stage's hash covers every config it depends on."""
    return pc.stages()["evaluate"]


def run_key(pc, stage: str) -> str:
    """The MLflow run key of a stage (``teacher`` .. ``evaluate``) or of the ``pipeline`` parent run. The storage
    root is part of it: the same config against another bucket or prefix is another run, never a reopened one
    whose artifacts would then sit in two places."""
    where = pc.storage.root_uri()
    if stage == "pipeline":
        return f"{pc.name}/pipeline-{pipeline_hash(pc)}@{where}"
    return f"{pc.name}/{stage_prefix(pc, stage)}@{where}"


def run_name(pc, stage: str) -> str:
    return f"{pc.name}-{pipeline_hash(pc)}" if stage == "pipeline" else stage_prefix(pc, stage)


def sweep_run_key(sweep_id: str, trial_id: str | None = None) -> str:
    return f"sweep/{sweep_id}" + (f"/{trial_id}" if trial_id else "")


def study_run_key(study: str) -> str:
    return f"{study}/study"


def edit_run_key(pc, ident: str) -> str:
    return f"{pc.name}/edit-{ident}"


_CHECKOUT_SHA: str | None = None


def git_sha() -> str:
    """The commit of the code that runs: $HKD_GIT_SHA where it is given (an image's build argument, a job's
    env_vars: ``ray job submit`` uploads no .git), else git in the checkout as this process first found it (the
    CLI asks at its start: a run that lasts hours records the commit it started with, not the one the checkout
    has moved to since), else "unknown"."""
    global _CHECKOUT_SHA
    given = os.environ.get("HKD_GIT_SHA", "").strip()
    if given:
        return given
    if _CHECKOUT_SHA is None:
        try:
            sha = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            sha = ""
        _CHECKOUT_SHA = sha if re.fullmatch(r"[0-9a-f]{40}", sha) else "unknown"
    return _CHECKOUT_SHA


def lineage(pc) -> dict[str, str]:
    """Tags every run of a pipeline carries; the commit also as MLflow's own ``mlflow.source.git.commit`` (the
    UI shows it), when it is known."""
    sha = git_sha()
    tags = {
        "hkd.config_hash": pipeline_hash(pc),
        "hkd.git_sha": sha,
        "hkd.data": pc.run.data.name,
        "hkd.variant": pc.run.model.variant,
        "hkd.storage_root": pc.storage.root_uri(),
    }
    if sha != "unknown":
        tags["mlflow.source.git.commit"] = sha
    return tags

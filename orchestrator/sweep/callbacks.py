"""Tune callbacks of the sweep driver. Kept apart from ``run.py`` and ``closing.py`` because they subclass ``ray.tune.Callback``,
and that module must import without Ray (Ray reads its loopback setting at its first import)."""
from __future__ import annotations

from ray import tune

from orchestrator.sweep.closing import StoppedTrialCloser


class StoppedTrialCloserCallback(StoppedTrialCloser, tune.Callback):
    """Ends a trial's MLflow run the moment Tune stops it early (see ``closing.StoppedTrialCloser``)."""

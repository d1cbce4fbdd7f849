"""Tune callbacks of the sweep driver. Kept apart from ``sweep.py`` because they subclass ``ray.tune.Callback``,
and that module must import without Ray (Ray reads its loopback setting at its first import)."""
from __future__ import annotations

from ray import tune

from .sweep import StoppedTrialCloser


class StoppedTrialCloserCallback(StoppedTrialCloser, tune.Callback):
    """Ends a trial's MLflow run the moment Tune stops it early (see ``sweep.StoppedTrialCloser``)."""

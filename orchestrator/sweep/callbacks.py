"""Tune callbacks of the sweep driver. Kept apart from ``run.py`` and ``closing.py`` because they subclass
``ray.tune.Callback``,
and that module must import without Ray (Ray reads its loopback setting at its first import)."""

from __future__ import annotations

import logging

from ray import tune

from orchestrator.sweep.closing import StoppedTrialCloser

log = logging.getLogger(__name__)


class StoppedTrialCloserCallback(StoppedTrialCloser, tune.Callback):
    """Ends a trial's MLflow run the moment Tune stops it early (see ``closing.StoppedTrialCloser``)."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        """Tune's hook, called as a trial ends (completed, or stopped by the scheduler) before its actor goes."""
        try:
            self.close(trial.trial_id, trial.last_result or {})
        except Exception as e:  # noqa: BLE001 - the sweep goes on; close_trial_runs is the backstop
            log.warning(
                "sweep %s: could not close stopped trial %s's run now (%s); the sweep's end will",
                self.sweep_id,
                trial.trial_id,
                str(e)[:200],
            )

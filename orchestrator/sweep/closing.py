"""Closing the MLflow runs of trials that ASHA stopped: the logic of the sweep's Tune callback
(``callbacks.StoppedTrialCloserCallback``) and the sweep end's backstop, in a module that imports without Ray."""
from __future__ import annotations

from orchestrator.services.tracking import Tracker


def end_stopped_run(tracker: Tracker, run_id: str, kimg: float, when: str) -> None:
    """A trial run that ASHA stopped: KILLED, with hkd.stopped_early=true, the kimg it reached and who closed it
    (``hkd.closed_at``: "stopped", the moment Tune stopped it; "sweep end", the backstop)."""
    tracker.set_tags(run_id, {"hkd.stopped_early": "true", "hkd.end_reason": "stopped by the scheduler (ASHA)",
                              "hkd.stopped_at_kimg": f"{kimg:g}", "hkd.closed_at": when})
    tracker.end(run_id, "KILLED")


class StoppedTrialCloser:
    """The logic of a Tune callback (the ``ray.tune.Callback`` is ``callbacks.StoppedTrialCloserCallback``,
    in a module of its own so that importing this one needs no Ray) that ends a trial's
    MLflow run the moment Tune stops it early, so that a long sweep's runs table says at once which trials
    ASHA stopped (KILLED, ``hkd.stopped_early``) instead of showing them RUNNING until the sweep ends. Tune
    calls on_trial_complete for a stopped trial before it tears the trial's actor down, so the trial's own
    process then finds its run closed and leaves it. Pickled with the Tuner's run config (a resumed sweep gets
    it back): holds only the tracking config and the sweep id, and makes its client on first use."""

    def __init__(self, tracking_cfg, sweep_id: str):
        self.tracking_cfg, self.sweep_id, self._tracker = tracking_cfg, sweep_id, None

    def __getstate__(self):
        return {"tracking_cfg": self.tracking_cfg, "sweep_id": self.sweep_id, "_tracker": None}

    def close(self, trial_id: str, last_result: dict) -> str | None:
        """End the trial's run if it stopped before its final report; returns the run id it ended."""
        if not last_result or last_result.get("final"):
            return None                    # completed: the trial ends its own run FINISHED
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_cfg)
        runs = self._tracker.search(f"tags.`hkd.sweep_id` = '{self.sweep_id}' and tags.`hkd.trial_id` = "
                                    f"'{trial_id}' and tags.`hkd.stage` = 'trial'")
        open_runs = [r for r in runs if r.info.status in ("RUNNING", "FAILED")]
        for r in open_runs:
            end_stopped_run(self._tracker, r.info.run_id, float(last_result.get("kimg", 0.0)), "stopped")
        return open_runs[0].info.run_id if open_runs else None

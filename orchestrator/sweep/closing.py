"""Closing the MLflow runs of trials that ASHA stopped: the logic of the sweep's Tune callback
(``callbacks.StoppedTrialCloserCallback``) and the sweep end's backstop (``close_trial_runs``, every run Tune
left open), in a module that imports without Ray."""

from __future__ import annotations

import logging

from orchestrator.services.tracking import Tracker

log = logging.getLogger(__name__)


def end_stopped_run(tracker: Tracker, run_id: str, kimg: float, when: str) -> None:
    """A trial run that ASHA stopped: KILLED, with hkd.stopped_early=true, the kimg it reached and who closed it
    (``hkd.closed_at``: "stopped", the moment Tune stopped it; "sweep end", the backstop)."""
    tracker.set_tags(
        run_id,
        {
            "hkd.stopped_early": "true",
            "hkd.end_reason": "stopped by the scheduler (ASHA)",
            "hkd.stopped_at_kimg": f"{kimg:g}",
            "hkd.closed_at": when,
        },
    )
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
            return None  # completed: the trial ends its own run FINISHED
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_cfg)
        runs = self._tracker.search(
            f"tags.`hkd.sweep_id` = '{self.sweep_id}' and tags.`hkd.trial_id` = "
            f"'{trial_id}' and tags.`hkd.stage` = 'trial'"
        )
        open_runs = [r for r in runs if r.info.status in ("RUNNING", "FAILED")]
        for r in open_runs:
            end_stopped_run(self._tracker, r.info.run_id, float(last_result.get("kimg", 0.0)), "stopped")
        return open_runs[0].info.run_id if open_runs else None


def close_trial_runs(tracker: Tracker, sweep_id: str, summary: dict) -> dict[str, str]:
    """End every trial's MLflow child run the way Tune's record says it ended, once Tune is done. A trial ASHA
    stopped never reaches its own ``end`` (Tune stops its actor), or its process saw the stop as an error in
    ``fit`` and marked the run FAILED; one that a resumed sweep does not continue was left open by the driver
    that died. Stopped early: status KILLED with ``hkd.stopped_early=true`` and the kimg it reached; errored:
    FAILED; a run Tune no longer knows: KILLED with ``hkd.end_reason``. Returns trial -> status for the runs
    it changed."""
    rows = {r["trial_id"]: r for r in summary["rows"]}
    runs = tracker.search(f"tags.`hkd.sweep_id` = '{sweep_id}' and tags.`hkd.stage` = 'trial'")
    closed = {}
    for run in runs:
        if run.info.status not in ("RUNNING", "FAILED"):
            continue
        trial = run.data.tags.get("hkd.trial_id", "?")
        row = rows.get(trial)
        stopped = row is not None and row["status"].startswith("stopped")
        if run.info.status == "FAILED" and not stopped:
            continue  # a real failure (or one Tune's record cannot overrule): left as it is
        if stopped:
            end_stopped_run(tracker, run.info.run_id, row["kimg"], "sweep end")
            closed[trial] = "KILLED"
            continue
        elif row is not None and row["status"] == "error":
            tracker.set_tags(run.info.run_id, {"hkd.end_reason": "error"})
            status = "FAILED"
        elif row is not None and row["status"] == "completed":
            status = "FINISHED"  # finished, but the driver died before the run's own end reached MLflow
        else:
            tracker.set_tags(
                run.info.run_id,
                {"hkd.stopped_early": "true", "hkd.end_reason": "not continued by the sweep (--resume)"},
            )
            status = "KILLED"
        tracker.end(run.info.run_id, status)
        closed[trial] = status
    if closed:
        log.info(
            "sweep %s: closed %d trial runs (%s)",
            sweep_id,
            len(closed),
            ", ".join(f"{t} {s}" for t, s in sorted(closed.items())),
        )
    return closed

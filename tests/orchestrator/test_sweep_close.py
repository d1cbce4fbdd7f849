"""A sweep ends every trial's MLflow child run that Tune left open (ASHA-stopped, errored, not continued after
--resume), saying how it ended. Against a real MLflow store (tracking=file: SQLite, no server)."""

from orchestrator.services.tracking import Tracker, TrackingConfig
from orchestrator.sweep.closing import close_trial_runs


def test_trial_runs_left_running_are_ended_with_how_they_ended(tmp_path):
    tracker = Tracker(TrackingConfig(kind="file", root=str(tmp_path), experiment="sweep-close"))
    ids = {}
    for trial in ("t_done", "t_asha", "t_err", "t_gone", "t_closed", "t_asha_raised", "t_failed"):
        ids[trial] = tracker.open_run(
            f"sweep/s1/{trial}",
            trial,
            None,
            {"hkd.sweep_id": "s1", "hkd.stage": "trial", "hkd.trial_id": trial},
        )
    other = tracker.open_run(
        "sweep/s2/t_asha",
        "other",
        None,
        {"hkd.sweep_id": "s2", "hkd.stage": "trial", "hkd.trial_id": "t_asha"},
    )
    tracker.end(ids["t_closed"])  # ended by the trial itself: left alone
    tracker.end(ids["t_asha_raised"], "FAILED")  # fit() raised as Tune tore the stopped trial down
    tracker.end(ids["t_failed"], "FAILED")  # a real failure
    summary = {
        "rows": [
            {"trial_id": "t_done", "status": "completed", "kimg": 0.256},
            {"trial_id": "t_asha", "status": "stopped early (ASHA)", "kimg": 0.128},
            {"trial_id": "t_err", "status": "error", "kimg": 0.064},
            {"trial_id": "t_closed", "status": "completed", "kimg": 0.256},
            {"trial_id": "t_asha_raised", "status": "stopped early (ASHA)", "kimg": 0.192},
            {"trial_id": "t_failed", "status": "error", "kimg": 0.064},
        ]
    }
    closed = close_trial_runs(tracker, "s1", summary)
    assert closed == {
        "t_done": "FINISHED",
        "t_asha": "KILLED",
        "t_err": "FAILED",
        "t_gone": "KILLED",
        "t_asha_raised": "KILLED",
    }
    run = {t: tracker.run_data(i) for t, i in ids.items()}
    assert {t: r.info.status for t, r in run.items()} == {
        "t_done": "FINISHED",
        "t_asha": "KILLED",
        "t_err": "FAILED",
        "t_gone": "KILLED",
        "t_closed": "FINISHED",
        "t_asha_raised": "KILLED",
        "t_failed": "FAILED",
    }
    assert run["t_asha_raised"].data.tags["hkd.stopped_at_kimg"] == "0.192"
    assert run["t_asha"].data.tags["hkd.stopped_early"] == "true"
    assert run["t_asha"].data.tags["hkd.stopped_at_kimg"] == "0.128"
    assert run["t_gone"].data.tags["hkd.end_reason"] == "not continued by the sweep (--resume)"
    assert "hkd.stopped_early" not in run["t_done"].data.tags
    assert tracker.run_data(other).info.status == "RUNNING"  # another sweep's trial is not touched
    assert close_trial_runs(tracker, "s1", summary) == {}  # nothing left to close


def test_a_stopped_trial_run_is_closed_the_moment_tune_stops_it(tmp_path):
    """The driver's Tune callback: a trial stopped before its final report (ASHA) ends KILLED at once, with the
    kimg it reached and hkd.closed_at=stopped; a completed trial (final report) is left to its own process; a
    pickled and restored callback (what a resumed sweep gets back from Tune's state) still works; the sweep-end
    backstop then has nothing left to close."""
    import pickle

    from orchestrator.sweep.closing import StoppedTrialCloser

    cfg = TrackingConfig(kind="file", root=str(tmp_path), experiment="sweep-close")
    tracker = Tracker(cfg)
    ids = {
        t: tracker.open_run(
            f"sweep/s1/{t}", t, None, {"hkd.sweep_id": "s1", "hkd.stage": "trial", "hkd.trial_id": t}
        )
        for t in ("t_asha", "t_done", "t_late")
    }
    closer = StoppedTrialCloser(cfg, "s1")
    assert closer.close("t_asha", {"kimg": 0.128, "eval/mse_vs_teacher": 0.3}) == ids["t_asha"]
    assert closer.close("t_done", {"kimg": 0.256, "final": 1.0}) is None
    restored = pickle.loads(pickle.dumps(closer))
    assert restored._tracker is None and restored.sweep_id == "s1"
    assert restored.close("t_late", {"kimg": 0.192}) == ids["t_late"]
    run = {t: tracker.run_data(i) for t, i in ids.items()}
    assert {t: r.info.status for t, r in run.items()} == {
        "t_asha": "KILLED",
        "t_done": "RUNNING",
        "t_late": "KILLED",
    }
    assert run["t_asha"].data.tags["hkd.stopped_at_kimg"] == "0.128"
    assert run["t_asha"].data.tags["hkd.closed_at"] == "stopped"
    assert run["t_late"].data.tags["hkd.stopped_early"] == "true"
    assert closer.close("t_asha", {"kimg": 0.128}) is None  # already closed: nothing to do
    summary = {
        "rows": [
            {"trial_id": "t_asha", "status": "stopped early (ASHA)", "kimg": 0.128},
            {"trial_id": "t_late", "status": "stopped early (ASHA)", "kimg": 0.192},
            {"trial_id": "t_done", "status": "completed", "kimg": 0.256},
        ]
    }
    assert close_trial_runs(tracker, "s1", summary) == {"t_done": "FINISHED"}


def test_the_tune_callback_closes_a_stopped_trial_through_tunes_hook_and_pickles(tmp_path):
    """Tune calls ``on_trial_complete(iteration, trials, trial)`` on its callbacks as a trial ends: the callback's
    own hook (not tune.Callback's no-op) ends a stopped trial's run KILLED there and then, leaves a completed one,
    and a failure to reach MLflow is a warning, not the sweep's end."""
    import pickle
    from types import SimpleNamespace

    from ray import tune

    from orchestrator.sweep.callbacks import StoppedTrialCloserCallback

    assert StoppedTrialCloserCallback.on_trial_complete is not tune.Callback.on_trial_complete
    cfg = TrackingConfig(kind="file", root=str(tmp_path), experiment="sweep-close")
    tracker = Tracker(cfg)
    ids = {
        t: tracker.open_run(
            f"sweep/s1/{t}", t, None, {"hkd.sweep_id": "s1", "hkd.stage": "trial", "hkd.trial_id": t}
        )
        for t in ("t_asha", "t_done")
    }
    cb = StoppedTrialCloserCallback(cfg, "s1")
    trials = [
        SimpleNamespace(trial_id="t_asha", last_result={"kimg": 0.128, "eval/mse_vs_teacher": 0.3}),
        SimpleNamespace(trial_id="t_done", last_result={"kimg": 0.256, "final": 1.0}),
    ]
    for t in trials:
        cb.on_trial_complete(3, trials, t)
    assert tracker.run_data(ids["t_asha"]).info.status == "KILLED"
    assert tracker.run_data(ids["t_asha"]).data.tags["hkd.closed_at"] == "stopped"
    assert tracker.run_data(ids["t_done"]).info.status == "RUNNING"
    unreachable = StoppedTrialCloserCallback(
        TrackingConfig(kind="file", root="/proc/nonexistent", experiment="x"), "s1"
    )
    unreachable.on_trial_complete(3, trials, trials[0])  # logged, not raised

    cb = StoppedTrialCloserCallback(TrackingConfig(kind="file", root="/nonexistent", experiment="x"), "s1")
    assert isinstance(cb, tune.Callback)
    back = pickle.loads(pickle.dumps(cb))
    assert type(back) is StoppedTrialCloserCallback and back.sweep_id == "s1" and back._tracker is None

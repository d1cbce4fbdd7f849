"""A sweep ends every trial's MLflow child run that Tune left open (ASHA-stopped, errored, not continued after
--resume), saying how it ended. Against a real MLflow store (tracking=file: SQLite, no server)."""
from orchestrator.sweep import close_trial_runs
from orchestrator.tracking import Tracker, TrackingConfig


def test_trial_runs_left_running_are_ended_with_how_they_ended(tmp_path):
    tracker = Tracker(TrackingConfig(kind="file", root=str(tmp_path), experiment="sweep-close"))
    ids = {}
    for trial in ("t_done", "t_asha", "t_err", "t_gone", "t_closed", "t_asha_raised", "t_failed"):
        ids[trial] = tracker.open_run(f"sweep/s1/{trial}", trial, None,
                                      {"hkd.sweep_id": "s1", "hkd.stage": "trial", "hkd.trial_id": trial})
    other = tracker.open_run("sweep/s2/t_asha", "other", None,
                             {"hkd.sweep_id": "s2", "hkd.stage": "trial", "hkd.trial_id": "t_asha"})
    tracker.end(ids["t_closed"])                               # ended by the trial itself: left alone
    tracker.end(ids["t_asha_raised"], "FAILED")     # fit() raised as Tune tore the stopped trial down
    tracker.end(ids["t_failed"], "FAILED")          # a real failure
    summary = {"rows": [{"trial_id": "t_done", "status": "completed", "kimg": 0.256},
                        {"trial_id": "t_asha", "status": "stopped early (ASHA)", "kimg": 0.128},
                        {"trial_id": "t_err", "status": "error", "kimg": 0.064},
                        {"trial_id": "t_closed", "status": "completed", "kimg": 0.256},
                        {"trial_id": "t_asha_raised", "status": "stopped early (ASHA)", "kimg": 0.192},
                        {"trial_id": "t_failed", "status": "error", "kimg": 0.064}]}
    closed = close_trial_runs(tracker, "s1", summary)
    assert closed == {"t_done": "FINISHED", "t_asha": "KILLED", "t_err": "FAILED", "t_gone": "KILLED",
                      "t_asha_raised": "KILLED"}
    run = {t: tracker.run_data(i) for t, i in ids.items()}
    assert {t: r.info.status for t, r in run.items()} == {"t_done": "FINISHED", "t_asha": "KILLED", "t_err": "FAILED",
                                                         "t_gone": "KILLED", "t_closed": "FINISHED",
                                                         "t_asha_raised": "KILLED", "t_failed": "FAILED"}
    assert run["t_asha_raised"].data.tags["hkd.stopped_at_kimg"] == "0.192"
    assert run["t_asha"].data.tags["hkd.stopped_early"] == "true"
    assert run["t_asha"].data.tags["hkd.stopped_at_kimg"] == "0.128"
    assert run["t_gone"].data.tags["hkd.end_reason"] == "not continued by the sweep (--resume)"
    assert "hkd.stopped_early" not in run["t_done"].data.tags
    assert tracker.run_data(other).info.status == "RUNNING"   # another sweep's trial is not touched
    assert close_trial_runs(tracker, "s1", summary) == {}      # nothing left to close

"""Resuming a sweep whose driver died between Optuna closing a trial and Tune saving that it had."""

import pytest


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_report_for_a_trial_optuna_already_closed_is_dropped_not_fatal():
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.sweep.search import ResumableOptunaSearch

    def searcher(cls):
        s = cls(space=lambda t: {"x": t.suggest_float("x", 0.0, 1.0)}, metric="m", mode="min", seed=0)
        assert s.suggest("t1") is not None
        s._ot_study.tell(s._ot_trials["t1"], 0.5)  # Optuna's database has it closed; Tune's state does not
        return s

    with pytest.raises(UpdateFinishedTrialError):  # what the stock searcher does on the resumed report
        searcher(OptunaSearch).on_trial_result("t1", {"m": 0.4, "training_iteration": 1})
    s = searcher(ResumableOptunaSearch)
    s.on_trial_result("t1", {"m": 0.4, "training_iteration": 1})
    s.on_trial_complete("t1", {"m": 0.4, "training_iteration": 1})
    (trial,) = s._ot_study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.5  # the closed value stands
    assert s.suggest("t2") is not None  # and the study goes on


def _space(trial):  # module level: Tune pickles the searcher with its space (as DefineByRun in sweep/spec.py)
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_trial_tune_never_recorded_is_marked_failed_on_restore(tmp_path):
    """The driver dies after Optuna handed out t2 and before Tune's next snapshot: the snapshot (save) knows t1
    only. Restored from it, the searcher marks the orphan FAIL (it would stay RUNNING for ever) and keeps t1 open
    for the report that Tune's re-run of t1 will make."""
    import optuna

    from orchestrator.sweep.search import ResumableOptunaSearch

    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = optuna.storages.RDBStorage(url)

    def make():
        return ResumableOptunaSearch(
            space=_space, metric="m", mode="min", seed=0, study_name="s", storage=storage
        )

    s = make()
    assert s.suggest("t1") is not None
    s.save(str(tmp_path / "snap.pkl"))  # Tune's last snapshot
    assert s.suggest("t2") is not None  # handed out, never snapshotted: the driver dies here
    back = make()
    back.restore(str(tmp_path / "snap.pkl"))
    states = {t.number: t.state for t in optuna.load_study(study_name="s", storage=url).trials}
    assert states == {0: optuna.trial.TrialState.RUNNING, 1: optuna.trial.TrialState.FAIL}
    back.on_trial_complete("t1", {"m": 0.3, "training_iteration": 1})  # the re-run of t1 reports into trial 0
    assert optuna.load_study(study_name="s", storage=url).trials[0].value == 0.3

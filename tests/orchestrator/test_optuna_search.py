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
        s._ot_study.tell(s._ot_trials["t1"], 0.5)     # Optuna's database has it closed; Tune's state does not
        return s

    with pytest.raises(UpdateFinishedTrialError):      # what the stock searcher does on the resumed report
        searcher(OptunaSearch).on_trial_result("t1", {"m": 0.4, "training_iteration": 1})
    s = searcher(ResumableOptunaSearch)
    s.on_trial_result("t1", {"m": 0.4, "training_iteration": 1})
    s.on_trial_complete("t1", {"m": 0.4, "training_iteration": 1})
    (trial,) = s._ot_study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.5    # the closed value stands
    assert s.suggest("t2") is not None                                                 # and the study goes on

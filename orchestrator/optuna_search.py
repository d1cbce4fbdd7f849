"""Ray Tune's OptunaSearch, made safe to resume after the sweep's driver died.

Optuna's study lives in a database written at once (SQLite here); Tune's experiment state goes to S3
every few seconds, and not at all while the store is down. A driver killed in between leaves Tune
thinking a trial still runs that Optuna has already closed (completed or pruned). On ``--resume`` Tune
runs that trial again, ``trial_fn`` finds its final result in S3 and reports it at once, and the stock
searcher then raises ``UpdateFinishedTrialError`` on the intermediate report, failing the whole resumed
sweep. Here such a report is dropped with a note: the value Optuna holds for the trial stands.

Its own module (importing Ray at the top) so that Tune can pickle the searcher by reference into its
experiment state, which ``Tuner.restore`` reads back.
"""
from __future__ import annotations

import logging

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            log.info("trial %s already finished in the Optuna study (before the driver went down); its value "
                     "there stands, this report is not sent again", trial_id)

"""Ray Tune's OptunaSearch, made safe to resume after the sweep's driver died.

Optuna's study lives in a database written at once (SQLite here); Tune's experiment state goes to S3
every few seconds, and not at all while the store is down. A driver killed in between leaves Tune
thinking a trial still runs that Optuna has already closed (completed or pruned). On ``--resume`` Tune
runs that trial again, ``trial_fn`` finds its final result in S3 and reports it at once, and the stock
searcher then raises ``UpdateFinishedTrialError`` on the intermediate report, failing the whole resumed
sweep. Here such a report is dropped with a note: the value Optuna holds for the trial stands.

Its own module (importing Ray at the top) so that Tune can pickle the searcher by reference into its
experiment state, which ``Tuner.restore`` reads back.

On a cluster the study's SQLite file would sit on the head pod's ephemeral disk, and a ``--resume`` after a
head restart would find no study. So with S3 storage and no ``study_storage`` URL, the file is kept in the
bucket between trials (``StudyMirror``): pulled before the sweep starts or resumes when this machine has no copy,
pushed after every completed trial and at the end (a consistent snapshot through SQLite's backup API). A head
lost mid-sweep costs at most the study's record of the trials since the last completed one, which Tune's own
state (in S3 too) re-runs. A server database (``study_storage: postgresql://...``) needs no mirror.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from pathlib import Path

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class StudyMirror:
    """The study's SQLite file (``local``) and its copy at ``key`` in the sweep's store (plain data: it is
    pickled with the searcher into Tune's state)."""

    def __init__(self, storage_cfg, key: str, local: str | os.PathLike):
        self.storage_cfg, self.key, self.local = storage_cfg, key, str(local)

    def _store(self):
        from orchestrator.services.storage import make_store

        return make_store(self.storage_cfg)

    @property
    def uri(self) -> str:
        return self._store().uri(self.key)

    def pull(self) -> bool:
        """This machine has no copy: fetch the bucket's (whole, then renamed into place). True if fetched."""
        local = Path(self.local)
        if local.is_file():
            return False
        store = self._store()
        if not store.exists(self.key):
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}.{os.getpid()}.part")
        store.get_file(self.key, tmp)
        os.replace(tmp, local)
        log.info("optuna study fetched from %s", store.uri(self.key))
        return True

    def push(self) -> None:
        """A consistent snapshot of the study (SQLite's backup API, not a copy of a file being written) to the
        bucket; one PUT, so the bucket holds the old copy or the new one, never a part."""
        if not Path(self.local).is_file():
            return
        with tempfile.TemporaryDirectory() as d:
            snap = Path(d) / "optuna.db"
            src, dst = sqlite3.connect(self.local), sqlite3.connect(snap)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
            self._store().put_file(self.key, snap)


class ResumableOptunaSearch(OptunaSearch):
    def __init__(self, *args, mirror: StudyMirror | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mirror = mirror

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.fail_orphans()

    def fail_orphans(self) -> list[int]:
        """After a restore: the study's RUNNING trials that Tune's restored state does not know (Optuna handed them
        to a driver that died before Tune's next snapshot) will never get a report; Tune asks anew for the trials it
        re-runs. They are marked FAIL, so the study holds no trial running for ever. Returns their numbers."""
        import optuna

        known = {getattr(t, "_trial_id", None) for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        orphans = [t.number for t in running if t._trial_id not in known]
        for number in orphans:
            self._ot_study.tell(number, state=optuna.trial.TrialState.FAIL)
            log.warning(
                "optuna trial %d was running when the sweep's driver stopped and Tune never recorded it: "
                "marked FAIL (Tune runs the trials it knew again)",
                number,
            )
        return orphans

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result, error)
        self.push_study()

    def push_study(self) -> None:
        mirror = getattr(self, "mirror", None)
        if mirror is None:
            return
        try:
            mirror.push()
        except Exception as e:  # the bucket down for a while: the next completed trial pushes again
            log.warning(
                "optuna study not copied to %s this time (%s); the next completed trial tries again",
                mirror.key,
                e,
            )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            log.info(
                "trial %s already finished in the Optuna study (before the driver went down); its value "
                "there stands, this report is not sent again",
                trial_id,
            )

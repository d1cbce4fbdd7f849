"""The Optuna study of a sweep outlives the head's disk: with no study_storage URL and S3 storage, its SQLite
file is copied to the sweep's store after every completed trial and fetched back by a machine that has none.
On a real Optuna study and the fs store (the same interface as S3Store), no services."""

import os

import optuna
import pytest

from orchestrator.services.storage import StorageConfig, make_store

# orchestrator.sweep.search imports Ray, which reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when first imported:
# imported at collection time it would make every later 127.0.0.1 Ray address the machine's own (the integration
# tests' stack head then unreachable), so each test imports it itself


@pytest.fixture
def mirror(tmp_path):
    from orchestrator.sweep.search import StudyMirror

    cfg = StorageConfig(kind="fs", root=str(tmp_path / "bucket"))
    return StudyMirror(cfg, "sweeps/s1/optuna.db", tmp_path / "head" / "s1.db"), make_store(cfg)


def test_each_completed_trial_reaches_the_bucket_and_a_new_head_gets_the_study_back(mirror, tmp_path):
    from orchestrator.sweep.search import ResumableOptunaSearch

    m, store = mirror
    (tmp_path / "head").mkdir()
    url = f"sqlite:///{m.local}"
    search = ResumableOptunaSearch(
        space={"x": optuna.distributions.FloatDistribution(0, 1)},
        metric="loss",
        mode="min",
        study_name="s1",
        storage=optuna.storages.RDBStorage(url),
        mirror=m,
    )
    assert not store.exists(m.key)
    for i, loss in enumerate((0.5, 0.25)):
        search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", {"loss": loss})
        assert store.exists(m.key)  # pushed at once, not only at the end
    os.remove(m.local)  # the head pod restarted: its disk is gone
    assert m.pull() is True
    study = optuna.load_study(study_name="s1", storage=url)
    assert [t.value for t in study.trials] == [0.5, 0.25] and study.best_value == 0.25
    assert m.pull() is False  # a machine with its own copy keeps it


def test_a_push_that_fails_does_not_stop_the_sweep(mirror, tmp_path, caplog):
    from orchestrator.sweep.search import ResumableOptunaSearch, StudyMirror

    m, _ = mirror
    (tmp_path / "head").mkdir()
    url = f"sqlite:///{m.local}"
    broken = StudyMirror(StorageConfig(kind="fs", root="/proc/no-such-dir"), m.key, m.local)
    search = ResumableOptunaSearch(
        space={"x": optuna.distributions.FloatDistribution(0, 1)},
        metric="loss",
        mode="min",
        study_name="s2",
        storage=optuna.storages.RDBStorage(url),
        mirror=broken,
    )
    search.suggest("t0")
    search.on_trial_complete("t0", {"loss": 1.0})
    assert "optuna study not copied to sweeps/s1/optuna.db" in caplog.text
    assert optuna.load_study(study_name="s2", storage=url).trials[0].value == 1.0

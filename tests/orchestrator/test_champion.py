"""The registry alias `champion` (issue 25): the best version by FID at the same N, moved only by a better one,
never across different N; and the evaluate stage's metrics on the logged model (MLflow 3's model_id). Against a
real MLflow store (SQLite in a temporary folder, no server)."""

from __future__ import annotations

import os

import pytest

from orchestrator.services.registry import crown, sweep_candidate
from orchestrator.services.tracking import Tracker, TrackingConfig


@pytest.fixture
def tracker(tmp_path):
    return Tracker(TrackingConfig(kind="file", root=str(tmp_path), experiment="champ", retry_deadline_s=5))


def _version(tracker, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.create_registered_model(name)
    except MlflowException:
        pass
    return tracker.client.create_model_version(name, source="file:///nonexistent/model").version


def test_the_alias_moves_only_to_a_better_fid_at_the_same_n(tracker):
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    v1, v2, v3, v4 = (_version(tracker, "m") for _ in range(4))
    first = crown(tracker, f"m/{v1}", {"eval/fid": 70.0, "eval/kid": 0.04}, 1000, run)
    assert first["moved"] and first["holder"] is None
    worse = crown(tracker, f"m/{v2}", {"eval/fid": 75.0}, 1000, run)
    assert not worse["moved"] and "FID 70" in worse["why"]
    other_n = crown(tracker, f"m/{v3}", {"eval/fid": 20.0}, 10000, run)  # a lower FID, but at another N
    assert not other_n["moved"] and "not comparable" in other_n["why"]
    better = crown(tracker, f"m/{v4}", {"eval/fid": 60.0}, 1000, run)
    assert better["moved"] and better["holder"] == str(v1)
    again = crown(tracker, f"m/{v4}", {"eval/fid": 60.0}, 1000, run)  # the holder itself, scored again
    assert not again["moved"] and again["why"] == "already the champion"
    holder = tracker.client.get_model_version_by_alias("m", "champion")
    assert (
        str(holder.version) == str(v4) and holder.tags["eval.fid"] == "60" and holder.tags["eval.n"] == "1000"
    )
    assert tracker.client.get_model_version("m", v2).tags["eval.fid"] == "75"  # every version keeps its score


def test_metrics_logged_with_a_model_id_appear_on_the_logged_model(tracker):
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    # through the client: the fluent API's global tracking URI would leak into the tests that run after this one
    model = tracker.client.create_logged_model(
        experiment_id=tracker.experiment_id, name="hkd", source_run_id=run
    )
    tracker.log_metrics(run, {"eval/fid": 66.35, "eval/kid": 0.0375}, 35000, model_id=model.model_id)
    tracker.flush()
    got = {m.key: m.value for m in tracker.client.get_logged_model(model.model_id).metrics}
    assert got == {"eval/fid": 66.35, "eval/kid": 0.0375}
    assert tracker.client.get_run(run).data.metrics["eval/fid"] == 66.35  # and still on the run


def _summary(sweep_id: str, fids: dict) -> dict:
    rows = [
        {"trial_id": t, "status": s, "kimg": 0.256, "metric": 0.1, "fid": f, "kid": 0.05, "eval_n": 64}
        for t, (s, f) in fids.items()
    ]
    return {"sweep_id": sweep_id, "rows": rows}


def test_the_sweep_candidate_is_the_completed_trial_with_the_lowest_fid():
    s = _summary(
        "sw",
        {
            "a": ("completed", 80.0),
            "b": ("stopped early (ASHA)", 10.0),
            "c": ("completed", 70.0),
            "d": ("completed", float("nan")),
            "e": ("error", None),
        },
    )
    assert sweep_candidate(s)["trial_id"] == "c"  # not b (stopped), not d (no FID)
    assert sweep_candidate(_summary("sw", {"b": ("stopped early (ASHA)", 10.0)})) is None


def test_a_sweep_registers_its_best_trial_and_moves_the_alias_only_when_better(tracker, monkeypatch):
    """Two sweeps end one after another: each registers its best trial by FID as a new version, logged in that
    trial's run with its scores on the logged model; the alias moves to the second only if its FID is lower."""
    import torch

    from orchestrator.services.registry import register_sweep_best

    def sweep(sweep_id: str, fids: dict) -> dict:
        for t in fids:
            run = tracker.client.create_run(
                tracker.experiment_id,
                tags={
                    "hkd.sweep_id": sweep_id,
                    "hkd.trial_id": t,
                    "hkd.stage": "trial",
                    "hkd.model_uri": f"mem://{sweep_id}/{t}/model.pt",
                },
            ).info.run_id
            tracker.client.set_terminated(run, end_time=1_000_000)
        loaded = []
        got = register_sweep_best(
            tracker, _summary(sweep_id, fids), "swm", lambda uri: loaded.append(uri) or torch.nn.Linear(2, 2)
        )
        assert loaded == [f"mem://{sweep_id}/{got['trial_id']}/model.pt"]  # only the best trial's model
        return got

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # what a stack's clients read
    before = mlflow.get_tracking_uri()
    first = sweep("s1", {"a": ("completed", 80.0), "b": ("completed", 60.0)})
    # logging the model pointed MLflow's fluent API (and the environment) at this store only for the call
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1" and mlflow.get_tracking_uri() == before
    assert first["moved"] and first["trial_id"] == "b" and first["version"] == "1"
    run = tracker.client.get_run(first["run_id"])
    assert run.data.tags["hkd.trial_id"] == "b" and run.info.status == "FINISHED"
    assert run.info.end_time == 1_000_000  # logging the model did not move when the trial ended
    model_id = run.data.tags["hkd.model_id"]
    tracker.flush()
    assert {m.key: m.value for m in tracker.client.get_logged_model(model_id).metrics}["eval/fid"] == 60.0
    worse = sweep("s2", {"c": ("completed", 65.0)})
    assert not worse["moved"] and worse["version"] == "2"
    better = sweep("s3", {"d": ("completed", 55.0), "e": ("stopped early (ASHA)", 1.0)})
    assert better["moved"] and better["trial_id"] == "d"
    holder = tracker.client.get_model_version_by_alias("swm", "champion")
    assert (
        str(holder.version) == better["version"]
        and holder.tags["eval.fid"] == "55"
        and holder.tags["eval.n"] == "64"
    )
    assert register_sweep_best(tracker, _summary("s4", {"x": ("error", None)}), "swm", None) is None
    assert register_sweep_best(tracker, _summary("s5", {"y": ("completed", 1.0)}), None, None) is None

"""The registry alias `champion` (issue 25): the best version by FID at the same N, moved only by a better one,
never across different N; and the evaluate stage's metrics on the logged model (MLflow 3's model_id). Against a
real MLflow store (SQLite in a temporary folder, no server)."""
from __future__ import annotations

import pytest

from orchestrator.tracking import Tracker, TrackingConfig


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
    first = tracker.crown(f"m/{v1}", {"eval/fid": 70.0, "eval/kid": 0.04}, 1000, run)
    assert first["moved"] and first["holder"] is None
    worse = tracker.crown(f"m/{v2}", {"eval/fid": 75.0}, 1000, run)
    assert not worse["moved"] and "FID 70" in worse["why"]
    other_n = tracker.crown(f"m/{v3}", {"eval/fid": 20.0}, 10000, run)      # a lower FID, but at another N
    assert not other_n["moved"] and "not comparable" in other_n["why"]
    better = tracker.crown(f"m/{v4}", {"eval/fid": 60.0}, 1000, run)
    assert better["moved"] and better["holder"] == v1
    holder = tracker.client.get_model_version_by_alias("m", "champion")
    assert holder.version == v4 and holder.tags["eval.fid"] == "60" and holder.tags["eval.n"] == "1000"
    assert tracker.client.get_model_version("m", v2).tags["eval.fid"] == "75"    # every version keeps its score


def test_metrics_logged_with_a_model_id_appear_on_the_logged_model(tracker):
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    # through the client: the fluent API's global tracking URI would leak into the tests that run after this one
    model = tracker.client.create_logged_model(experiment_id=tracker.experiment_id, name="hkd", source_run_id=run)
    tracker.log_metrics(run, {"eval/fid": 66.35, "eval/kid": 0.0375}, 35000, model_id=model.model_id)
    tracker.flush()
    got = {m.key: m.value for m in tracker.client.get_logged_model(model.model_id).metrics}
    assert got == {"eval/fid": 66.35, "eval/kid": 0.0375}
    assert tracker.client.get_run(run).data.metrics["eval/fid"] == 66.35     # and still on the run

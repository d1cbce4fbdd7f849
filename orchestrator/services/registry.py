"""The Model Registry (issue 25): a distilled model logged as an MLflow model and registered, and the alias
``champion`` on the best version by FID at the same N.

Both a pipeline (its distill stage logs the model, its evaluate stage crowns it) and a sweep (its best trial by
FID, once the sweep ends) go through here, so the alias means the same whichever produced the version:
the lowest FID among the versions scored at the same N.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import hkd_core
from hkd_core import metric_names as M
from orchestrator.services.tracking import Tracker

log = logging.getLogger(__name__)
CHAMPION = "champion"  # the registry alias on the best version by FID at the same N


@contextlib.contextmanager
def tracking_uri(uri: str):
    """MLflow's fluent API pointed at ``uri`` for the block, then put back as it was. ``mlflow.set_tracking_uri``
    also writes MLFLOW_TRACKING_URI into the environment (for subprocesses), so a library call that left it set
    would redirect every later client in the process that reads the environment (a test against another
    server, a second stack)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def log_model(tracker: Tracker, run_id: str, model, name: str | None) -> tuple[str | None, str | None]:
    """The model as an MLflow pytorch model in run ``run_id``, registered as ``name`` (not registered when
    None). Returns the registered ``name/version`` (or None) and the logged model's id (MLflow 3), which metrics
    are logged against so that the model's own page shows them."""
    import mlflow
    import mlflow.pytorch

    with (
        tracking_uri(tracker.uri),
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(run_id=run_id, nested=True),
    ):
        # the model's classes travel with it (code_paths): models:/NAME/N loads where hkd_core is not installed;
        # the package's sources only, not its shipped teacher weights
        code = Path(tmp) / "hkd_core"
        shutil.copytree(
            Path(hkd_core.__file__).parent,
            code,
            ignore=shutil.ignore_patterns("__pycache__", "shipped", "*.pt", "*.png"),
        )
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            registered_model_name=name,
            serialization_format="pickle",
            pip_requirements=["torch"],
            code_paths=[str(code)],
            await_registration_for=60,
        )
    return (f"{name}/{info.registered_model_version}" if name else None), getattr(info, "model_id", None)


def crown(
    tracker: Tracker, registered: str, metrics: dict, n: int, run_id: str, alias: str = CHAMPION
) -> dict:
    """The alias on the best version of a registered model, by FID at the same N: the newly evaluated version
    (``registered``: "name/version") records its scores as version tags (eval.fid, eval.kid, eval.n,
    eval.run_id) and takes the alias when no version holds it, or when the holder was scored at the same N and
    has a higher FID. A holder scored at another N is not comparable: the alias stays (the result says so).
    Returns what happened."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    name, version = registered.rsplit("/", 1)
    fid = metrics.get(M.FID)
    out = {"alias": alias, "model": name, "version": version, "fid": fid, "n": n}
    if fid is None:
        return {**out, "moved": False, "why": "no FID"}
    tags = {"eval.fid": f"{fid:.6g}", "eval.n": str(n), "eval.run_id": run_id}
    if metrics.get(M.KID) is not None:
        tags["eval.kid"] = f"{metrics[M.KID]:.6g}"
    for k, v in tags.items():
        tracker._call(lambda k=k, v=v: client.set_model_version_tag(name, version, k, v), "version tag")
    try:
        holder = tracker._call(lambda: client.get_model_version_by_alias(name, alias), "alias")
    except MlflowException:
        holder = None
    held = str(holder.version) if holder is not None else None  # an int from some stores, a str from others
    if held == str(version):
        return {**out, "moved": False, "why": "already the champion"}
    if holder is not None:
        h_fid, h_n = holder.tags.get("eval.fid"), holder.tags.get("eval.n")
        if h_n != str(n) or h_fid is None:
            return {
                **out,
                "moved": False,
                "holder": held,
                "why": f"version {held} was scored at N = {h_n}, not {n}: not comparable",
            }
        if float(h_fid) <= fid:
            return {
                **out,
                "moved": False,
                "holder": held,
                "why": f"version {held} has FID {float(h_fid):.4g} <= {fid:.4g}",
            }
    tracker._call(lambda: client.set_registered_model_alias(name, alias, version), "set alias")
    return {**out, "moved": True, "holder": held}


def sweep_candidate(summary: dict) -> dict | None:
    """The sweep's trial that competes for the alias: among the completed trials with a final FID, the lowest FID
    (the sweep's own metric may be another, e.g. the error against the teacher; the alias is by FID)."""
    rows = [
        r
        for r in summary["rows"]
        if r["status"] == "completed" and r.get("fid") is not None and r["fid"] == r["fid"]
    ]
    return min(rows, key=lambda r: r["fid"]) if rows else None


def register_sweep_best(tracker: Tracker, summary: dict, name: str | None, load_model) -> dict | None:
    """Once a sweep has ended: its best trial by FID logged as an MLflow model in that trial's run, registered as
    ``name``, its final scores logged against the model's id, and crowned (``champion`` moves when it beats the
    holder at the same N). ``load_model(uri)`` reads the trial's ``model.pt``. Returns the crown's result with
    the trial id, or None when nothing is registered (registry off, no completed trial with an FID)."""
    best = sweep_candidate(summary)
    if name is None or best is None:
        return None
    runs = tracker.search(
        f"tags.`hkd.sweep_id` = '{summary['sweep_id']}' and tags.`hkd.trial_id` = "
        f"'{best['trial_id']}' and tags.`hkd.stage` = 'trial'"
    )
    run = next((r for r in runs if r.data.tags.get("hkd.model_uri")), None)
    if run is None:
        log.warning(
            "sweep %s: trial %s has no model_uri tag; its model is not registered",
            summary["sweep_id"],
            best["trial_id"],
        )
        return None
    run_id = run.info.run_id
    registered, model_id = log_model(tracker, run_id, load_model(run.data.tags["hkd.model_uri"]), name)
    if run.info.end_time:  # logging reopened the ended trial run: it still ended when the trial did
        tracker._call(
            lambda: tracker.client.set_terminated(run_id, run.info.status, end_time=run.info.end_time),
            "restore end",
        )
    n = int(best.get("eval_n") or 0)
    scores = {
        k: v for k, v in ((M.FID, best["fid"]), (M.KID, best.get("kid")), (M.EVAL_N, n)) if v is not None
    }
    if model_id:
        tracker.log_metrics(run_id, scores, int(round(best["kimg"] * 1000)), model_id=model_id)
        tracker.set_tags(run_id, {"hkd.model_id": model_id})
    result = crown(tracker, registered, scores, n, run_id)
    return {**result, "trial_id": best["trial_id"], "run_id": run_id}

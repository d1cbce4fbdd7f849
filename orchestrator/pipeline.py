"""The one driver: stages in order under one MLflow pipeline run, skipping those already finished.

``run_stages`` is what ``hkd pipeline`` (and ``hkd teacher|trajectories|distill|evaluate``), every variant of
``hkd study`` and the shared stages of ``hkd sweep`` run. It works the same against the local stack or a
cluster (storage=s3, an MLflow server, a Ray head) and without any service (storage=fs tracking=file, Ray
started in this process).
"""
from __future__ import annotations

import logging
import os
import time

from . import identity
from .config import PipelineConfig
from .identity import STAGES
from .stages import StageContext, stage_distill, stage_evaluate, stage_teacher, stage_trajectories
from .tracking import Tracker

log = logging.getLogger(__name__)


def init_ray(pc: PipelineConfig) -> None:
    """Join cluster.address, or start a Ray in this process sized for the workers (plus one CPU for the
    driver's tasks)."""
    # keeps a local Ray on 127.0.0.1; read when ray is imported, so set before that
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from .workers import env_for_workers

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env_for_workers()}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # inside `ray job submit`: the job already carries its runtime env (working dir, env vars); passing
        # another one here would replace it
        ray.init(address=pc.cluster.address or "auto", log_to_driver=True)
    elif pc.cluster.address:
        ray.init(address=pc.cluster.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        need = pc.cluster.num_workers * pc.cluster.cpus_per_worker + 1
        ray.init(num_cpus=max(int(need), os.cpu_count() or 1), include_dashboard=False, runtime_env=runtime_env,
                 _node_ip_address="127.0.0.1")


def context(pc: PipelineConfig, cfg_dict: dict, progress: bool = True, parent: str | None = None,
            tracker: Tracker | None = None) -> StageContext:
    """The stages' shared state. Without ``parent`` the pipeline's own parent run is opened (or reopened)."""
    tracker = tracker or Tracker(pc.tracking)
    lineage = identity.lineage(pc)
    if parent is None:
        parent = tracker.open_run(identity.run_key(pc, "pipeline"), identity.run_name(pc, "pipeline"), None,
                                  {**lineage, "hkd.stage": "pipeline"})
        tracker.log_params(parent, pc.run.to_dict())
        tracker.log_dict(parent, pc.to_dict(), "config/resolved.json")
    return StageContext(pc, cfg_dict, tracker, parent, lineage, progress)


def run_stages(pc: PipelineConfig, cfg_dict: dict, upto: str = "evaluate", progress: bool = True,
               ctx: StageContext | None = None) -> dict:
    """Every stage up to ``upto`` (inclusive), each skipped if its output exists for this config.
    With ``ctx`` (a sweep's), the stages nest under its parent run, which is left open."""
    init_ray(pc)
    own = ctx is None
    ctx = ctx or context(pc, cfg_dict, progress)
    results: dict = {}
    fns = {"teacher": lambda: stage_teacher(ctx), "trajectories": lambda: stage_trajectories(ctx, results["teacher"]),
           "distill": lambda: stage_distill(ctx, results["trajectories"]),
           "evaluate": lambda: stage_evaluate(ctx, results["teacher"], results["distill"])}
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        for stage in STAGES[: STAGES.index(upto) + 1]:
            done = ctx.done(stage)
            if done is not None:
                log.info("%s: done for this config (%s), skipped", stage, ctx.store(stage).uri(""))
                results[stage] = done
                results.setdefault("_skipped", []).append(stage)
                continue
            log.info("%s: running (output %s)", stage, ctx.store(stage).uri(""))
            ts = time.perf_counter()
            results[stage] = fns[stage]()
            log.info("%s: finished in %.1f s", stage, time.perf_counter() - ts)
        status = "FINISHED"
    finally:
        if own:
            _close_pipeline_run(ctx, results, time.perf_counter() - t0, status)
    results.update({"_parent_run_id": ctx.parent_run_id, "_experiment_id": ctx.tracker.experiment_id,
                    "_tracking_uri": ctx.tracker.uri, "_storage_root": pc.storage.root_uri()})
    return results


def _close_pipeline_run(ctx: StageContext, results: dict, wall_s: float, status: str) -> None:
    from hkd_core import metric_names as M

    if "evaluate" in results and "metrics" in results["evaluate"]:
        ctx.tracker.log_metrics(ctx.parent_run_id, results["evaluate"]["metrics"],
                                int(round(results.get("distill", {}).get("kimg", 0) * 1000)))
    ctx.tracker.log_metrics(ctx.parent_run_id, {M.PIPELINE_WALL_S: wall_s}, 0)
    ctx.tracker.end(ctx.parent_run_id, status)

"""Run stages in order under one MLflow pipeline run, skipping those already finished for the same config."""
from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from .config import PipelineConfig
from .stages import StageContext, stage_distill, stage_evaluate, stage_teacher, stage_trajectories
from .storage import S3Store
from .tracking import Tracker

log = logging.getLogger(__name__)
STAGES = ("teacher", "trajectories", "distill", "evaluate")
ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("HKD_GIT_SHA", "unknown")


def init_ray(pc: PipelineConfig) -> None:
    """Join cluster.address, or start a local Ray sized for the workers (plus one CPU for the driver's tasks)."""
    import ray

    from .workers import env_for_workers

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # keep a local Ray on 127.0.0.1
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


def context(pc: PipelineConfig, cfg_dict: dict, progress: bool = True) -> StageContext:
    tracker = Tracker(pc.tracking)
    hashes = pc.stages()
    key = f"{pc.name}/pipeline-{hashes['evaluate']}"
    lineage = {"hkd.config_hash": hashes["evaluate"], "hkd.git_sha": git_sha(), "hkd.data": pc.run.data.name,
               "hkd.variant": pc.run.model.variant, "hkd.storage_root": S3Store(pc.storage).uri()}
    parent = tracker.open_run(key, f"{pc.name}-{hashes['evaluate']}", None, {**lineage, "hkd.stage": "pipeline"})
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
                log.info("%s: done for this config (%s), skipped", stage, ctx.store(stage).uri())
                results[stage] = done
                results.setdefault("_skipped", []).append(stage)
                continue
            log.info("%s: running (output %s)", stage, ctx.store(stage).uri())
            ts = time.perf_counter()
            results[stage] = fns[stage]()
            log.info("%s: finished in %.1f s", stage, time.perf_counter() - ts)
        status = "FINISHED"
    finally:
        if own:
            if "evaluate" in results and "metrics" in results["evaluate"]:
                ctx.tracker.log_metrics(ctx.parent_run_id, results["evaluate"]["metrics"],
                                        int(round(results.get("distill", {}).get("kimg", 0) * 1000)))
            ctx.tracker.log_metrics(ctx.parent_run_id, {"perf/pipeline_wall_s": time.perf_counter() - t0}, 0)
            ctx.tracker.end(ctx.parent_run_id, status)
    results["_parent_run_id"] = ctx.parent_run_id
    results["_experiment_id"] = ctx.tracker.experiment_id
    results["_tracking_uri"] = ctx.tracker.uri
    results["_storage_root"] = S3Store(pc.storage).uri()
    return results

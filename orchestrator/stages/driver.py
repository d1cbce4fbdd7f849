"""The one driver: stages in order under one MLflow pipeline run, skipping those already finished.

``run_stages`` is what ``hkd pipeline`` (and ``hkd teacher|trajectories|distill|evaluate``), every variant of
``hkd study`` and the shared stages of ``hkd sweep`` run. It works the same against the local stack or a
cluster (storage=s3, an MLflow server, a Ray head) and without any service (storage=fs tracking=file, Ray
started in this process).
"""

from __future__ import annotations

import logging
import time

from orchestrator import identity
from orchestrator.config import PipelineConfig
from orchestrator.identity import STAGES
from orchestrator.services.raycluster import init_ray, loopback_env  # noqa: F401 - init_ray: the entry points import it from here
from orchestrator.services.tracking import Tracker
from orchestrator.stages.context import StageContext, stage_done
from orchestrator.stages.lease import Leases
from orchestrator.stages.steps import stage_distill, stage_evaluate, stage_teacher, stage_trajectories

log = logging.getLogger(__name__)


def context(
    pc: PipelineConfig, progress: bool = True, parent: str | None = None, tracker: Tracker | None = None
) -> StageContext:
    """The stages' shared state. Without ``parent`` the pipeline's own parent run is opened (or reopened)."""
    tracker = tracker or Tracker(pc.tracking)
    lineage = identity.lineage(pc)
    if parent is None:
        parent = tracker.open_run(
            identity.run_key(pc, "pipeline"),
            identity.run_name(pc, "pipeline"),
            None,
            {**lineage, "hkd.stage": "pipeline"},
        )
        tracker.log_params(parent, pc.run.to_dict())
        tracker.log_dict(parent, pc.to_dict(), "config/resolved.json")
    return StageContext(pc, tracker, parent, lineage, progress)


def run_stages(
    pc: PipelineConfig, upto: str = "evaluate", progress: bool = True, ctx: StageContext | None = None
) -> dict:
    """Every stage up to ``upto`` (inclusive), each skipped if its output exists for this config.
    With ``ctx`` (a sweep's), the stages nest under its parent run, which is left open. Ray is started (or
    joined) by the first stage that needs it: a rerun whose stages are all done starts none."""
    from orchestrator.services.storage import make_store

    loopback_env(pc)  # before any stage imports ray
    stages = STAGES[: STAGES.index(upto) + 1]
    stores = {s: make_store(pc.storage, identity.stage_prefix(pc, s)) for s in stages}
    # the stages this driver will run, leased before any MLflow run is opened: a second driver for the same
    # config stops here (StageBusyError) and touches nothing of the first's
    todo = {s: stores[s] for s in stages if stage_done(stores[s], s) is None}
    own = ctx is None
    results: dict = {}
    with Leases(todo) as leases:
        ctx = ctx or context(pc, progress)
        fns = {
            "teacher": lambda: stage_teacher(ctx),
            "trajectories": lambda: stage_trajectories(ctx, results["teacher"]),
            "distill": lambda: stage_distill(ctx, results["trajectories"], results["teacher"]),
            "evaluate": lambda: stage_evaluate(ctx, results["teacher"], results["distill"]),
        }
        t0 = time.perf_counter()
        status = "FAILED"
        try:
            for stage in stages:
                done = ctx.done(stage)
                if done is not None:
                    log.info("%s: done for this config (%s), skipped", stage, ctx.store(stage).uri(""))
                    results[stage] = done
                    results.setdefault("_skipped", []).append(stage)
                    continue
                log.info("%s: running (output %s)", stage, ctx.store(stage).uri(""))
                ts = time.perf_counter()
                try:
                    results[stage] = fns[stage]()
                except Exception as e:
                    ctx.close_system_metrics(stage)
                    ctx.fail(stage, e)
                    raise
                ctx.close_system_metrics(stage)
                leases.release(stage)
                log.info("%s: finished in %.1f s", stage, time.perf_counter() - ts)
            status = "FINISHED"
        finally:
            if own:
                _close_pipeline_run(ctx, results, time.perf_counter() - t0, status)
    results.update(
        {
            "_parent_run_id": ctx.parent_run_id,
            "_experiment_id": ctx.tracker.experiment_id,
            "_tracking_uri": ctx.tracker.uri,
            "_storage_root": pc.storage.root_uri(),
        }
    )
    return results


def _close_pipeline_run(ctx: StageContext, results: dict, wall_s: float, status: str) -> None:
    from hkd_core import metric_names as M

    if "evaluate" in results and "metrics" in results["evaluate"]:
        ctx.tracker.log_metrics(
            ctx.parent_run_id,
            results["evaluate"]["metrics"],
            int(round(results.get("distill", {}).get("kimg", 0) * 1000)),
        )
    ctx.tracker.log_metrics(ctx.parent_run_id, {M.PIPELINE_WALL_S: wall_s}, 0)
    ctx.tracker.end(ctx.parent_run_id, status)

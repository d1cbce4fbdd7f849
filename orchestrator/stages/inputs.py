"""What the distill stage reads, checked by the driver before Ray Train starts, so that a bad input costs seconds
and names its object: every trajectory shard the manifest lists, and the checkpoint a rerun would resume from."""

from __future__ import annotations

import logging

import torch

from orchestrator.services.rayfs import ray_storage
from orchestrator.services.storage import make_store, store_at
from orchestrator.stages.context import StageContext

log = logging.getLogger(__name__)


def check_distill_inputs(ctx: StageContext) -> dict[str, str]:
    """What distillation reads, checked by the driver before Ray Train starts, so that a bad input costs
    seconds and names its object: every shard the manifest lists (exists, size, and the MD5 S3 reports in
    its ETag, all by HEAD requests), and the checkpoint a rerun would resume from (written for this model).
    Raises ShardError / CheckpointError; with train.skip_corrupt_shards returns {key: problem} of the shards
    to leave out instead."""
    from hkd_core.trajectories import ShardError, check_shards, read_manifest

    pc = ctx.pc
    store = make_store(pc.storage, f"{ctx.prefix('trajectories')}/train")
    manifest = read_manifest(store)
    skip = check_shards(store, manifest, skip_corrupt=pc.run.train.skip_corrupt_shards)
    for why in skip.values():
        log.warning("skipping a shard (train.skip_corrupt_shards=true): %s", why)
    left = len(manifest.shards) - len(skip)
    if left < pc.cluster.num_workers:
        raise ShardError(
            f"{left} usable shards under {store.uri()} for {pc.cluster.num_workers} workers"
            + (f" ({len(skip)} skipped: {'; '.join(skip.values())})" if skip else "")
            + "; regenerate the trajectories or use fewer workers"
        )
    check_resume_checkpoint(ctx)
    return skip


def check_resume_checkpoint(ctx: StageContext) -> str | None:
    """The newest checkpoint Ray Train recorded for the distill stage, if any, loaded into a model built from
    this config: a checkpoint of another architecture (a code change under the same config) is refused here,
    naming its URI, instead of failing every worker restart. Returns its URI."""
    from pathlib import Path

    from hkd_core.checkpoint import CheckpointError, load_model_state
    from hkd_core.models import build_model

    path, fs = ray_storage(ctx.pc.storage)
    exp = f"{path}/{ctx.prefix('distill')}"
    exp_uri = store_at(ctx.pc.storage, exp).uri("")
    if not store_at(ctx.pc.storage, exp).exists("checkpoint_manager_snapshot.json"):
        return None
    from ray.train import Result

    ckpt = Result.from_path(exp, storage_filesystem=fs).checkpoint
    if ckpt is None:
        return None
    again = f"delete {exp_uri}/ to start the stage over"
    with ckpt.as_directory() as d:
        files = sorted(Path(d).glob("ckpt-*.pt"))
        uri = store_at(ctx.pc.storage, ckpt.path).uri(files[-1].name if files else "")
        if not files:
            raise CheckpointError(f"checkpoint {uri} holds no ckpt-*.pt; {again}")
        try:
            state = torch.load(files[-1], map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise CheckpointError(
                f"checkpoint {uri} is unreadable ({type(e).__name__}: {e}); {again}"
            ) from None
    model = build_model(ctx.pc.run.model.variant, ctx.pc.run.hkd_config())
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(
            f"checkpoint {uri} is not an HKD training checkpoint (no 'model' entry); {again}"
        )
    try:
        load_model_state(model, state["model"], uri)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; or {again}") from None
    log.info("distill: will resume from %s (%.3f kimg)", uri, state.get("nimg", 0) / 1000)
    return uri

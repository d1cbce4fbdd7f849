"""The pipeline's stages as Ray workloads, driven from one process.

Every stage writes under ``s3://<bucket>/<prefix>/<stage>-<hash>/`` where the hash covers its config and
its inputs' hashes, and finishes by writing ``_SUCCESS.json`` there: a stage whose marker exists for the
same config is skipped. Each stage has its own MLflow run (reopened on restart) nested under the pipeline's.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hkd_core.data import DATASETS, load_images
from hkd_core.trajectories import Manifest, ShardInfo, write_manifest

from .config import PipelineConfig
from .storage import S3Store, ray_storage
from .tracking import Tracker
from . import workers

log = logging.getLogger(__name__)
DONE = "_SUCCESS.json"


@dataclasses.dataclass
class StageContext:
    pc: PipelineConfig
    cfg_dict: dict                 # the resolved config, shipped to workers
    tracker: Tracker
    parent_run_id: str | None
    lineage: dict                  # tags every run carries (config hash, git sha, data, ...)
    progress: bool = True

    @property
    def hashes(self) -> dict[str, str]:
        return self.pc.stages()

    def prefix(self, stage: str) -> str:
        return f"{stage}-{self.hashes[stage]}"

    def store(self, stage: str) -> S3Store:
        return S3Store(self.pc.storage, self.prefix(stage))

    def done(self, stage: str) -> dict | None:
        s = self.store(stage)
        return json.loads(s.get(DONE)) if s.exists(DONE) else None

    def finish(self, stage: str, summary: dict) -> None:
        self.store(stage).put(DONE, json.dumps(summary, indent=1, default=float).encode())

    def open_run(self, stage: str, tags: dict | None = None) -> str:
        run_id = self.tracker.open_run(f"{self.pc.name}/{self.prefix(stage)}", f"{stage}-{self.hashes[stage]}",
                                       self.parent_run_id, {**self.lineage, "hkd.stage": stage,
                                                            "hkd.stage_hash": self.hashes[stage], **(tags or {})})
        self.tracker.log_params(run_id, _stage_params(self.pc, stage))
        return run_id


def _stage_params(pc: PipelineConfig, stage: str) -> dict:
    run = pc.run.to_dict()
    keys = {"teacher": ("data", "teacher"), "trajectories": ("data", "teacher", "trajectories"),
            "distill": ("data", "teacher", "trajectories", "model", "train"),
            "evaluate": ("data", "model", "eval")}[stage]
    out = {k: run[k] for k in keys}
    out["cluster"] = dataclasses.asdict(pc.cluster)
    return out


def _images(pc: PipelineConfig) -> torch.Tensor:
    d = pc.run.data
    x, _ = load_images(d.name, d.split, resolution=d.resolution, limit=d.limit, root=d.root)
    return x


def _threads(pc: PipelineConfig) -> int:
    return max(1, int(pc.cluster.cpus_per_worker))


def _ray_run_config(ctx: StageContext, stage: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    path, fs = ray_storage(ctx.pc.storage)
    return RunConfig(name=ctx.prefix(stage), storage_path=path, storage_filesystem=fs,
                     failure_config=FailureConfig(max_failures=ctx.pc.cluster.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=2),
                     worker_runtime_env={"env_vars": workers.env_for_workers()})


def _scaling(pc: PipelineConfig):
    from ray.train import ScalingConfig

    c = pc.cluster
    res = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        res["GPU"] = c.gpus_per_worker
    return ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=res)


def _fit(ctx: StageContext, stage: str, loop, extra: dict, run_id: str):
    from ray.train.torch import TorchConfig, TorchTrainer

    backend = TorchConfig(backend="nccl" if ctx.pc.cluster.use_gpu else "gloo")
    trainer = TorchTrainer(loop, train_loop_config={"pipeline": ctx.cfg_dict, "run_id": run_id,
                                                    "threads": _threads(ctx.pc), **extra},
                           torch_config=backend, scaling_config=_scaling(ctx.pc), run_config=_ray_run_config(ctx, stage))
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    return result, time.perf_counter() - t0


def _checkpoint_state(result) -> dict:
    with result.checkpoint.as_directory() as d:
        f = sorted(Path(d).glob("ckpt-*.pt"))[-1]
        return torch.load(f, map_location="cpu", weights_only=False)


def stage_teacher(ctx: StageContext) -> dict:
    """EDM teacher training on Ray Train (an empirical teacher needs none: recorded, not trained)."""
    pc = ctx.pc
    if pc.run.teacher.kind == "empirical":
        return {"kind": "empirical", "teacher_key": None}
    import ray

    run_id = ctx.open_run("teacher")
    images = _images(pc)
    ref = ray.put(images)
    result, wall = _fit(ctx, "teacher", workers.teacher_loop, {"images_ref": [ref]}, run_id)
    state = _checkpoint_state(result)
    buf = io.BytesIO()
    torch.save(state["ema"], buf)
    key = f"{ctx.prefix('teacher')}/teacher.pt"
    S3Store(pc.storage).put(key, buf.getvalue())
    summary = {"kind": "edm", "teacher_key": key, "kimg": state["nimg"] / 1000, "wall_s": wall,
               "checkpoint_uri": S3Store(pc.storage).uri(key)}
    ctx.tracker.set_tags(run_id, {"hkd.teacher_uri": summary["checkpoint_uri"]})
    ctx.tracker.log_metrics(run_id, {"perf/wall_s": wall}, step=int(state["nimg"]))
    ctx.tracker.end(run_id)
    ctx.finish("teacher", summary)
    return summary


def stage_trajectories(ctx: StageContext, teacher: dict) -> dict:
    """Shards generated by Ray tasks spread over the cluster, then one manifest per split."""
    import ray

    from hkd_core.generate import sampler_spec, shard_plan
    from hkd_core.pipeline import HOLDOUT_SEED_OFFSET
    from hkd_core.sampler import karras_sigmas

    pc = ctx.pc
    t = pc.run.trajectories
    run_id = ctx.open_run("trajectories", {"hkd.teacher_uri": teacher.get("checkpoint_uri") or "empirical"})
    images = _images(pc)
    img_ref = ray.put(images)
    remote = ray.remote(workers.generate_shard_task)
    opts = {"num_cpus": _threads(pc), "num_gpus": pc.cluster.gpus_per_worker if pc.cluster.use_gpu else 0,
            "runtime_env": {"env_vars": workers.env_for_workers()}, "max_retries": 3}
    spec = sampler_spec(t.sampler, t.steps)
    summary, t0 = {}, time.perf_counter()
    for split, num, seed in (("train", t.num, t.seed), ("holdout", t.holdout, t.seed + HOLDOUT_SEED_OFFSET)):
        if num == 0:
            continue
        prefix = f"{ctx.prefix('trajectories')}/{split}"
        plan = shard_plan(num, t.shard_size)
        pending, infos = [], []
        bar = tqdm(total=len(plan), desc=f"trajectories/{split}", unit="shard", disable=not ctx.progress)
        for index, first, count in plan:
            while len(pending) >= pc.cluster.generation_tasks:
                done, pending = ray.wait(pending, num_returns=1)
                infos += ray.get(done)
                bar.update(len(done))
            pending.append(remote.options(**opts).remote(ctx.cfg_dict, img_ref, teacher.get("teacher_key"), prefix,
                                                          index, first, count, seed, _threads(pc)))
        infos += ray.get(pending)
        bar.update(len(pending))
        bar.close()
        shards = [ShardInfo(**i) for i in infos]
        manifest = Manifest(shape=list(images.shape[1:]), sigmas=karras_sigmas(t.steps).tolist(),
                            nfe=2 * t.steps - 1 if t.sampler == "heun" else t.steps,
                            teacher={"kind": pc.run.teacher.kind, **({"uri": teacher["checkpoint_uri"]}
                                                                     if teacher.get("checkpoint_uri") else {})},
                            sampler=spec, shard_size=t.shard_size, shards=shards)
        store = S3Store(pc.storage, prefix)
        write_manifest(store, manifest)
        summary[split] = {"uri": store.uri(), "trajectories": manifest.num_trajectories, "shards": len(shards)}
    wall = time.perf_counter() - t0
    summary["wall_s"] = wall
    summary["teacher_uri"] = teacher.get("checkpoint_uri") or f"empirical:{pc.run.data.name}/{pc.run.data.split}"
    ctx.tracker.log_metrics(run_id, {"perf/wall_s": wall, "perf/trajectories_per_s": t.num / max(wall, 1e-9)}, 0)
    ctx.tracker.set_tags(run_id, {"hkd.trajectories_uri": summary["train"]["uri"]})
    ctx.tracker.end(run_id)
    ctx.finish("trajectories", summary)
    return summary


def stage_distill(ctx: StageContext, trajectories: dict) -> dict:
    """HKD (or a baseline) on Ray Train; each worker streams its shards; the EMA model goes to S3 and MLflow."""
    from hkd_core.models import build_model, count_parameters, model_record

    pc = ctx.pc
    skip = check_distill_inputs(ctx)
    run_id = ctx.open_run("distill", {"hkd.trajectories_uri": trajectories["train"]["uri"],
                                      "hkd.teacher_uri": trajectories.get("teacher_uri", "")})
    if skip:
        ctx.tracker.set_tags(run_id, {"hkd.skipped_shards": ",".join(sorted(skip))[:4000]})
    attempt = _bump_attempt(ctx, run_id)
    result, wall = _fit(ctx, "distill", workers.distill_loop,
                        {"trajectories_prefix": f"{ctx.prefix('trajectories')}/train", "skip_shards": sorted(skip)},
                        run_id)
    state = _checkpoint_state(result)
    model = build_model(pc.run.model.variant, pc.run.hkd_config())
    model.load_state_dict(state["ema"])
    buf = io.BytesIO()
    torch.save(model_record(model.eval()), buf)
    key = f"{ctx.prefix('distill')}/model.pt"
    S3Store(pc.storage).put(key, buf.getvalue())
    summary = {"model_key": key, "model_uri": S3Store(pc.storage).uri(key), "kimg": state["nimg"] / 1000,
               "steps": state["step"], "train_s": state["train_s"], "wall_s": wall, "attempts": attempt,
               "params": count_parameters(model), "ray_path": result.path}
    ctx.tracker.log_metrics(run_id, {"perf/wall_s": wall, "perf/train_s": state["train_s"]}, int(state["nimg"]))
    registered = log_model(ctx, run_id, model)
    summary["registered_model"] = registered
    ctx.tracker.set_tags(run_id, {"hkd.model_uri": summary["model_uri"]})
    ctx.tracker.end(run_id)
    ctx.finish("distill", summary)
    return summary


def check_distill_inputs(ctx: StageContext) -> dict[str, str]:
    """What distillation reads, checked by the driver before Ray Train starts, so that a bad input costs
    seconds and names its object: every shard the manifest lists (exists, size, and the MD5 S3 reports in
    its ETag, all by HEAD requests), and the checkpoint a rerun would resume from (written for this model).
    Raises ShardError / CheckpointError; with train.skip_corrupt_shards returns {key: problem} of the shards
    to leave out instead."""
    from hkd_core.trajectories import ShardError, check_shards, read_manifest

    pc = ctx.pc
    store = S3Store(pc.storage, f"{ctx.prefix('trajectories')}/train")
    manifest = read_manifest(store)
    skip = check_shards(store, manifest, skip_corrupt=pc.run.train.skip_corrupt_shards)
    for why in skip.values():
        log.warning("skipping a shard (train.skip_corrupt_shards=true): %s", why)
    left = len(manifest.shards) - len(skip)
    if left < pc.cluster.num_workers:
        raise ShardError(f"{left} usable shards under {store.uri()} for {pc.cluster.num_workers} workers"
                         + (f" ({len(skip)} skipped: {'; '.join(skip.values())})" if skip else "")
                         + "; regenerate the trajectories or use fewer workers")
    check_resume_checkpoint(ctx)
    return skip


def check_resume_checkpoint(ctx: StageContext) -> str | None:
    """The newest checkpoint Ray Train recorded for the distill stage, if any, loaded into a model built from
    this config: a checkpoint of another architecture (a code change under the same config) is refused here,
    naming its URI, instead of failing every worker restart. Returns its URI."""
    import dataclasses as dc

    from hkd_core.checkpoint import CheckpointError, load_model_state
    from hkd_core.models import build_model

    path, fs = ray_storage(ctx.pc.storage)
    exp = f"{path}/{ctx.prefix('distill')}"
    bucket, _, key = exp.partition("/")
    if not S3Store(dc.replace(ctx.pc.storage, bucket=bucket, prefix=key)).exists("checkpoint_manager_snapshot.json"):
        return None
    from ray.train import Result

    ckpt = Result.from_path(exp, storage_filesystem=fs).checkpoint
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        files = sorted(Path(d).glob("ckpt-*.pt"))
        uri = f"s3://{ckpt.path}/{files[-1].name}" if files else f"s3://{ckpt.path}"
        if not files:
            raise CheckpointError(f"checkpoint {uri} holds no ckpt-*.pt; delete s3://{exp}/ to start the stage over")
        try:
            state = torch.load(files[-1], map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise CheckpointError(f"checkpoint {uri} is unreadable ({type(e).__name__}: {e}); delete s3://{exp}/ "
                                  f"to start the stage over") from None
    model = build_model(ctx.pc.run.model.variant, ctx.pc.run.hkd_config())
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {uri} is not an HKD training checkpoint (no 'model' entry); delete "
                              f"s3://{exp}/ to start the stage over")
    try:
        load_model_state(model, state["model"], uri)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; or delete s3://{exp}/ to start this stage over") from None
    log.info("distill: will resume from %s (%.3f kimg)", uri, state.get("nimg", 0) / 1000)
    return uri


def _bump_attempt(ctx: StageContext, run_id: str) -> int:
    tags = ctx.tracker.run_data(run_id).data.tags
    attempt = int(tags.get("hkd.attempt", "0")) + 1
    ctx.tracker.set_tags(run_id, {"hkd.attempt": attempt})
    return attempt


def log_model(ctx: StageContext, run_id: str, model) -> str | None:
    """The EMA model as an MLflow pytorch model, registered in the Model Registry."""
    import mlflow
    import mlflow.pytorch

    name = ctx.pc.tracking.register_model
    mlflow.set_tracking_uri(ctx.tracker.uri)
    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pytorch.log_model(model, name="model", registered_model_name=name, serialization_format="pickle",
                                        pip_requirements=["torch"], await_registration_for=60)
    return f"{name}/{info.registered_model_version}" if name else None


def reference(pc: PipelineConfig) -> tuple:
    """Reference statistics of the evaluation split, cached in S3 under a content hash of (data set, split,
    N, resolution, Inception weights sha256): computed across Ray tasks once, then read. Returns
    (Reference, computed now?)."""
    from hkd_core.fid import Reference, decode_reference, encode_reference, reference_cache_name, reference_key
    from hkd_core.inception import weights_digest, weights_path

    e, d = pc.run.eval, pc.run.data
    key = reference_key(d.name, e.split, e.n, d.resolution, weights_digest(weights_path(e.inception_weights)))
    store = S3Store(pc.storage, "fid-refs")
    name = reference_cache_name(key)
    if store.exists(name):
        ref = decode_reference(store.get(name))
        if ref.key == key:
            return ref, False
    images, _ = load_images(d.name, e.split, resolution=d.resolution, limit=e.n, root=d.root, seed=12345)
    if images.shape[0] < e.n:
        raise ValueError(f"eval.n={e.n}: {d.name}/{e.split} has only {images.shape[0]} images")
    log.info("reference statistics for %s/%s N=%d across Ray tasks (once; cached at %s)", d.name, e.split, e.n,
             store.uri(name))
    stats, feats = image_features(pc, images)
    ref = Reference(key, stats, feats)
    store.put(name, encode_reference(ref))
    return ref, True


def _reference(ctx: StageContext):
    return reference(ctx.pc)[0]


def _feature_tasks(pc: PipelineConfig):
    import ray

    return ray.remote(num_cpus=_threads(pc), num_gpus=pc.cluster.gpus_per_worker if pc.cluster.use_gpu else 0,
                      max_retries=2, runtime_env={"env_vars": workers.env_for_workers()})


def merge_features(results: list[dict]):
    """Per-task float64 statistics merged exactly, and the features concatenated in task order (for KID)."""
    from hkd_core.fid import FeatureStats

    stats = FeatureStats.merge_all([FeatureStats.from_dict(r) for r in results])
    return stats, torch.from_numpy(np.concatenate([r["features"] for r in results]))


def image_features(pc: PipelineConfig, images: torch.Tensor, tasks: int | None = None):
    """(FeatureStats, features) of given images, split into contiguous chunks over ``tasks`` Ray tasks
    (default cluster.generation_tasks)."""
    import ray

    k = max(1, min(tasks or pc.cluster.generation_tasks, images.shape[0]))
    bounds = np.linspace(0, images.shape[0], k + 1).round().astype(int)
    fn = _feature_tasks(pc)(workers.image_features_task)
    cfg = pc.to_dict()
    refs = [fn.remote(cfg, images[a:b].clone(), _threads(pc)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return merge_features(ray.get(refs))


def _features(ctx: StageContext, what: dict, model_key=None, teacher_key=None, images_ref=None):
    """Samples and their Inception statistics computed across Ray tasks, one chunk of seeds each, merged."""
    import ray

    pc = ctx.pc
    e = pc.run.eval
    seeds = list(range(e.seed * 1_000_000, e.seed * 1_000_000 + e.n))
    k = pc.cluster.generation_tasks
    chunks = [seeds[i::k] for i in range(k) if seeds[i::k]]
    fn = _feature_tasks(pc)(workers.features_task)
    refs = [fn.remote(ctx.cfg_dict, what, c, images_ref, teacher_key, model_key, _threads(pc)) for c in chunks]
    return merge_features(ray.get(refs))


def stage_evaluate(ctx: StageContext, teacher: dict, distill: dict) -> dict:
    """FID/KID of the model (NFE 1) and the teacher (eval.teacher_nfe), spectra and figures, into MLflow."""
    import ray

    from hkd_core.fid import fid_from_stats, kid_from_features
    from hkd_core.models import model_from_record

    pc = ctx.pc
    e = pc.run.eval
    run_id = ctx.open_run("evaluate", {"hkd.model_uri": distill["model_uri"]})
    t0 = time.perf_counter()
    ref = _reference(ctx)
    ksize = min(e.kid_subset_size, e.n)

    def score(merged) -> dict:
        stats, f = merged                    # float64 sums merged over the tasks; features for KID
        kid, kid_std = kid_from_features(f, ref.features, ksize)
        return {"fid": fid_from_stats(stats, ref.stats), "kid": kid, "kid_std": kid_std}

    m = score(_features(ctx, {"kind": "model"}, model_key=distill["model_key"]))
    metrics = {"eval/fid": m["fid"], "eval/kid": m["kid"], "eval/kid_std": m["kid_std"], "eval/n": e.n,
               "eval/fid_nfe1": m["fid"]}
    if e.teacher_nfe:
        img_ref = ray.put(_images(pc))
        for nfe in e.teacher_nfe:
            tm = score(_features(ctx, {"kind": "teacher", "nfe": nfe}, teacher_key=teacher.get("teacher_key"),
                                 images_ref=img_ref))
            metrics[f"eval/teacher_fid_nfe{nfe}"] = tm["fid"]
            metrics[f"eval/teacher_kid_nfe{nfe}"] = tm["kid"]
    rec = torch.load(io.BytesIO(S3Store(pc.storage).get(distill["model_key"])), map_location="cpu", weights_only=False)
    model = model_from_record(rec)
    from hkd_core.spectra import summarize

    metrics.update(summarize(model.spectrum()))
    metrics["perf/eval_s"] = time.perf_counter() - t0
    step = int(round(distill["kimg"] * 1000))
    ctx.tracker.log_metrics(run_id, metrics, step)
    log_figures(ctx, run_id, model)
    ctx.tracker.log_dict(run_id, pc.to_dict(), "config/resolved.json")
    summary = {"metrics": metrics, "n": e.n}
    ctx.tracker.end(run_id)
    ctx.finish("evaluate", summary)
    return summary


def log_figures(ctx: StageContext, run_id: str, model) -> None:
    """Sample grid, spectrum plots, decay-rate maps, band masking, trajectory strip, raw eigenvalues."""
    from hkd_core.pipeline import write_figures

    with tempfile.TemporaryDirectory() as d:
        paths = write_figures(model, Path(d))
        spec = model.spectrum()
        if spec:
            np.savez(Path(d) / "eigenvalues.npz", **{f"level{l + 1}": ev.numpy() for l, ev in enumerate(spec)})
            paths.append(Path(d) / "eigenvalues.npz")
        for p in paths:
            folder = "spectra" if p.name in ("spectrum.png", "alpha_maps.png", "eigenvalues.npz") else "figures"
            ctx.tracker.log_artifact(run_id, p, folder)


def data_shape(pc: PipelineConfig) -> tuple[int, int, int]:
    d = pc.run.data
    return (DATASETS[d.name].channels, d.resolution, d.resolution)

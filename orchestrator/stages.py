"""The pipeline's four stages as Ray workloads, driven from one process.

Every stage writes under ``<storage root>/<stage>-<hash>/`` (orchestrator/identity.py) and finishes by
writing ``_SUCCESS.json`` there: a stage whose marker exists for the same config is skipped. Each stage has
its own MLflow run (reopened on restart) nested under the pipeline's. The work itself is hkd_core's units:
the teacher's training loop, one shard of trajectories, the distillation loop, one chunk of samples scored.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import time

import torch
from tqdm.auto import tqdm

from hkd_core import metric_names as M
from hkd_core.data import load_images

from . import evaluation, identity, registry, trainer, workers
from .headline import headline
from .config import PipelineConfig
from .raycluster import init_ray
from .storage import make_store, ray_storage, read_uri, store_at
from .tracking import SystemMetrics, Tracker

log = logging.getLogger(__name__)
DONE = "_SUCCESS.json"
# the config sections each stage's MLflow run records as params
STAGE_PARAMS = {"teacher": ("data", "teacher"), "trajectories": ("data", "teacher", "trajectories"),
                "distill": ("data", "teacher", "trajectories", "model", "train"), "evaluate": ("data", "model", "eval")}


@dataclasses.dataclass
class StageContext:
    pc: PipelineConfig
    cfg_dict: dict                 # the resolved config, shipped to workers
    tracker: Tracker
    parent_run_id: str | None
    lineage: dict                  # tags every run carries (config hash, git sha, data, ...)
    progress: bool = True
    opened: dict = dataclasses.field(default_factory=dict)     # stage -> its MLflow run id, once opened
    system: dict = dataclasses.field(default_factory=dict)     # stage -> its SystemMetrics sampler, while open

    def prefix(self, stage: str) -> str:
        return identity.stage_prefix(self.pc, stage)

    def store(self, stage: str):
        return make_store(self.pc.storage, self.prefix(stage))

    def done(self, stage: str) -> dict | None:
        s = self.store(stage)
        return json.loads(s.get(DONE)) if s.exists(DONE) else None

    def finish(self, stage: str, summary: dict) -> None:
        self.store(stage).put(DONE, json.dumps(summary, indent=1, default=float).encode())

    def open_run(self, stage: str, tags: dict | None = None) -> str:
        run_id = self.tracker.open_run(identity.run_key(self.pc, stage), identity.run_name(self.pc, stage),
                                       self.parent_run_id, {**self.lineage, "hkd.stage": stage,
                                                            "hkd.stage_hash": self.pc.stages()[stage], **(tags or {})})
        run = self.pc.run.to_dict()
        self.tracker.log_params(run_id, {**{k: run[k] for k in STAGE_PARAMS[stage]},
                                         "cluster": dataclasses.asdict(self.pc.cluster)})
        inputs = self.inputs(stage)
        if inputs:
            self.tracker.log_inputs(run_id, inputs)
        self.opened[stage] = run_id
        self.system[stage] = SystemMetrics(self.pc.tracking, run_id)      # the driver's machine while it runs
        return run_id

    def close_system_metrics(self, stage: str) -> None:
        if stage in self.system:
            self.system.pop(stage).finish()

    def fail(self, stage: str, err: BaseException) -> None:
        """A stage that raised: its run (if it got one) ends FAILED, saying why, whatever the exception; a run that
        something else already ended (MLflow's own context manager, say) still gets the reason."""
        run_id = self.opened.get(stage)
        if run_id is None:
            return
        run = self.tracker.run_data(run_id)
        if run.info.status == "RUNNING" or "hkd.end_reason" not in run.data.tags:
            from .errors import describe

            self.tracker.set_tags(run_id, {"hkd.end_reason": f"{type(err).__name__}: {describe(err)}"[:4000]})
        if run.info.status == "RUNNING":
            self.tracker.end(run_id, "FAILED")

    def inputs(self, stage: str) -> list[dict]:
        return dataset_inputs(self.pc, stage, self.store("trajectories").uri("train"))

    def fit(self, stage: str, loop, run_id: str, extra: dict):
        t = trainer.make_trainer(self.pc, loop, {"pipeline": self.cfg_dict, "run_id": run_id, **extra},
                                 self.prefix(stage))
        return trainer.fit(t)


def dataset_inputs(pc: PipelineConfig, stage: str, trajectories_uri: str) -> list[dict]:
    """What a stage's run (or a sweep trial, stage "distill") consumed, as MLflow dataset inputs: the image set
    (teacher: training; evaluate: the FID reference split) and, for distill, the teacher's trajectories at
    ``trajectories_uri`` (named by their stage prefix, digest = their stage hash): the runs table's Dataset
    column then says what each run trained on."""
    from hkd_core.config import config_hash

    d, run = pc.run.data, pc.run

    def images(split: str, context: str) -> dict:
        sub = dataclasses.replace(d, split=split)
        return {"name": f"{d.name}/{split}", "digest": config_hash(sub)[:12], "source": f"hkd-data:{d.name}",
                "source_type": "local", "context": context,
                "profile": {"split": split, "resolution": d.resolution, "limit": d.limit}}
    if stage == "teacher" and run.teacher.kind == "edm":
        return [images(d.split, "training")]
    if stage == "distill":
        t = run.trajectories
        return [{"name": identity.stage_prefix(pc, "trajectories"), "digest": pc.stages()["trajectories"],
                 "source": trajectories_uri, "source_type": "s3" if trajectories_uri.startswith("s3://") else "local",
                 "context": "training", "profile": {"trajectories": t.num, "sampler": t.sampler, "steps": t.steps,
                                                    "teacher": run.teacher.kind}},
                images(d.split, "teacher training")]
    if stage == "evaluate":
        return [images(run.eval.split, "evaluation")]
    return []


def images(pc: PipelineConfig) -> torch.Tensor:
    d = pc.run.data
    return load_images(d.name, d.split, resolution=d.resolution, limit=d.limit, root=d.root)[0]


def stage_teacher(ctx: StageContext) -> dict:
    """The EDM teacher: a shipped one trained with exactly this config is adopted (hkd_core/shipped.py), else it
    is trained on Ray Train. Either way its EMA weights become the stage's output. An empirical teacher needs
    neither: recorded, not trained."""
    from hkd_core.data import DATASETS
    from hkd_core.shipped import find_shipped

    pc = ctx.pc
    if pc.run.teacher.kind == "empirical":
        return {"kind": "empirical", "teacher_key": None}
    given = pc.run.teacher.checkpoint
    shipped = None if given else find_shipped(pc.run.data, pc.run.teacher)
    run_id = ctx.open_run("teacher", {"hkd.teacher_source": "checkpoint" if given else
                                      "shipped" if shipped else "trained"})
    if given:
        from hkd_core.teachers import teacher_state_from_checkpoint

        t0 = time.perf_counter()
        blob = read_uri(pc.storage, given, "teacher.checkpoint")
        ema, kimg = teacher_state_from_checkpoint(blob, pc.run.teacher, DATASETS[pc.run.data.name].channels,
                                                  pc.run.data.resolution, given)
        kimg, wall = kimg or 0.0, time.perf_counter() - t0
        log.info("teacher: using teacher.checkpoint %s (no training)", given)
    elif shipped is not None:
        t0 = time.perf_counter()
        ema = shipped.load(DATASETS[pc.run.data.name].channels)       # sha256 and architecture checked
        kimg, wall = float(shipped.record.get("kimg", 0.0)), time.perf_counter() - t0
        log.info("teacher: adopted the shipped teacher %s (trained %.0f kimg; no training)", shipped.folder, kimg)
        for name in ("record.json", "samples.png"):
            if (shipped.folder / name).is_file():
                ctx.tracker.log_artifact(run_id, shipped.folder / name, "shipped_teacher")
    else:
        import ray

        init_ray(pc)
        result, wall = ctx.fit("teacher", workers.teacher_loop, run_id, {"images_ref": [ray.put(images(pc))]})
        state = trainer.checkpoint_state(result)
        ema, kimg = state["ema"], state["nimg"] / 1000
    buf = io.BytesIO()
    torch.save(ema, buf)
    key = f"{ctx.prefix('teacher')}/teacher.pt"
    root = make_store(pc.storage)
    root.put(key, buf.getvalue())
    summary = {"kind": "edm", "teacher_key": key, "kimg": kimg, "wall_s": wall, "checkpoint_uri": root.uri(key),
               "adopted": str(shipped.folder) if shipped else None, "from_checkpoint": given or None}
    ctx.tracker.set_tags(run_id, {"hkd.teacher_uri": summary["checkpoint_uri"]})
    ctx.tracker.log_metrics(run_id, {M.WALL_S: wall}, step=int(kimg * 1000))
    ctx.tracker.end(run_id)
    ctx.finish("teacher", summary)
    return summary


def stage_trajectories(ctx: StageContext, teacher: dict) -> dict:
    """Shards generated by Ray tasks spread over the cluster, then one manifest per split."""
    import ray

    from hkd_core.evaluation import image_shape
    from hkd_core.generate import build_manifest, sampler_spec, shard_plan, splits
    from hkd_core.trajectories import ShardInfo, write_manifest

    pc = ctx.pc
    init_ray(pc)
    t = pc.run.trajectories
    teacher_uri = teacher.get("checkpoint_uri") or f"empirical:{pc.run.data.name}/{pc.run.data.split}"
    run_id = ctx.open_run("trajectories", {"hkd.teacher_uri": teacher.get("checkpoint_uri") or "empirical"})
    img_ref = ray.put(images(pc)) if pc.run.teacher.kind == "empirical" else None   # only the empirical needs them
    remote = ray.remote(workers.generate_shard_task)
    threads = max(1, int(pc.cluster.cpus_per_worker))
    opts = {"num_cpus": threads, "num_gpus": pc.cluster.gpus_per_worker if pc.cluster.use_gpu else 0,
            "runtime_env": {"env_vars": workers.env_for_workers()}, "max_retries": 3}
    spec = sampler_spec(t.sampler, t.steps)
    summary, t0 = {}, time.perf_counter()
    for split, num, seed in splits(t.num, t.holdout, t.seed):
        prefix = f"{ctx.prefix('trajectories')}/{split}"
        pending, infos = [], []
        plan = shard_plan(num, t.shard_size)
        bar = tqdm(total=len(plan), desc=f"trajectories/{split}", unit="shard", disable=not ctx.progress)
        for index, first, count in plan:
            while len(pending) >= pc.cluster.generation_tasks:
                done, pending = ray.wait(pending, num_returns=1)
                infos += ray.get(done)
                bar.update(len(done))
            pending.append(remote.options(**opts).remote(ctx.cfg_dict, img_ref, teacher.get("teacher_key"), prefix,
                                                          index, first, count, seed, threads))
        infos += ray.get(pending)
        bar.update(len(pending))
        bar.close()
        teacher_id = {"kind": pc.run.teacher.kind, **({"uri": teacher["checkpoint_uri"]}
                                                     if teacher.get("checkpoint_uri") else {})}
        manifest = build_manifest(image_shape(pc.run.data), spec, teacher_id, t.shard_size, [ShardInfo(**i) for i in infos])
        store = make_store(pc.storage, prefix)
        write_manifest(store, manifest)
        summary[split] = {"uri": store.uri(), "trajectories": manifest.num_trajectories, "shards": len(infos)}
    wall = time.perf_counter() - t0
    summary.update({"wall_s": wall, "teacher_uri": teacher_uri})
    ctx.tracker.log_metrics(run_id, {M.WALL_S: wall, M.TRAJECTORIES_PER_S: t.num / max(wall, 1e-9)}, 0)
    ctx.tracker.set_tags(run_id, {"hkd.trajectories_uri": summary["train"]["uri"]})
    ctx.tracker.end(run_id)
    ctx.finish("trajectories", summary)
    return summary


def stage_distill(ctx: StageContext, trajectories: dict, teacher: dict | None = None) -> dict:
    """HKD (or a baseline) on Ray Train; each worker streams its shards; the EMA model goes to storage and MLflow."""
    from hkd_core.models import build_model, count_parameters, model_record

    pc = ctx.pc
    init_ray(pc)
    skip = check_distill_inputs(ctx)      # before Ray Train starts: a bad input costs seconds
    run_id = ctx.open_run("distill", {"hkd.trajectories_uri": trajectories["train"]["uri"],
                                      "hkd.teacher_uri": trajectories.get("teacher_uri", "")})
    if skip:
        ctx.tracker.set_tags(run_id, {"hkd.skipped_shards": ",".join(sorted(skip))[:4000]})
    attempt = _bump_attempt(ctx, run_id)
    extra = {"trajectories_prefix": f"{ctx.prefix('trajectories')}/train", "skip_shards": sorted(skip),
             "teacher_key": (teacher or {}).get("teacher_key")}
    if pc.run.train.adversarial_weight > 0:   # the discriminator's real images (the teacher's), once for all workers
        import ray

        extra["images_ref"] = [ray.put(images(pc))]
    if pc.run.eval.curve_n:   # FID/KID against kimg, scored at each checkpoint on rank 0
        ctx.tracker.set_tags(run_id, {"hkd.curve_n": str(pc.run.eval.curve_n)})     # what `hkd compare` labels it with
        extra["eval"] = {"metric": M.CURVE, "fid_n": pc.run.eval.curve_n,
                         "reference_key": evaluation.reference(pc, pc.run.eval.curve_n)[1]}
    result, wall = ctx.fit("distill", workers.distill_loop, run_id, extra)
    state = trainer.checkpoint_state(result)
    model = build_model(pc.run.model.variant, pc.run.hkd_config())
    model.load_state_dict(state["ema"])
    buf = io.BytesIO()
    torch.save(model_record(model.eval()), buf)
    key = f"{ctx.prefix('distill')}/model.pt"
    root = make_store(pc.storage)
    root.put(key, buf.getvalue())
    summary = {"model_key": key, "model_uri": root.uri(key), "kimg": state["nimg"] / 1000,
               "steps": state["step"], "train_s": state["train_s"], "wall_s": wall, "attempts": attempt,
               "params": count_parameters(model), "ray_path": result.path}
    if pc.run.eval.curve_n:
        summary["curve"] = curve(ctx.tracker.history, run_id)
    ctx.tracker.log_metrics(run_id, {M.WALL_S: wall, M.STAGE_TRAIN_S: state["train_s"]}, int(state["nimg"]))
    summary["registered_model"], summary["model_id"] = registry.log_model(ctx.tracker, run_id, model,
                                                                          ctx.pc.tracking.register_model)
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
    store = make_store(pc.storage, f"{ctx.prefix('trajectories')}/train")
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
            raise CheckpointError(f"checkpoint {uri} is unreadable ({type(e).__name__}: {e}); {again}") from None
    model = build_model(ctx.pc.run.model.variant, ctx.pc.run.hkd_config())
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {uri} is not an HKD training checkpoint (no 'model' entry); {again}")
    try:
        load_model_state(model, state["model"], uri)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; or {again}") from None
    log.info("distill: will resume from %s (%.3f kimg)", uri, state.get("nimg", 0) / 1000)
    return uri


def _bump_attempt(ctx: StageContext, run_id: str) -> int:
    tags = ctx.tracker.run_data(run_id).data.tags
    attempt = int(tags.get("hkd.attempt", "0")) + 1
    ctx.tracker.set_tags(run_id, {"hkd.attempt": attempt})
    return attempt


def curve(history, run_id: str) -> list[dict]:
    """The distill run's FID/KID curve (eval.curve_n) with the training seconds at each point, from MLflow;
    ``history(run_id, key)`` reads a metric by step (Tracker.history, or tracking.metric_history over a client)."""
    fid, kid, std = (history(run_id, k) for k in (M.CURVE_FID, M.CURVE_KID, M.CURVE_KID_STD))
    train_s = sorted(history(run_id, M.TRAIN_S).items())
    out = []
    for step in sorted(fid):
        before = [v for s, v in train_s if s <= step]
        out.append({"kimg": step / 1000, "fid": fid[step], "kid": kid.get(step), "kid_std": std.get(step),
                    "train_s": before[-1] if before else None})
    return out


def stage_evaluate(ctx: StageContext, teacher: dict, distill: dict) -> dict:
    """FID/KID of the model (NFE 1) and the teacher (eval.teacher_nfe), spectra and figures, into MLflow."""
    from hkd_core.models import HKD
    from hkd_core.spectra import band_share_metrics

    pc = ctx.pc
    init_ray(pc)
    run_id = ctx.open_run("evaluate", {"hkd.model_uri": distill["model_uri"]})
    t0 = time.perf_counter()
    metrics = evaluation.evaluate(pc, ctx.cfg_dict, distill["model_key"], teacher.get("teacher_key"),
                                  lambda: images(pc), teacher.get("adopted"), progress=ctx.progress)
    model = workers.load_model(pc, distill["model_key"])
    canonical = evaluation.canonical_spectrum(pc, model)     # what runs compare by (issue 24's gauge)
    metrics.update(evaluation.spectrum_metrics(pc, model, canonical))
    if isinstance(model, HKD):
        metrics.update(band_share_metrics(model))        # band masking with a number (issue 13)
    metrics[M.EVAL_S] = time.perf_counter() - t0
    step = int(round(distill["kimg"] * 1000))
    model_id = distill.get("model_id")
    # the headline numbers go on the logged model's page too (MLflow 3): logged once, with its id, they are the
    # run's metrics as well (logging them twice made every eval/* history hold each point twice)
    on_model = {k: v for k, v in metrics.items() if k.startswith("eval/")} if model_id else {}
    ctx.tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in on_model}, step)
    if model_id:
        ctx.tracker.log_metrics(run_id, on_model, step, model_id=model_id)
        ctx.tracker.set_tags(run_id, {"hkd.model_id": model_id})
    evaluation.figures(model, lambda path, folder: ctx.tracker.log_artifact(run_id, path, folder), canonical)
    beside = evaluation.beside_teacher(pc, model, teacher.get("teacher_key"), lambda: images(pc))
    if beside is not None:
        ctx.tracker.log_artifact(run_id, beside, "figures")
        shutil.rmtree(beside.parent, ignore_errors=True)
    ctx.tracker.log_dict(run_id, pc.to_dict(), "config/resolved.json")
    head = headline(ctx.pc, metrics, distill, ctx.parent_run_id, run_id)
    ctx.tracker.log_dict(run_id, head, "headline.json")
    summary = {"metrics": metrics, "n": pc.run.eval.n, "headline": head}
    if distill.get("registered_model"):
        summary["champion"] = registry.crown(ctx.tracker, distill["registered_model"], metrics, pc.run.eval.n, run_id)
    ctx.tracker.end(run_id)
    ctx.finish("evaluate", summary)
    return summary


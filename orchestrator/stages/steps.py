"""The pipeline's four stages as Ray workloads, driven from one process.

Every stage writes under ``<storage root>/<stage>-<hash>/`` (orchestrator/identity.py) and finishes by
writing ``_SUCCESS.json`` there: a stage whose marker exists for the same config is skipped. Each stage has
its own MLflow run (reopened on restart) nested under the pipeline's. The work itself is hkd_core's units:
the teacher's training loop, one shard of trajectories, the distillation loop, one chunk of samples scored.
"""

from __future__ import annotations

import io
import logging
import shutil
import time

import torch
from tqdm.auto import tqdm

from hkd_core import metric_names as M
from hkd_core import provenance
from hkd_core.data import load_images
from orchestrator.config import PipelineConfig
from orchestrator.services import registry
from orchestrator.services.raycluster import env_for_workers, init_ray
from orchestrator.services.storage import make_store, read_uri
from orchestrator.stages import evaluation, trainer, workers
from orchestrator.stages import tasks as ray_tasks
from orchestrator.stages.context import StageContext
from orchestrator.stages.headline import headline
from orchestrator.stages.inputs import check_distill_inputs

log = logging.getLogger(__name__)


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
    given, resume_from = pc.run.teacher.checkpoint, pc.run.teacher.resume_from
    shipped = None if given or resume_from else find_shipped(pc.run.data, pc.run.teacher)
    source = "checkpoint" if given else "shipped" if shipped else "resumed" if resume_from else "trained"
    extra, train_s = {}, None
    if resume_from:  # read and checked here, before any run opens or Ray starts: a bad file costs nothing
        from hkd_core.teachers import resumable_teacher_checkpoint

        blob = read_uri(pc.storage, resume_from, "teacher.resume_from")
        at = resumable_teacher_checkpoint(
            blob, pc.run.teacher, DATASETS[pc.run.data.name].channels, pc.run.data.resolution, resume_from
        )
        log.info(
            "teacher: continues %s from %.1f kimg to %g kimg", resume_from, at, pc.run.teacher.total_kimg
        )
    run_id = ctx.open_run("teacher", {"hkd.teacher_source": source})
    if resume_from:
        import ray

        init_ray(pc)
        ctx.tracker.set_tags(run_id, {"hkd.resumed_from": resume_from, "hkd.resumed_from_kimg": f"{at:g}"})
        extra = {"resume_from": (ray.put(blob), at)}
    if given:
        from hkd_core.teachers import teacher_state_from_checkpoint

        t0 = time.perf_counter()
        blob = read_uri(pc.storage, given, "teacher.checkpoint")
        ema, kimg = teacher_state_from_checkpoint(
            blob, pc.run.teacher, DATASETS[pc.run.data.name].channels, pc.run.data.resolution, given
        )
        kimg, wall = kimg or 0.0, time.perf_counter() - t0
        log.info("teacher: using teacher.checkpoint %s (no training)", given)
    elif shipped is not None:
        t0 = time.perf_counter()
        ema = shipped.load(DATASETS[pc.run.data.name].channels)  # sha256 and architecture checked
        kimg, wall = float(shipped.record.get("kimg", 0.0)), time.perf_counter() - t0
        log.info(
            "teacher: adopted the shipped teacher %s (trained %.0f kimg; no training)", shipped.folder, kimg
        )
        for name in ("record.json", "samples.png"):
            if (shipped.folder / name).is_file():
                ctx.tracker.log_artifact(run_id, shipped.folder / name, "shipped_teacher")
    else:
        import ray

        init_ray(pc)
        result, wall = ctx.fit(
            "teacher", workers.teacher_loop, run_id, {"images_ref": [ray.put(images(pc))], **extra}
        )
        state = trainer.checkpoint_state(result)
        ema, kimg = state["ema"], state["nimg"] / 1000
        train_s = state.get("train_s")  # seconds of training over every segment (resume_from), not this run's
    buf = io.BytesIO()
    torch.save(ema, buf)
    key = f"{ctx.prefix('teacher')}/teacher.pt"
    root = make_store(pc.storage)
    root.put(key, buf.getvalue())
    summary = {
        "kind": "edm",
        "teacher_key": key,
        "kimg": kimg,
        "wall_s": wall,
        "checkpoint_uri": root.uri(key),
        "adopted": str(shipped.folder) if shipped else None,
        "from_checkpoint": given or None,
        "resumed_from": resume_from or None,
        "train_s": train_s,
    }
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
    img_ref = (
        ray.put(images(pc)) if pc.run.teacher.kind == "empirical" else None
    )  # only the empirical needs them
    remote = ray.remote(ray_tasks.generate_shard_task)
    threads = max(1, int(pc.cluster.cpus_per_worker))
    opts = {
        "num_cpus": threads,
        "num_gpus": pc.cluster.gpus_per_worker if pc.cluster.use_gpu else 0,
        "runtime_env": {"env_vars": env_for_workers()},
        "max_retries": 3,
    }
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
            pending.append(
                remote.options(**opts).remote(
                    ctx.pc, img_ref, teacher.get("teacher_key"), prefix, index, first, count, seed, threads
                )
            )
        infos += ray.get(pending)
        bar.update(len(pending))
        bar.close()
        teacher_id = {
            "kind": pc.run.teacher.kind,
            **({"uri": teacher["checkpoint_uri"]} if teacher.get("checkpoint_uri") else {}),
        }
        manifest = build_manifest(
            image_shape(pc.run.data), spec, teacher_id, t.shard_size, [ShardInfo(**i) for i in infos]
        )
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
    from hkd_core.models import count_parameters, model_record

    pc = ctx.pc
    init_ray(pc)
    skip = check_distill_inputs(ctx)  # before Ray Train starts: a bad input costs seconds
    run_id = ctx.open_run(
        "distill",
        {
            "hkd.trajectories_uri": trajectories["train"]["uri"],
            "hkd.teacher_uri": trajectories.get("teacher_uri", ""),
        },
    )
    if skip:
        ctx.tracker.set_tags(run_id, {"hkd.skipped_shards": ",".join(sorted(skip))[:4000]})
    attempt = _bump_attempt(ctx, run_id)
    extra = {
        "trajectories_prefix": f"{ctx.prefix('trajectories')}/train",
        "skip_shards": sorted(skip),
        "shards_checked": True,
        "teacher_key": (teacher or {}).get("teacher_key"),
    }
    if pc.run.eval.curve_n:  # FID/KID against kimg, scored at each checkpoint on rank 0
        ctx.tracker.set_tags(
            run_id, {"hkd.curve_n": str(pc.run.eval.curve_n)}
        )  # what `hkd compare` labels it with
        extra["eval"] = {
            "metric": M.CURVE,
            "fid_n": pc.run.eval.curve_n,
            "reference_key": evaluation.reference(pc, pc.run.eval.curve_n)[1],
        }
    model, state, result, wall = fit_distill(pc, run_id, extra, ctx.prefix("distill"))
    buf = io.BytesIO()
    torch.save(model_record(model), buf)
    key = f"{ctx.prefix('distill')}/model.pt"
    root = make_store(pc.storage)
    root.put(key, buf.getvalue())
    summary = {
        "model_key": key,
        "model_uri": root.uri(key),
        "kimg": state["nimg"] / 1000,
        "steps": state["step"],
        "train_s": state["train_s"],
        "wall_s": wall,
        "attempts": attempt,
        "params": count_parameters(model),
        "ray_path": result.path,
        # what it trained on (every segment, every rank): the weights are bit-equal only on the same kind of CPU
        "compute": state.get("compute", []),
    }
    tag_compute(ctx.tracker, run_id, summary["compute"])
    if pc.run.eval.curve_n:
        summary["curve"] = curve(ctx.tracker.history, run_id)
    ctx.tracker.log_metrics(run_id, {M.WALL_S: wall, M.STAGE_TRAIN_S: state["train_s"]}, int(state["nimg"]))
    summary["registered_model"], summary["model_id"] = registry.log_model(
        ctx.tracker, run_id, model, ctx.pc.tracking.register_model
    )
    ctx.tracker.set_tags(run_id, {"hkd.model_uri": summary["model_uri"]})
    ctx.tracker.end(run_id)
    ctx.finish("distill", summary)
    return summary


def fit_distill(pc: PipelineConfig, run_id: str, extra: dict, name: str, **trainer_kw):
    """Distillation on Ray Train, and the EMA model it ends with: the one fit of the distill stage and of every
    sweep trial (``trainer_kw``: a trial's own workers, storage subfolder, Tune callback, checkpoints kept).
    ``extra`` is what the workers' loop needs beyond the config (trajectories prefix, shards to skip, the
    teacher's key, the in-loop evaluation). Returns (model in eval mode, training state, Ray result, wall s)."""
    from hkd_core.models import build_model

    if pc.run.train.adversarial_weight > 0 and "images_ref" not in extra:
        import ray  # the discriminator's real images (the teacher's), put in Ray's object store once

        extra = {**extra, "images_ref": [ray.put(images(pc))]}
    t = trainer.make_trainer(
        pc, workers.distill_loop, {"pipeline": pc, "run_id": run_id, **extra}, name, **trainer_kw
    )
    result, wall = trainer.fit(t)
    state = trainer.checkpoint_state(result)
    model = build_model(pc.run.model.variant, pc.run.hkd_config())
    model.load_state_dict(state["ema"])
    return model.eval(), state, result, wall


def tag_compute(tracker, run_id: str, compute: list[dict]) -> None:
    """The MLflow tag ``hkd.compute``: where a distill run or sweep trial trained (hkd_core.provenance), in one
    line, so runs that differ in their last digits can be told apart by their machine in the UI."""
    if compute:
        tracker.set_tags(run_id, {"hkd.compute": provenance.summary(compute)[:4000]})


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
        out.append(
            {
                "kimg": step / 1000,
                "fid": fid[step],
                "kid": kid.get(step),
                "kid_std": std.get(step),
                "train_s": before[-1] if before else None,
            }
        )
    return out


def stage_evaluate(ctx: StageContext, teacher: dict, distill: dict) -> dict:
    """FID/KID of the model (NFE 1) and the teacher (eval.teacher_nfe), spectra and figures, into MLflow."""
    from hkd_core.models import HKD
    from hkd_core.spectra import band_share_metrics

    pc = ctx.pc
    init_ray(pc)
    run_id = ctx.open_run("evaluate", {"hkd.model_uri": distill["model_uri"]})
    t0 = time.perf_counter()
    metrics = evaluation.evaluate(
        pc,
        distill["model_key"],
        teacher.get("teacher_key"),
        lambda: images(pc),
        teacher.get("adopted"),
        progress=ctx.progress,
    )
    model = workers.load_model(pc, distill["model_key"])
    canonical = evaluation.canonical_spectrum(pc, model)  # what runs compare by (issue 24's gauge)
    metrics.update(evaluation.spectrum_metrics(pc, model, canonical))
    if isinstance(model, HKD):
        metrics.update(band_share_metrics(model))  # band masking with a number (issue 13)
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
        summary["champion"] = registry.crown(
            ctx.tracker, distill["registered_model"], metrics, pc.run.eval.n, run_id
        )
    ctx.tracker.end(run_id)
    ctx.finish("evaluate", summary)
    return summary

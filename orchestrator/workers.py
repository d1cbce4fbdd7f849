"""What runs on Ray workers: the Ray Train loops (teacher, distillation) and the sampling tasks.

Each function takes plain dicts (the resolved config) so it can be shipped to any node. The numbered
comments mark the Ray-specific lines; everything else is a call into hkd_core.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _pipeline(cfg: dict):
    from .config import from_composed

    return from_composed(cfg)


def _resume_file() -> str | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()                                    # (1) the newest reported checkpoint
    if ckpt is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="hkd-resume-"))
    ckpt.to_directory(str(local))
    files = sorted(local.glob("ckpt-*.pt"))
    return str(files[-1]) if files else None


class CheckpointUploader:
    """Ray Train's ``checkpoint_upload_fn``: each checkpoint file goes to the run's folder in S3 as one PUT
    (an object appears whole or not at all), retried with back-off through an object-store outage for up to
    ``storage.retry_deadline_s``; past that the report fails, so Ray Train restarts the workers from the last
    checkpoint: a checkpoint is late or retried, never silently dropped. Counts what it retried."""

    def __init__(self, storage_cfg):
        self.cfg = storage_cfg
        self.retries = 0          # over the whole attempt
        self.last_s = 0.0         # wall time of the newest upload, retries included
        self.last_retries = 0

    def __call__(self, checkpoint, dir_name: str):
        import dataclasses

        import ray.train
        from ray.train import Checkpoint

        from .storage import S3Store, retry

        storage = ray.train.get_context().get_storage()
        dest = f"{storage.experiment_fs_path.rstrip('/')}/{dir_name}"
        bucket, _, key_prefix = dest.partition("/")
        if bucket != self.cfg.bucket:
            raise ValueError(f"Ray's storage path {dest} is not in storage.bucket {self.cfg.bucket}")
        store = S3Store(dataclasses.replace(self.cfg, prefix=key_prefix))
        _fault_stall("HKD_FAULT_STALL_BEFORE_UPLOAD_S", f"s3://{dest} about to be uploaded")
        t0, before = time.monotonic(), self.retries

        def count(attempt, err):
            self.retries += 1
            print(f"[checkpoint] upload to s3://{dest} failed ({type(err).__name__}); retry {attempt}, "
                  f"{time.monotonic() - t0:.0f} s into the upload", flush=True)

        local = Path(checkpoint.path)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = f.relative_to(local).as_posix()
            if f.stat().st_size < 4 << 30:     # one PUT (S3's limit is 5 GiB)
                put = lambda: store.client.put_object(Bucket=store.cfg.bucket, Key=store.key(rel),  # noqa: E731
                                                      Body=f.read_bytes())
            else:                              # multipart: visible only once complete
                put = lambda: store.client.upload_file(str(f), store.cfg.bucket, store.key(rel))  # noqa: E731
            retry(put, f"checkpoint upload {store.uri(rel)}", self.cfg.retry_deadline_s, count)
        self.last_s, self.last_retries = time.monotonic() - t0, self.retries - before
        if self.last_retries:
            print(f"[checkpoint] s3://{dest} uploaded after {self.last_retries} retries in {self.last_s:.1f} s",
                  flush=True)
        _fault_stall("HKD_FAULT_STALL_AFTER_UPLOAD_S", f"s3://{dest} uploaded, not yet recorded by Ray")
        return Checkpoint(path=dest, filesystem=storage.storage_filesystem)


def _fault_stall(var: str, what: str) -> None:
    """Fault injection for the integration tests, off unless the variable is set: hold a checkpoint write
    at a chosen instant so that a fault lands there for certain (before the upload: an object-store outage
    meets it; after the upload, before Ray Train records it: a kill is most harmful)."""
    stall = float(os.environ.get(var) or 0)
    if stall > 0:
        print(f"[checkpoint] {what}: stalling {stall:g} s ({var})", flush=True)
        time.sleep(stall)


def _reporter(rank: int, tracker, run_id: str | None, total_kimg: float, what: str, storage_cfg=None):
    """metrics_cb / checkpoint_cb for hkd_core's loops: MLflow and a progress line from rank 0, checkpoints
    through Ray (uploaded by CheckpointUploader)."""
    import ray.train
    from ray.train import Checkpoint

    t0 = time.monotonic()
    uploader = CheckpointUploader(storage_cfg) if storage_cfg is not None else None

    def metrics_cb(metrics: dict, kimg: float) -> None:
        if tracker is not None and run_id:
            tracker.log_metrics(run_id, metrics, step=int(round(kimg * 1000)))
        if rank == 0 and "train/loss" in metrics:
            rate = metrics.get("perf/samples_per_s", 0.0)
            eta = (total_kimg - kimg) * 1000 / rate if rate else float("nan")
            print(f"[{what}] {kimg:.2f}/{total_kimg:g} kimg  loss {metrics['train/loss']:.4f}  {rate:.0f} samples/s  "
                  f"elapsed {time.monotonic() - t0:.0f} s  ETA {eta:.0f} s", flush=True)

    def checkpoint_cb(path: str | None, metrics: dict, kimg: float) -> None:
        report = {"kimg": kimg, **metrics}      # Tune's schedulers read these (rank 0) by their metric names
        if kimg >= total_kimg - 1e-9:
            # the end of training: ASHA has a rung at the budget when budget / grace is a power of the
            # reduction factor; without its time attribute this report cannot stop the trial before the
            # trial evaluates itself and sends its final report (orchestrator/sweep.py)
            report.pop("kimg")
        if rank == 0 and path:
            d = Path(tempfile.mkdtemp(prefix="hkd-ckpt-"))
            shutil.copy2(path, d / Path(path).name)
            ray.train.report(report, checkpoint=Checkpoint.from_directory(str(d)),      # (2) upload to storage
                             checkpoint_upload_fn=uploader)
            shutil.rmtree(d, ignore_errors=True)
            if tracker is not None and run_id and uploader is not None:
                tracker.log_metrics(run_id, {"checkpoint/kimg": kimg, "checkpoint/upload_s": uploader.last_s,
                                             "checkpoint/upload_retries": uploader.retries},
                                    step=int(round(kimg * 1000)))
                tracker.flush(deadline_s=0)     # what led up to a recorded checkpoint is not left in memory
        else:
            ray.train.report(report)                                      # (2) every rank reports each time

    return metrics_cb, checkpoint_cb


def _tracker_for_rank0(pc, rank: int):
    if rank != 0:
        return None
    from .tracking import Tracker

    # metrics leave from a background thread: a tracking server that restarts delays them, never training;
    # one HTTP attempt per send (the thread tries again every 2 s) instead of MLflow's minutes of back-off
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return Tracker(pc.tracking, background_flush_s=2.0)


def _count_attempt(tracker, run_id: str | None, resume: str | None) -> None:
    """Each start of the worker group (the first, and every restart by Ray Train's FailureConfig or by a
    rerun of the stage) bumps the run's tag hkd.train_attempts and logs train/attempt (and, when it picked up
    a checkpoint, train/resumed_from_kimg) at the step it starts from."""
    if tracker is None or not run_id:
        return
    n = int(tracker.run_data(run_id).data.tags.get("hkd.train_attempts", "0")) + 1
    tracker.set_tags(run_id, {"hkd.train_attempts": n})
    kimg = float(Path(resume).stem.split("-", 1)[1]) if resume else 0.0       # ckpt-<kimg>.pt
    metrics = {"train/attempt": n, **({"train/resumed_from_kimg": kimg} if resume else {})}
    tracker.log_metrics(run_id, metrics, step=int(round(kimg * 1000)))
    if resume:
        print(f"[train] attempt {n} resumes from {kimg:g} kimg", flush=True)


def distill_loop(config: dict) -> None:
    """Ray Train loop: each rank streams its share of the trajectory shards from S3 into train_hkd."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    from hkd_core.models import build_model
    from hkd_core.train import train_hkd
    from hkd_core.trajectories import TrajectoryDataset, check_shards, read_manifest, without_shards

    from .storage import S3Store

    pc = _pipeline(config["pipeline"])
    ctx = ray.train.get_context()                                         # (3) rank and world size from Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    store = S3Store(pc.storage, config["trajectories_prefix"])
    tr = pc.run.train
    manifest = read_manifest(store)
    # `hkd distill` checked every shard in the driver before starting Ray Train (stages.check_distill_inputs)
    # and, with train.skip_corrupt_shards, hands over the ones to leave out. Sweep trials come here without
    # that driver check, so rank 0 checks again (HEAD requests only); a shard that goes bad later is skipped
    # while streaming when configured (counted on rank 0), else it stops the run, naming the object.
    manifest = without_shards(manifest, set(config.get("skip_shards", [])))
    if rank == 0 and not tr.skip_corrupt_shards:
        check_shards(store, manifest)
    per_rank = tr.batch_size // world
    ds = TrajectoryDataset(store, manifest, rank=rank, world_size=world, seed=tr.seed, epochs=None,
                           skip_corrupt=tr.skip_corrupt_shards)
    loader = DataLoader(ds, batch_size=per_rank, num_workers=0, collate_fn=lambda b: torch.stack([x["states"] for x in b]))
    batches = iter(loader)
    device = ray.train.torch.get_device()                                 # (4) cpu, or this worker's GPU
    torch.manual_seed(tr.seed)             # identical initial weights on every rank
    model = build_model(pc.run.model.variant, pc.run.hkd_config())
    model = ray.train.torch.prepare_model(model)                          # (5) DDP (gloo on CPU, NCCL on GPU)
    sigmas = torch.tensor(manifest.sigmas, dtype=torch.float64)
    tracker = _tracker_for_rank0(pc, rank)
    metrics_cb, checkpoint_cb = _reporter(rank, tracker, config.get("run_id"), tr.total_kimg, "distill", pc.storage)
    eval_cb = make_eval_cb(pc, config["eval"], device) if rank == 0 and config.get("eval") else None
    resume = _resume_file()
    _count_attempt(tracker, config.get("run_id"), resume)
    local = Path(tempfile.mkdtemp(prefix="hkd-distill-"))
    train_hkd(model, lambda step: next(batches), sigmas, total_kimg=tr.total_kimg, max_train_s=tr.max_train_s,
              batch_size=tr.batch_size, lr=tr.lr, koopman_lr_mult=tr.koopman_lr_mult, lr_rampup_kimg=tr.lr_rampup_kimg,
              grad_clip=tr.grad_clip, ema_halflife_kimg=tr.ema_halflife_kimg, ema_rampup=tr.ema_rampup,
              states_per_traj=tr.states_per_traj, lambda1_start=tr.lambda1_start, lambda1_end=tr.lambda1_end,
              lambda1_anneal_kimg=tr.lambda1_anneal_kimg, lambda2=tr.lambda2, perceptual=tr.perceptual,
              seed=tr.seed, rank=rank, world_size=world, device=device, log_every_kimg=tr.log_every_kimg,
              checkpoint_every_kimg=tr.checkpoint_every_kimg, checkpoint_dir=local, resume=resume or False,
              metrics_cb=metrics_cb, checkpoint_cb=checkpoint_cb, eval_cb=eval_cb, progress=False,
              config=pc.run.to_dict())
    if tracker is not None:
        skipped = len(config.get("skip_shards", [])) + len(set(ds.skipped))
        if tr.skip_corrupt_shards:
            tracker.log_metrics(config["run_id"], {"data/skipped_shards": skipped}, step=int(round(tr.total_kimg * 1000)))
        tracker.close()
    shutil.rmtree(local, ignore_errors=True)


def make_eval_cb(pc, spec: dict, device):
    """The metric a sweep's scheduler decides on, computed on rank 0 at every checkpoint from the EMA model:
    the error against the teacher on held-out trajectories, or FID/KID with a small N against cached
    reference statistics. Reported under the sweep's metric name (see orchestrator/sweep.py)."""
    from hkd_core.fid import FeatureStats, InceptionFeatures, decode_reference, fid_from_stats, kid_from_features
    from hkd_core.generate import noise_for_seeds
    from hkd_core.trajectories import load_all, read_manifest

    from .storage import S3Store

    metric = spec["metric"]
    if metric == "eval/mse_vs_teacher":
        store = S3Store(pc.storage, spec["holdout_prefix"])
        states, _ = load_all(store, read_manifest(store))
        x_T, x0 = states[:, 0].float().to(device), states[:, -1].float().to(device)

        def mse(ema, kimg: float) -> dict:
            with torch.no_grad():
                out = torch.cat([ema.sample(x_T=x_T[i:i + 100]) for i in range(0, len(x_T), 100)])
            return {metric: (out - x0).square().flatten(1).mean(1).mean().item()}
        return mse

    feats = InceptionFeatures(pc.run.eval.inception_weights, device=device, batch_size=pc.run.eval.batch_size)
    ref = decode_reference(S3Store(pc.storage, "fid-refs").get(spec["reference_key"]))
    n = int(spec["fid_n"])
    d = pc.run.data
    from hkd_core.data import DATASETS

    x_T = noise_for_seeds(torch.arange(n) + 7_000_000, (DATASETS[d.name].channels, d.resolution, d.resolution))

    def fid(ema, kimg: float) -> dict:
        with torch.no_grad():
            f = torch.cat([feats(ema.sample(x_T=(x_T[i:i + 100] * 80.0).to(device))) for i in range(0, n, 100)])
        if metric == "eval/kid":
            return {metric: kid_from_features(f, ref.features, min(pc.run.eval.kid_subset_size, n))[0]}
        return {metric: fid_from_stats(FeatureStats.of(f), ref.stats)}
    return fid


def teacher_loop(config: dict) -> None:
    """Ray Train loop for the EDM teacher; the images come through the object store."""
    import ray
    import ray.train
    import ray.train.torch

    from hkd_core.pipeline import teacher_denoiser
    from hkd_core.train import train_teacher

    pc = _pipeline(config["pipeline"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    images = ray.get(config["images_ref"][0])                             # (1) the data set, shared by ref
    device = ray.train.torch.get_device()
    torch.manual_seed(pc.run.train.seed)
    net = ray.train.torch.prepare_model(teacher_denoiser(pc.run, images.shape[1]))
    tracker = _tracker_for_rank0(pc, rank)
    t = pc.run.teacher
    metrics_cb, checkpoint_cb = _reporter(rank, tracker, config.get("run_id"), t.total_kimg, "teacher", pc.storage)
    local = Path(tempfile.mkdtemp(prefix="hkd-teacher-"))
    resume = _resume_file()
    _count_attempt(tracker, config.get("run_id"), resume)
    train_teacher(net, images, total_kimg=t.total_kimg, max_train_s=t.max_train_s, batch_size=t.batch_size, lr=t.lr,
                  lr_rampup_kimg=t.lr_rampup_kimg, ema_halflife_kimg=t.ema_halflife_kimg, seed=pc.run.train.seed,
                  rank=rank, world_size=world, device=device, log_every_kimg=t.log_every_kimg,
                  checkpoint_every_kimg=t.checkpoint_every_kimg, checkpoint_dir=local,
                  resume=resume or False, metrics_cb=metrics_cb, checkpoint_cb=checkpoint_cb,
                  progress=False, config=pc.run.to_dict())
    if tracker is not None:
        tracker.close()
    shutil.rmtree(local, ignore_errors=True)


def build_teacher_on_worker(pc, images, teacher_key: str | None):
    """The teacher a sampling task uses: empirical from the images, or the EDM EMA weights from S3."""
    from hkd_core.pipeline import teacher_denoiser, teacher_unet_config
    from hkd_core.teachers import EDMTeacher, EmpiricalTeacher

    from .storage import S3Store

    if pc.run.teacher.kind == "empirical":
        d = pc.run.data
        return EmpiricalTeacher(images, name=f"{d.name}/{d.split}/{images.shape[0]}")
    net = teacher_denoiser(pc.run, images.shape[1])
    state = torch.load(io.BytesIO(S3Store(pc.storage).get(teacher_key)), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return EDMTeacher(net.to(dev), {"unet": teacher_unet_config(pc.run, images.shape[1]).to_dict(),
                                    "checkpoint": S3Store(pc.storage).uri(teacher_key)})


def generate_shard_task(cfg: dict, images, teacher_key: str | None, prefix: str, index: int, first: int, count: int,
                        seed: int, threads: int = 1) -> dict:
    """One shard of teacher trajectories, written to S3 (reused if a whole one is already there)."""
    import dataclasses

    from hkd_core.generate import _existing, generate_shard, sampler_spec

    torch.set_num_threads(threads)
    pc = _pipeline(cfg)
    from .storage import S3Store

    store = S3Store(pc.storage, prefix)
    info = _existing(store, index, first, count, seed)
    if info is None:
        t = pc.run.trajectories
        teacher = build_teacher_on_worker(pc, images, teacher_key)
        shape = tuple(images.shape[1:])
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        info = generate_shard(store, teacher, index, first, count, shape, sampler_spec(t.sampler, t.steps), seed,
                              t.batch_size, dev)
    return dataclasses.asdict(info)


def features_task(cfg: dict, what: dict, seeds: list[int], images=None, teacher_key: str | None = None,
                  model_key: str | None = None, threads: int = 1):
    """Inception features of samples drawn from the given noise seeds: the model at NFE 1, or the teacher at
    ``what['nfe']``. Returns the statistics of its chunk in float64 and the features (``stats_result``)."""
    from hkd_core.data import DATASETS
    from hkd_core.fid import InceptionFeatures
    from hkd_core.generate import noise_for_seeds
    from hkd_core.models import model_from_record
    from hkd_core.sampler import sample_nfe

    from .storage import S3Store

    torch.set_num_threads(threads)
    pc = _pipeline(cfg)
    d = pc.run.data
    shape = (DATASETS[d.name].channels, d.resolution, d.resolution)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    feats = InceptionFeatures(pc.run.eval.inception_weights, device=dev, batch_size=pc.run.eval.batch_size)
    x_T = noise_for_seeds(torch.tensor(seeds), shape).to(dev) * 80.0
    out = []
    with torch.no_grad():
        if what["kind"] == "model":
            rec = torch.load(io.BytesIO(S3Store(pc.storage).get(model_key)), map_location="cpu", weights_only=False)
            model = model_from_record(rec).to(dev)
            for i in range(0, len(seeds), pc.run.eval.batch_size):
                out.append(feats(model.sample(x_T=x_T[i:i + pc.run.eval.batch_size])))
        else:
            teacher = build_teacher_on_worker(pc, images, teacher_key)
            for i in range(0, len(seeds), pc.run.eval.batch_size):
                x = sample_nfe(teacher.denoise, x_T[i:i + pc.run.eval.batch_size], what["nfe"]).x0.clamp(-1, 1)
                out.append(feats(x))
    return stats_result(torch.cat(out))


def stats_result(feats: torch.Tensor) -> dict:
    """What a feature task returns: float64 sums (merged exactly by the driver) and the float32 features
    (KID needs them)."""
    from hkd_core.fid import FeatureStats

    return {**FeatureStats.of(feats).to_dict(), "features": feats.numpy()}


def image_features_task(cfg: dict, images: torch.Tensor, threads: int = 1) -> dict:
    """Inception statistics and features of given images (a chunk of the reference set, or any images)."""
    from hkd_core.fid import InceptionFeatures

    torch.set_num_threads(threads)
    pc = _pipeline(cfg)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    feats = InceptionFeatures(pc.run.eval.inception_weights, device=dev, batch_size=pc.run.eval.batch_size)
    return stats_result(feats(images))


def env_for_workers() -> dict:
    """Variables the workers need that the driver has (endpoints and the credentials file, never the keys)."""
    keys = ("AWS_ENDPOINT_URL", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE", "AWS_DEFAULT_REGION",
            "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "HKD_S3_BUCKET", "HKD_INCEPTION_WEIGHTS", "HKD_CACHE",
            "HKD_DATA_DIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
            "HKD_FAULT_STALL_BEFORE_UPLOAD_S", "HKD_FAULT_STALL_AFTER_UPLOAD_S")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}

"""What runs on Ray workers: the Ray Train loops (teacher, distillation) and what they load (teachers, models,
the Inception weights); the sampling and scoring tasks are in tasks.py.

Each function takes the driver's validated ``PipelineConfig`` as it is (a dataclass, pickled to any node; no
worker composes, parses or validates it again, so a check of a driver-local file never runs on a node without
it) and calls into hkd_core. In the two training loops the numbered comments mark the Ray-specific lines, as in
Ray's own examples; reporting (MLflow, checkpoints, attempts) is ``reporting.LoopReporting``.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import torch

log = logging.getLogger(__name__)


def worker_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def distill_loop(config: dict) -> None:
    """Ray Train loop: each rank streams its share of the trajectory shards into hkd_core's train_hkd."""
    import ray.train
    import ray.train.torch

    from hkd_core.models import build_model
    from hkd_core.train import recipe_extras, train_hkd
    from orchestrator.stages.reporting import LoopReporting

    pc = config["pipeline"]  # the driver's validated PipelineConfig, as it is
    ctx = ray.train.get_context()  # (1) rank and world size from Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    data = TrajectoryStream(
        pc,
        config["trajectories_prefix"],
        config.get("skip_shards", []),
        rank,
        world,
        checked=config.get("shards_checked", False),
    )
    device = ray.train.torch.get_device()  # (2) cpu, or this worker's GPU
    torch.manual_seed(pc.run.train.seed)  # identical initial weights on every rank
    model = build_model(pc.run.model.variant, pc.run.hkd_config())
    tr = pc.run.train
    copied = []
    if pc.run.model.init != "none":  # the same teacher tensors on every rank
        copied = init_from_stored_teacher(pc, model, config.get("teacher_key"))
    m = pc.run.model
    if m.alpha_offset or m.alpha_offset_spread:  # the gauge experiment: alpha starts off zero, same samples
        from hkd_core.gauge import alpha_offsets, offset_alpha

        offset_alpha(model, alpha_offsets(model, m.alpha_offset, m.alpha_offset_spread, seed=tr.seed))
    extra = recipe_extras(
        tr, lambda: stored_teacher_net(pc, config.get("teacher_key")), lambda: real_images(config)
    )
    if rank == 0 and tr.holdout_every_kimg > 0:
        extra["holdout"] = overfitting_sets(pc, config["trajectories_prefix"])
    if device.type == "cpu":  # ~1.2x the training rate on CPU (docs/results/...)
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # (3) DDP
    eval_cb = make_eval_cb(pc, config["eval"], device) if rank == 0 and config.get("eval") else None
    with LoopReporting(
        pc, config.get("run_id"), rank, "distill", tr.total_kimg, max_train_s=tr.max_train_s
    ) as rep:  # (4) reports, resume
        train_hkd(
            model,
            data.batch,
            data.sigmas,
            rank=rank,
            world_size=world,
            device=device,
            checkpoint_dir=rep.local,
            resume=rep.resume or False,
            metrics_cb=data.with_seed_sum(rep.metrics_cb),
            checkpoint_cb=rep.checkpoint_cb,
            eval_cb=eval_cb,
            progress=False,
            config=pc.run.to_dict(),
            teacher_tensors=copied,
            **extra,
            **dataclasses.asdict(tr),
        )
        if tr.skip_corrupt_shards:
            from hkd_core import metric_names as M

            rep.log({M.SKIPPED_SHARDS: data.skipped}, tr.total_kimg)


class TrajectoryStream:
    """This rank's share of the trajectory shards, streamed from storage as batches (``batch(step)``)."""

    def __init__(self, pc, prefix: str, skip: list[str], rank: int, world: int, checked: bool = False):
        from hkd_core.trajectories import check_shards, read_manifest, without_shards
        from orchestrator.services.storage import make_store

        tr = pc.run.train
        store = make_store(pc.storage, prefix)
        self.skip_given = set(skip)
        manifest = without_shards(read_manifest(store), self.skip_given)
        # The driver checked every shard before starting Ray Train (``checked``: the distill stage's
        # inputs.check_distill_inputs, once per sweep for its trials) and, with train.skip_corrupt_shards, hands
        # over the ones to leave out; a loop started without that check has rank 0 check (HEAD requests only). A
        # shard that goes bad later is skipped while streaming when configured (counted on rank 0), else it
        # stops the run, naming the object.
        if rank == 0 and not checked and not tr.skip_corrupt_shards:
            check_shards(store, manifest)
        self._args = (store, manifest, rank, world, tr)
        self.per_rank = tr.batch_size // world
        self.ds, self._it, self._next, self.seed_sum = None, None, None, 0
        self.sigmas = torch.tensor(manifest.sigmas, dtype=torch.float64)

    def _open(self, step: int) -> None:
        """The stream from batch ``step`` on: a resumed run starts where the uninterrupted one would be."""
        from torch.utils.data import DataLoader

        from hkd_core.trajectories import TrajectoryDataset

        store, manifest, rank, world, tr = self._args
        old = self.ds.skipped if self.ds is not None else []
        self.ds = TrajectoryDataset(
            store,
            manifest,
            rank=rank,
            world_size=world,
            seed=tr.seed,
            epochs=None,
            skip_corrupt=tr.skip_corrupt_shards,
            start=step * self.per_rank,
        )
        self.ds.skipped.extend(old)
        self._it = iter(
            DataLoader(
                self.ds,
                batch_size=self.per_rank,
                num_workers=0,
                collate_fn=lambda b: (torch.stack([x["states"] for x in b]), sum(x["seed"] for x in b)),
            )
        )
        self._next = step

    def batch(self, step: int) -> torch.Tensor:
        """Batch ``step`` of this rank: the same tensor whether the run went straight through or was resumed."""
        if step != self._next:
            self._open(step)
            self.seed_sum = 0
        self._next = step + 1
        states, seeds = next(self._it)
        self.seed_sum += seeds
        return states

    def with_seed_sum(self, cb):
        """``cb`` (a metrics callback) that also logs data/seed_sum, the seeds seen since the previous call."""
        if cb is None:
            return None
        from hkd_core import metric_names as M

        def log(metrics: dict, kimg: float) -> None:
            metrics = {**metrics, M.DATA_SEED_SUM: float(self.seed_sum)}
            self.seed_sum = 0
            cb(metrics, kimg)

        return log

    @property
    def skipped(self) -> int:
        return len(self.skip_given) + len(set(self.ds.skipped if self.ds is not None else []))


def real_images(config: dict) -> torch.Tensor:
    """The images the teacher learns from (data.split, data.limit), for the discriminator: from the object store
    when the driver put them there (hkd distill), else loaded on this node (a sweep trial; ``data.root`` or the
    search folders of hkd_core.data)."""
    import ray

    if config.get("images_ref"):
        return ray.get(config["images_ref"][0])
    from hkd_core.data import load_images

    d = config["pipeline"].run.data
    return load_images(d.name, d.split, resolution=d.resolution, limit=d.limit, root=d.root)[0]


def teacher_loop(config: dict) -> None:
    """Ray Train loop for the EDM teacher; the images come through the object store."""
    import ray
    import ray.train
    import ray.train.torch

    from hkd_core.teachers import teacher_denoiser
    from hkd_core.train import train_teacher
    from orchestrator.stages.reporting import LoopReporting

    pc = config["pipeline"]  # the driver's validated PipelineConfig, as it is
    ctx = ray.train.get_context()  # (1) rank and world size from Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    images = ray.get(config["images_ref"][0])  # (2) the data set, shared by ref
    device = ray.train.torch.get_device()  # (3) cpu, or this worker's GPU
    torch.manual_seed(pc.run.train.seed)
    t = pc.run.teacher
    net = ray.train.torch.prepare_model(
        teacher_denoiser(t, images.shape[1], pc.run.data.resolution)
    )  # (4) DDP
    given = config.get(
        "resume_from"
    )  # teacher.resume_from: (object ref of its bytes, kimg), read by the driver
    start_from = (ray.get(given[0]), given[1]) if given else None
    with LoopReporting(
        pc, config.get("run_id"), rank, "teacher", t.total_kimg, start_from, t.max_train_s
    ) as rep:  # (5)
        train_teacher(
            net,
            images,
            seed=pc.run.train.seed,
            rank=rank,
            world_size=world,
            device=device,
            checkpoint_dir=rep.local,
            resume=rep.resume or False,
            metrics_cb=rep.metrics_cb,
            checkpoint_cb=rep.checkpoint_cb,
            progress=False,
            config=pc.run.to_dict(),
            **dataclasses.asdict(t),
        )


def _teacher_weights(pc, teacher_key: str | None, why: str) -> tuple[dict, str]:
    """The teacher's EMA state dict from storage and its URI; ``why`` names the key that needs it."""
    from orchestrator.services.storage import make_store

    if not teacher_key:
        raise ValueError(
            f"{why} needs the teacher's weights, but this run was given no teacher checkpoint "
            f"(teacher.kind={pc.run.teacher.kind!r})"
        )
    store = make_store(pc.storage)
    return torch.load(io.BytesIO(store.get(teacher_key)), map_location="cpu", weights_only=True), store.uri(
        teacher_key
    )


def stored_teacher_net(pc, teacher_key: str | None):
    """The teacher's network (EDMPrecond(UNet)) with its EMA weights from storage, loaded strictly."""
    from hkd_core.checkpoint import load_model_state
    from hkd_core.data import DATASETS
    from hkd_core.teachers import teacher_denoiser

    t = pc.run.train
    wants = "train.perceptual=teacher" if t.perceptual == "teacher" else "train.adversarial_disc=teacher"
    weights, uri = _teacher_weights(pc, teacher_key, wants)
    net = teacher_denoiser(pc.run.teacher, DATASETS[pc.run.data.name].channels, pc.run.data.resolution)
    load_model_state(net, weights, uri)
    return net.eval().requires_grad_(False)


def overfitting_sets(pc, train_prefix: str, n: int | None = None) -> dict[str, torch.Tensor]:
    """The held-out trajectories (beside ``train_prefix``, under .../holdout) and as many training ones (the first
    shards'), for the EMA model's error on both during training; empty where there are no held-out ones."""
    from hkd_core.trajectories import MANIFEST, read_manifest, read_shard
    from orchestrator.services.storage import make_store

    hold_store = make_store(pc.storage, train_prefix.rsplit("/", 1)[0] + "/holdout")
    if pc.run.trajectories.holdout <= 0 or not hold_store.exists(MANIFEST):
        return {}
    hold = torch.cat([read_shard(hold_store, s)["states"] for s in read_manifest(hold_store).shards])
    n = hold.shape[0] if n is None else n
    train_store = make_store(pc.storage, train_prefix)
    train, have = [], 0
    for s in read_manifest(train_store).shards:
        if have >= n:
            break
        train.append(read_shard(train_store, s)["states"])
        have += train[-1].shape[0]
    return {"holdout": hold[:n], "train": torch.cat(train)[:n]}


def init_from_stored_teacher(pc, model, teacher_key: str | None) -> list[str]:
    """model.init: copy the teacher's tensors (its EMA weights in storage) into the fresh student."""
    from hkd_core.teacher_init import init_from_teacher

    weights, uri = _teacher_weights(pc, teacher_key, f"model.init={pc.run.model.init}")
    names = init_from_teacher(model, weights, pc.run.model.init, uri)
    log.info(
        "model.init=%s: %d tensors (%d values) from %s",
        pc.run.model.init,
        len(names),
        sum(model.state_dict()[n].numel() for n in names),
        uri,
    )
    return names


def make_eval_cb(pc, spec: dict, device):
    """What is scored on rank 0 at every checkpoint from the EMA model: the metric a sweep's scheduler decides
    on (the error against the teacher on held-out trajectories, or FID/KID on the first ``fid_n`` evaluation
    seeds against cached reference statistics, under the sweep's metric name), or with ``metric`` = M.CURVE
    the FID/KID curve of a pipeline's distill stage (eval.curve_n)."""
    from hkd_core import evaluation as E
    from hkd_core import metric_names as M
    from hkd_core.fid import InceptionFeatures, decode_reference
    from hkd_core.trajectories import load_all, read_manifest
    from orchestrator.services.storage import make_store

    metric = spec["metric"]
    if metric == M.MSE_VS_TEACHER:
        store = make_store(pc.storage, spec["holdout_prefix"])
        states, _ = load_all(store, read_manifest(store))
        return lambda ema, kimg: {metric: E.holdout_error(ema, states)}

    e = pc.run.eval
    feats = InceptionFeatures(inception_weights(pc), device=device, batch_size=e.batch_size)
    ref = decode_reference(make_store(pc.storage, "fid-refs").get(spec["reference_key"]))
    seeds = E.eval_seeds(e, int(spec["fid_n"]))

    final_is_evaluated = metric == M.CURVE and int(spec["fid_n"]) == e.n
    total = pc.run.train.total_kimg

    def proxy(ema, kimg: float) -> dict:
        if final_is_evaluated and kimg >= total - 1e-9:
            return {}  # the evaluate stage scores the final model on the same seeds and reference: not twice
        s = E.score_in_process(
            E.model_generator(ema),
            seeds,
            E.image_shape(pc.run.data),
            feats,
            ref,
            e.kid_subset_size,
            e.batch_size,
            device,
        )
        if metric == M.CURVE:  # eval.curve_n: FID/KID against images seen, as curves in MLflow
            return {M.CURVE_FID: s["fid"], M.CURVE_KID: s["kid"], M.CURVE_KID_STD: s["kid_std"]}
        return {metric: s["kid"] if metric == M.KID else s["fid"]}

    return proxy


def load_teacher(pc, images, teacher_key: str | None):
    """The teacher a sampling task uses: empirical from the images, or the EDM EMA weights from storage."""
    from hkd_core.teachers import build_teacher
    from orchestrator.services.storage import make_store

    weights, source = None, ""
    if pc.run.teacher.kind != "empirical":
        store = make_store(pc.storage)
        weights = torch.load(io.BytesIO(store.get(teacher_key)), map_location="cpu", weights_only=True)
        source = store.uri(teacher_key)
    teacher = build_teacher(pc.run.data, pc.run.teacher, images, weights, source)
    if hasattr(teacher, "net"):
        teacher.net.to(worker_device())
    return teacher


def load_model(pc, model_key: str):
    """A distilled model from its record in storage (model_record: class, config, variant, weights)."""
    from hkd_core.models import model_from_record
    from orchestrator.services.storage import make_store

    data = make_store(pc.storage).get(model_key)
    return model_from_record(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False))


def inception_weights(pc):
    """The FID Inception weights on this node: its own file, else the bucket's copy fetched into its cache
    (orchestrator.services.datasets.ensure_weights), so that a task on any node of a cluster finds them."""
    from orchestrator.services.datasets import ensure_weights

    return ensure_weights(pc.storage, pc.run.eval.inception_weights)

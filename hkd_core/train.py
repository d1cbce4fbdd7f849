"""Training loops: the EDM teacher (``train_teacher``) and HKD or a baseline (``train_hkd``).

Both are single functions counting progress in images seen (kimg) over all ranks. Their schedule is the
keys of ``TrainConfig`` / ``TeacherConfig`` (hkd_core/config.py, the one place defaults live, with units
in the names): ``train_hkd(model, states, sigmas, **asdict(cfg.train))``. They run as they are in one
process, and inside a data-parallel worker
(a Ray Train worker, say) when given ``rank``/``world_size``, a DDP-wrapped model, this rank's batches, a
``metrics_cb`` and a ``checkpoint_dir``: nothing here knows which launcher started it.
Seeds: rank r of world size w draws from ``seed * w + r`` (as in DiT); batch k draws from (that, k), so a
resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from . import metric_names as M
from .config import TeacherConfig, TrainConfig
from .edm import EDMLoss, EDMPrecond
from .loop import (
    CheckpointCallback,
    EvalCallback,
    MetricsCallback,
    NonFiniteLossError,
    TensorBatches,
    _Loop,
    lr_factor,
    unwrap,
)
from .losses import HKDLoss, LambdaSchedule, perceptual_distance

__all__ = ["NonFiniteLossError", "TensorBatches", "lr_factor", "train_hkd", "train_teacher", "unwrap"]

log = logging.getLogger(__name__)


def _batch_fn(
    data, batch_per_rank: int, seed: int, rank: int, world_size: int
) -> Callable[[int], torch.Tensor]:
    """A tensor becomes deterministic random batches; an iterator of batches is consumed as it comes."""
    if isinstance(data, torch.Tensor):
        return TensorBatches(data, batch_per_rank, seed, rank, world_size)
    if callable(data):
        return data
    it: Iterator = iter(data)
    return lambda step: next(it)


def _check_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {world_size} workers")
    return batch_size // world_size


def train_teacher(
    denoiser: nn.Module,  # EDMPrecond(UNet), possibly DDP-wrapped
    data,  # images (N, C, H, W) in [-1, 1], or an iterator of this rank's batches
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    checkpoint_dir=None,  # folder for checkpoints (rank 0 writes); None: no checkpoints
    resume=True,  # True: newest in checkpoint_dir; a path; or False
    metrics_cb: MetricsCallback | None = None,
    checkpoint_cb: CheckpointCallback | None = None,
    progress: bool = True,
    config: dict | None = None,  # stored in checkpoints, for lineage
    p_mean: float = -1.2,
    p_std: float = 1.2,  # ln(sigma) ~ N(p_mean, p_std^2)
    **teacher,  # TeacherConfig's keys (total_kimg, batch_size, lr, ...): its defaults
) -> dict:
    """Train an EDM denoiser with EDM's loss; returns kimg, steps, train_s, the ``ema`` copy and metrics.
    Call as ``train_teacher(net, images, seed=..., **asdict(cfg.teacher))``."""
    if not isinstance(unwrap(denoiser), EDMPrecond):
        raise TypeError("train_teacher expects an EDMPrecond-wrapped network")
    t = _settings(TeacherConfig, teacher)
    get = _batch_fn(data, _check_batch(t.batch_size, world_size), seed, rank, world_size)
    loss_fn = EDMLoss(p_mean=p_mean, p_std=p_std)
    base = seed * world_size + rank

    def step_loss(step: int, kimg: float) -> dict:
        x0 = get(step).to(device, torch.float32)
        g = torch.Generator(device="cpu").manual_seed(base * 1_000_003 + step + 7)
        return {"loss": loss_fn(denoiser, x0, generator=g if x0.device.type == "cpu" else None).mean()}

    loop = _Loop(
        denoiser,
        t,
        {},
        rank=rank,
        device=device,
        config=config or {},
        checkpoint_dir=checkpoint_dir,
        metrics_cb=metrics_cb,
        checkpoint_cb=checkpoint_cb,
        eval_cb=None,
        progress=progress,
        desc="teacher",
    )
    loop.restore(resume)
    return loop.run(step_loss)


def _lpips_paths(t) -> dict:
    """train.lpips_vgg_path / lpips_lin_path for perceptual=lpips (config validation has checked them)."""
    if t.perceptual != "lpips":
        return {}
    if not (t.lpips_vgg_path and t.lpips_lin_path):
        raise ValueError(
            "train.perceptual=lpips needs train.lpips_vgg_path and train.lpips_lin_path (local files)"
        )
    return {"vgg_path": t.lpips_vgg_path, "lin_path": t.lpips_lin_path}


def recipe_extras(t, teacher_net, real_images) -> dict:
    """train_hkd's keyword arguments that the recipe ``t`` (a TrainConfig) asks for, each loaded only when asked:
    the frozen teacher network for ``perceptual=teacher`` (and for ``adversarial_disc=teacher``) and the
    discriminator's real images for ``adversarial_weight > 0``. ``teacher_net`` and ``real_images`` are
    zero-argument loaders."""
    extra: dict = {}
    adversarial = t.adversarial_weight > 0
    wants_teacher = t.perceptual == "teacher" or (adversarial and t.adversarial_disc == "teacher")
    net = teacher_net() if wants_teacher else None  # loaded once for both
    if t.perceptual == "teacher":  # the distance lives in the frozen teacher's features
        extra["perceptual_kwargs"] = {"denoiser": net}
    if adversarial:  # the discriminator's real images (beyond the paper)
        extra["real_images"] = real_images()
        if t.adversarial_disc == "teacher":  # its features are the teacher's
            extra["adversarial_teacher"] = net
    return extra


def train_hkd(
    model: nn.Module,  # HKD, KD or KDM (see models.build_model), possibly DDP-wrapped
    trajectories,  # states (N, S+1, C, H, W), or an iterator of this rank's batches
    sigmas: torch.Tensor,  # (S+1,) sigma grid of the stored trajectories
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    checkpoint_dir=None,  # folder for checkpoints (rank 0 writes); None: no checkpoints
    resume=True,  # True: newest in checkpoint_dir; a path; or False
    metrics_cb: MetricsCallback | None = None,
    checkpoint_cb: CheckpointCallback | None = None,
    eval_cb: EvalCallback
    | None = None,  # (EMA model, kimg) -> metrics at each checkpoint, e.g. a proxy for ASHA
    progress: bool = True,
    config: dict | None = None,  # stored in checkpoints, for lineage
    perceptual_kwargs: dict
    | None = None,  # e.g. LPIPS weight paths; perceptual=teacher: {"denoiser": teacher}
    teacher_tensors=(),  # names of the parameters model.init copied (lr x train.teacher_lr_mult)
    holdout: dict[str, torch.Tensor]
    | None = None,  # {"holdout": states, "train": states}: trajectories the EMA
    # model's error is measured on every holdout_every_kimg (rank 0)
    real_images=None,  # train.adversarial_weight > 0: real images (N, C, H, W) in [-1, 1] (or a
    # function step -> this rank's batch) for the discriminator
    adversarial_teacher: nn.Module | None = None,  # train.adversarial_disc=teacher: the teacher (EDMPrecond)
    **train,  # TrainConfig's keys (total_kimg, batch_size, lr, ...): its defaults
) -> dict:
    """Distil stored teacher trajectories into a one-step model; returns kimg, steps, train_s, ``ema``, metrics.
    Call as ``train_hkd(model, states, sigmas, **asdict(cfg.train))``."""
    t = _settings(TrainConfig, train)
    if t.latent_weight is None:  # the config's default: on where the model has Koopman latents
        from .config import LATENT_WEIGHT

        evolves = any(getattr(k, "mode", "none") != "none" for k in getattr(unwrap(model), "koopman", []))
        t = dataclasses.replace(t, latent_weight=LATENT_WEIGHT if evolves else 0.0)
    get = _batch_fn(trajectories, _check_batch(t.batch_size, world_size), t.seed, rank, world_size)
    if t.perceptual == "teacher" and not (perceptual_kwargs or {}).get("denoiser"):
        raise ValueError(
            "train.perceptual=teacher needs the teacher network: pass perceptual_kwargs={'denoiser': "
            "teacher} (the orchestrator loads it from the teacher stage's weights)"
        )
    kwargs = dict(perceptual_kwargs or _lpips_paths(t))
    if t.perceptual == "teacher":
        kwargs.setdefault("sigma", t.perceptual_sigma)
    distance = perceptual_distance(t.perceptual, **kwargs)
    if isinstance(distance, nn.Module):
        distance = distance.to(device)
    loss_fn = HKDLoss(
        t.states_per_traj,
        LambdaSchedule(t.lambda1_start, t.lambda1_end, t.lambda1_anneal_kimg),
        t.lambda2,
        distance,
        t.xT_weight,
        t.tcons_sigma_min,
        t.latent_weight,
        t.gauge_weight,
    )
    for key in ("latent_weight", "gauge_weight"):
        if getattr(t, key) > 0 and not hasattr(unwrap(model), "koopman"):
            raise ValueError(
                f"train.{key}={getattr(t, key)} needs per-level Koopman latents; "
                f"{type(unwrap(model)).__name__} has none (use train.{key}=0)"
            )
    loss_fn.candidates(torch.as_tensor(sigmas))  # refuses too few intermediate states before the first step
    adv = _adversarial(t, real_images, rank, world_size, device, adversarial_teacher)
    loss_fn.keep_x0 = adv is not None
    base = t.seed * world_size + rank

    def step_loss(step: int, kimg: float) -> dict:
        states = get(step).to(device)
        g = torch.Generator().manual_seed(base * 1_000_003 + step + 11)
        out = loss_fn(model, states, sigmas, kimg, g)
        out["lambda1"] = torch.tensor(loss_fn.lambda1(kimg))
        x0 = out.pop("x0", None)
        if adv is not None and adv.active(kimg):
            out.update(adv.discriminator_step(x0, step))
            out["loss_adv"] = adv.generator_loss(x0)
            out["loss"] = out["loss"] + adv.weight * out["loss_adv"]
        return out

    mult = t.koopman_lr_mult
    named = {n: t.teacher_lr_mult for n in teacher_tensors}
    loop = _Loop(
        model,
        t,
        {".alpha": mult, ".beta": mult, "generator": mult},
        rank=rank,
        device=device,
        config=config or {},
        checkpoint_dir=checkpoint_dir,
        metrics_cb=metrics_cb,
        checkpoint_cb=checkpoint_cb,
        eval_cb=eval_cb,
        progress=progress,
        desc="distill",
        named_mults=named,
        log_cb=_holdout_cb(holdout) if holdout else None,
        log_cb_every_kimg=t.holdout_every_kimg,
        extras={"adversarial": adv} if adv is not None else None,
    )
    loop.restore(resume)
    return loop.run(step_loss)


def _adversarial(t: TrainConfig, real_images, rank: int, world_size: int, device, teacher=None):
    """The adversarial term of train.adversarial_weight > 0 (beyond the paper), else None. Its discriminator
    starts from the same weights on every rank (seeded by train.seed); each rank draws its own real batches."""
    if not t.adversarial_weight:
        return None
    if real_images is None:
        raise ValueError(
            f"train.adversarial_weight={t.adversarial_weight} needs real images for the "
            f"discriminator: pass real_images (the orchestrator loads the data set's training split)"
        )
    from .adversarial import AdversarialTerm, Discriminator, TeacherFeatureDiscriminator

    if t.adversarial_disc == "teacher" and teacher is None:
        raise ValueError(
            "train.adversarial_disc=teacher needs the teacher network: pass adversarial_teacher=teacher (the "
            "orchestrator loads it from the teacher stage's weights)"
        )
    real = _batch_fn(real_images, t.batch_size // world_size, t.seed + 1, rank, world_size)
    probe = real(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed + 1)
        if t.adversarial_disc == "teacher":
            disc = TeacherFeatureDiscriminator(teacher, t.adversarial_sigma, seed=t.seed + 2)
        else:
            disc = Discriminator(probe.shape[1], probe.shape[-1])
    return AdversarialTerm(
        disc, real, t.adversarial_weight, t.adversarial_lr, t.adversarial_start_kimg, device
    )


def _holdout_cb(sets: dict[str, torch.Tensor]) -> EvalCallback:
    """The EMA model's MSE against the teacher's x_0 on fixed trajectories: the held-out ones (unseen noise) and
    as many training ones; when the two part, the student is fitting its trajectories rather than the teacher's
    map (the overfitting check of issue 23)."""
    from .evaluation import holdout_error

    names = {"holdout": M.TRAIN_HOLDOUT_MSE, "train": M.TRAIN_FIT_MSE}
    unknown = sorted(set(sets) - set(names))
    if unknown:
        raise ValueError(f"holdout sets {unknown} are unknown; give 'holdout' and/or 'train'")
    return lambda ema, kimg: {names[k]: holdout_error(ema, v) for k, v in sets.items() if len(v)}


def _settings(cls, given: dict):
    """The config dataclass from keyword arguments: its defaults are the only defaults; unknown keys named."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} key(s) {unknown}; allowed: {sorted(names)}")
    return cls(**given)

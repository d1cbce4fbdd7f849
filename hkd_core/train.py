"""Training loops: the EDM teacher (``train_teacher``) and HKD or a baseline (``train_hkd``).

Both are single functions counting progress in images seen (kimg) over all ranks. Their schedule is the
keys of ``TrainConfig`` / ``TeacherConfig`` (hkd_core/config.py, the one place defaults live, with units
in the names): ``train_hkd(model, states, sigmas, **asdict(cfg.train))``. They run as they are in one process, and inside a data-parallel worker
(a Ray Train worker, say) when given ``rank``/``world_size``, a DDP-wrapped model, this rank's batches, a
``metrics_cb`` and a ``checkpoint_dir``: nothing here knows which launcher started it.
Seeds: rank r of world size w draws from ``seed * w + r`` (as in DiT); batch k draws from (that, k), so a
resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
import torch.distributed as dist
from tqdm.auto import tqdm

from . import metric_names as M
from .checkpoint import load_checkpoint, load_model_state, save_checkpoint
from .config import TeacherConfig, TrainConfig
from .edm import EDMLoss, EDMPrecond
from .losses import HKDLoss, LambdaSchedule, perceptual_distance

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict, float], None]                    # (metrics, kimg), rank 0 only
EvalCallback = Callable[[nn.Module, float], dict]                   # (EMA model, kimg) -> metrics, rank 0 only
CheckpointCallback = Callable[["str | None", dict, float], None]   # (path on rank 0 else None, metrics, kimg)


class TensorBatches:
    """Deterministic random batches from an in-memory tensor: batch k of rank r is a function of (seed, r, k)."""

    def __init__(self, data: torch.Tensor, batch_per_rank: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.data, self.batch = data, batch_per_rank
        self.seed = seed * world_size + rank

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.data[torch.randint(0, self.data.shape[0], (self.batch,), generator=g)]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _param_groups(model: nn.Module, lr_mults: dict[str, float], named: dict[str, float] | None = None) -> list[dict]:
    """One Adam group per learning-rate multiplier: a parameter whose name ends with a key of ``lr_mults`` gets
    its multiplier, else one named in ``named`` (e.g. the tensors copied from the teacher), else 1."""
    groups: dict[float, list] = {}
    named = named or {}
    for name, p in model.named_parameters():
        mult = next((m for suffix, m in lr_mults.items() if name.endswith(suffix)), named.get(name, 1.0))
        groups.setdefault(mult, []).append(p)
    return [{"params": ps, "lr_mult": m} for m, ps in groups.items()]


def lr_factor(s, kimg: float, train_s: float = 0.0) -> float:
    """The learning rate as a fraction of ``s.lr`` at this point of a run: the linear ramp-up over
    lr_rampup_kimg times, with ``lr_schedule=cosine``, a cosine from 1 down to ``lr_end_frac`` over the run.
    The run's progress is the larger of kimg / total_kimg and train_s / max_train_s, so the decay ends where
    the run ends, whichever budget ends it (equal images or equal seconds)."""
    ramp = min(1.0, kimg / s.lr_rampup_kimg) if s.lr_rampup_kimg > 0 else 1.0
    if getattr(s, "lr_schedule", "constant") != "cosine":
        return ramp
    done = [kimg / s.total_kimg] if math.isfinite(s.total_kimg) else []
    if s.max_train_s:
        done.append(train_s / s.max_train_s)
    p = min(1.0, max(0.0, max(done, default=0.0)))
    return ramp * (s.lr_end_frac + (1 - s.lr_end_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _update_ema(ema: nn.Module, model: nn.Module, nimg: float, batch: int, halflife_kimg: float, rampup: float):
    halflife = halflife_kimg * 1000
    if rampup:
        halflife = min(halflife, nimg * rampup)
    beta = 0.5 ** (batch / max(halflife, 1e-8))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm.detach(), 1 - beta)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def _mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


class _Loop:
    """The engine behind both loops: optimiser, lr ramp-up, EMA, logging, checkpoint and resume.

    ``s`` holds the schedule (a TrainConfig or a TeacherConfig: total_kimg, max_train_s, batch_size, lr,
    lr_rampup_kimg, grad_clip, ema_halflife_kimg, ema_rampup, log_every_kimg, checkpoint_every_kimg)."""

    def __init__(self, model: nn.Module, s, lr_mults: dict[str, float], *, rank: int, device, config: dict,
                 checkpoint_dir, metrics_cb, checkpoint_cb, eval_cb, progress: bool, desc: str,
                 named_mults: dict[str, float] | None = None, log_cb: EvalCallback | None = None,
                 log_cb_every_kimg: float = 0.0, extras: dict | None = None):
        self.model, self.raw, self.s = model, unwrap(model), s
        self.ema = copy.deepcopy(self.raw).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(_param_groups(self.raw, lr_mults, named_mults), lr=s.lr)
        # log_cb: (EMA model, kimg) -> metrics, on rank 0 at the first log point past every log_cb_every_kimg
        self.log_cb, self.log_cb_every = log_cb, log_cb_every_kimg
        self.is_main, self.device, self.config, self.desc = rank == 0, device, config, desc
        self.checkpoint_dir, self.metrics_cb, self.checkpoint_cb, self.eval_cb = (checkpoint_dir, metrics_cb,
                                                                                  checkpoint_cb, eval_cb)
        self.progress = progress
        # extras: {name: object with state_dict/load_state_dict} that train beside the model (a discriminator),
        # saved in every checkpoint and restored on resume
        self.extras = extras or {}
        self.step, self.nimg, self.train_s = 0, 0.0, 0.0
        self.metrics: dict[str, float] = {}

    def restore(self, resume) -> None:
        """resume: True (the newest checkpoint in checkpoint_dir, if any), a path, or False."""
        src = self.checkpoint_dir if resume is True else (resume or None)
        if resume is True and (self.checkpoint_dir is None or not Path(self.checkpoint_dir).is_dir()):
            src = None   # nothing written yet: a fresh start
        state = load_checkpoint(src, map_location=self.device) if src is not None else None
        if state is None:
            return
        load_model_state(self.raw, state["model"], str(src))
        load_model_state(self.ema, state["ema"], str(src))
        self.opt.load_state_dict(state["optimizer"])
        missing = sorted(set(self.extras) - set(state.get("extras", {})))
        if missing:
            raise ValueError(f"{self.desc}: the checkpoint {src} holds no state for {missing} (it was written by a "
                             f"run without them); resume it with the config it was written with, or start afresh")
        for name, obj in self.extras.items():
            obj.load_state_dict(state["extras"][name])
        self.step, self.nimg, self.train_s = state["step"], state["nimg"], state["train_s"]
        log.info("%s: resumed from %s at %.3f kimg (step %d)", self.desc, src, self.nimg / 1000, self.step)

    def done(self) -> bool:
        s = self.s
        return self.nimg / 1000 >= s.total_kimg - 1e-9 or (s.max_train_s is not None and self.train_s >= s.max_train_s)

    def checkpoint(self, kimg: float) -> None:
        if self.is_main and self.eval_cb is not None:
            # evaluated at each checkpoint (rank 0): what a scheduler such as ASHA decides on
            evals = self.eval_cb(self.ema, kimg)
            self.metrics = {**self.metrics, **evals}
            if self.metrics_cb is not None:
                self.metrics_cb(evals, kimg)
        path = None
        if self.is_main and self.checkpoint_dir is not None:
            path = str(save_checkpoint(self.checkpoint_dir, {
                "model": self.raw.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "step": self.step, "nimg": self.nimg, "train_s": self.train_s, "config": self.config,
                **({"extras": {k: v.state_dict() for k, v in self.extras.items()}} if self.extras else {})}, kimg))
        if self.checkpoint_cb is not None:
            self.checkpoint_cb(path, dict(self.metrics), kimg)

    def optimizer_step(self, step_loss: Callable[[int, float], dict]) -> dict:
        s = self.s
        factor = lr_factor(s, self.nimg / 1000, self.train_s)
        for g in self.opt.param_groups:
            g["lr"] = s.lr * g["lr_mult"] * factor
        losses = step_loss(self.step, self.nimg / 1000)
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        clip = s.grad_clip if s.grad_clip > 0 else float("inf")
        losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), clip)
        self.opt.step()
        self.step += 1
        self.nimg += s.batch_size
        _update_ema(self.ema, self.raw, self.nimg, s.batch_size, s.ema_halflife_kimg, s.ema_rampup)
        return {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in losses.items()} | {"_lr": s.lr * factor}

    def run(self, step_loss: Callable[[int, float], dict]) -> dict:
        s = self.s
        finite = math.isfinite(s.total_kimg)
        bar = tqdm(total=s.total_kimg if finite else None, initial=min(self.nimg / 1000, s.total_kimg), unit="kimg",
                   desc=self.desc, disable=not (self.progress and self.is_main),
                   bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}]")
        next_log = (int(self.nimg / 1000 / s.log_every_kimg) + 1) * s.log_every_kimg
        next_ckpt = (int(self.nimg / 1000 / s.checkpoint_every_kimg) + 1) * s.checkpoint_every_kimg
        every = self.log_cb_every
        next_cb = (int(self.nimg / 1000 / every) + 1) * every if self.log_cb is not None and every > 0 else math.inf
        acc: dict[str, float] = {}
        n_acc, t_window, img_window = 0, time.perf_counter(), 0
        self.model.train()
        while not self.done():
            t0 = time.perf_counter()
            values = self.optimizer_step(step_loss)
            self.train_s += time.perf_counter() - t0
            cur_lr = values.pop("_lr")
            for k, v in values.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc, img_window = n_acc + 1, img_window + s.batch_size
            kimg = self.nimg / 1000
            bar.update(min(kimg, s.total_kimg) - bar.n)
            if kimg >= next_log - 1e-9 or self.done():
                now = time.perf_counter()
                vals = _mean_over_ranks({M.train(k): v / n_acc for k, v in acc.items()}, self.device)
                self.metrics = {**vals, M.TRAIN_LR: cur_lr, M.TRAIN_KIMG: kimg, M.TRAIN_S: self.train_s,
                                M.SAMPLES_PER_S: img_window / max(now - t_window, 1e-9)}
                if self.is_main and (kimg >= next_cb - 1e-9 or (self.done() and math.isfinite(next_cb))):
                    self.metrics.update(self.log_cb(self.ema, kimg))     # not counted in train_s
                    next_cb = (int(kimg / every) + 1) * every
                if self.is_main:
                    bar.set_postfix(loss=f"{self.metrics[M.TRAIN_LOSS]:.4f}")
                    if self.metrics_cb is not None:
                        self.metrics_cb(self.metrics, kimg)
                acc, n_acc, t_window, img_window = {}, 0, time.perf_counter(), 0
                next_log = (int(kimg / s.log_every_kimg) + 1) * s.log_every_kimg
            if kimg >= next_ckpt - 1e-9 or self.done():
                self.checkpoint(kimg)
                next_ckpt = (int(kimg / s.checkpoint_every_kimg) + 1) * s.checkpoint_every_kimg
        bar.close()
        self.model.eval()
        return {"kimg": self.nimg / 1000, "steps": self.step, "train_s": self.train_s, "ema": self.ema,
                "model": self.raw, "metrics": self.metrics, "kimg_per_step": s.batch_size / 1000}


def _batch_fn(data, batch_per_rank: int, seed: int, rank: int, world_size: int) -> Callable[[int], torch.Tensor]:
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
    denoiser: nn.Module,                 # EDMPrecond(UNet), possibly DDP-wrapped
    data,                                # images (N, C, H, W) in [-1, 1], or an iterator of this rank's batches
    *,
    seed: int = 0,
    rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
    checkpoint_dir=None,                 # folder for checkpoints (rank 0 writes); None: no checkpoints
    resume=True,                         # True: newest in checkpoint_dir; a path; or False
    metrics_cb: MetricsCallback | None = None,
    checkpoint_cb: CheckpointCallback | None = None,
    progress: bool = True,
    config: dict | None = None,          # stored in checkpoints, for lineage
    p_mean: float = -1.2, p_std: float = 1.2,   # ln(sigma) ~ N(p_mean, p_std^2)
    **teacher,                           # TeacherConfig's keys (total_kimg, batch_size, lr, ...): its defaults
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

    loop = _Loop(denoiser, t, {}, rank=rank, device=device, config=config or {}, checkpoint_dir=checkpoint_dir,
                 metrics_cb=metrics_cb, checkpoint_cb=checkpoint_cb, eval_cb=None, progress=progress, desc="teacher")
    loop.restore(resume)
    return loop.run(step_loss)


def _lpips_paths(t) -> dict:
    """train.lpips_vgg_path / lpips_lin_path for perceptual=lpips (config validation has checked them)."""
    if t.perceptual != "lpips":
        return {}
    if not (t.lpips_vgg_path and t.lpips_lin_path):
        raise ValueError("train.perceptual=lpips needs train.lpips_vgg_path and train.lpips_lin_path (local files)")
    return {"vgg_path": t.lpips_vgg_path, "lin_path": t.lpips_lin_path}


def train_hkd(
    model: nn.Module,                    # HKD, KD or KDM (see models.build_model), possibly DDP-wrapped
    trajectories,                        # states (N, S+1, C, H, W), or an iterator of this rank's batches
    sigmas: torch.Tensor,                # (S+1,) sigma grid of the stored trajectories
    *,
    rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
    checkpoint_dir=None,                 # folder for checkpoints (rank 0 writes); None: no checkpoints
    resume=True,                         # True: newest in checkpoint_dir; a path; or False
    metrics_cb: MetricsCallback | None = None,
    checkpoint_cb: CheckpointCallback | None = None,
    eval_cb: EvalCallback | None = None, # (EMA model, kimg) -> metrics at each checkpoint, e.g. a proxy for ASHA
    progress: bool = True,
    config: dict | None = None,          # stored in checkpoints, for lineage
    perceptual_kwargs: dict | None = None,  # e.g. LPIPS weight paths; perceptual=teacher: {"denoiser": teacher}
    teacher_tensors=(),                  # names of the parameters model.init copied (lr x train.teacher_lr_mult)
    holdout: dict[str, torch.Tensor] | None = None,  # {"holdout": states, "train": states}: trajectories the EMA
                                         # model's error is measured on every holdout_every_kimg (rank 0)
    real_images=None,                    # train.adversarial_weight > 0: real images (N, C, H, W) in [-1, 1] (or a
                                         # function step -> this rank's batch) for the discriminator
    **train,                             # TrainConfig's keys (total_kimg, batch_size, lr, ...): its defaults
) -> dict:
    """Distil stored teacher trajectories into a one-step model; returns kimg, steps, train_s, ``ema``, metrics.
    Call as ``train_hkd(model, states, sigmas, **asdict(cfg.train))``."""
    t = _settings(TrainConfig, train)
    if t.latent_weight is None:      # the config's default: on where the model has Koopman latents
        from .config import LATENT_WEIGHT

        evolves = any(getattr(k, "mode", "none") != "none" for k in getattr(unwrap(model), "koopman", []))
        t = dataclasses.replace(t, latent_weight=LATENT_WEIGHT if evolves else 0.0)
    get = _batch_fn(trajectories, _check_batch(t.batch_size, world_size), t.seed, rank, world_size)
    if t.perceptual == "teacher" and not (perceptual_kwargs or {}).get("denoiser"):
        raise ValueError("train.perceptual=teacher needs the teacher network: pass perceptual_kwargs={'denoiser': "
                         "teacher} (the orchestrator loads it from the teacher stage's weights)")
    kwargs = dict(perceptual_kwargs or _lpips_paths(t))
    if t.perceptual == "teacher":
        kwargs.setdefault("sigma", t.perceptual_sigma)
    distance = perceptual_distance(t.perceptual, **kwargs)
    if isinstance(distance, nn.Module):
        distance = distance.to(device)
    loss_fn = HKDLoss(t.states_per_traj, LambdaSchedule(t.lambda1_start, t.lambda1_end, t.lambda1_anneal_kimg),
                      t.lambda2, distance, t.xT_weight, t.tcons_sigma_min, t.latent_weight, t.gauge_weight)
    for key in ("latent_weight", "gauge_weight"):
        if getattr(t, key) > 0 and not hasattr(unwrap(model), "koopman"):
            raise ValueError(f"train.{key}={getattr(t, key)} needs per-level Koopman latents; "
                             f"{type(unwrap(model)).__name__} has none (use train.{key}=0)")
    loss_fn.candidates(torch.as_tensor(sigmas))   # refuses too few intermediate states before the first step
    adv = _adversarial(t, real_images, rank, world_size, device)
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
    loop = _Loop(model, t, {".alpha": mult, ".beta": mult, "generator": mult}, rank=rank, device=device,
                 config=config or {}, checkpoint_dir=checkpoint_dir, metrics_cb=metrics_cb,
                 checkpoint_cb=checkpoint_cb, eval_cb=eval_cb, progress=progress, desc="distill", named_mults=named,
                 log_cb=_holdout_cb(holdout) if holdout else None, log_cb_every_kimg=t.holdout_every_kimg,
                 extras={"adversarial": adv} if adv is not None else None)
    loop.restore(resume)
    return loop.run(step_loss)


def _adversarial(t: TrainConfig, real_images, rank: int, world_size: int, device):
    """The adversarial term of train.adversarial_weight > 0 (beyond the paper), else None. Its discriminator
    starts from the same weights on every rank (seeded by train.seed); each rank draws its own real batches."""
    if not t.adversarial_weight:
        return None
    if real_images is None:
        raise ValueError(f"train.adversarial_weight={t.adversarial_weight} needs real images for the "
                         f"discriminator: pass real_images (the orchestrator loads the data set's training split)")
    from .adversarial import AdversarialTerm, Discriminator

    real = _batch_fn(real_images, t.batch_size // world_size, t.seed + 1, rank, world_size)
    probe = real(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed + 1)
        disc = Discriminator(probe.shape[1], probe.shape[-1])
    return AdversarialTerm(disc, real, t.adversarial_weight, t.adversarial_lr, t.adversarial_start_kimg, device)


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

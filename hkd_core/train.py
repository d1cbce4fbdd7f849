"""Training loops: the EDM teacher (``train_teacher``) and HKD or a baseline (``train_hkd``).

Both are single functions with every argument defaulted (units in the names), counting progress in
images seen (kimg) over all ranks. They run as they are in one process, and inside a data-parallel worker
(a Ray Train worker, say) when given ``rank``/``world_size``, a DDP-wrapped model, this rank's batches, a
``metrics_cb`` and a ``checkpoint_dir``: nothing here knows which launcher started it.
Seeds: rank r of world size w draws from ``seed * w + r`` (as in DiT); batch k draws from (that, k), so a
resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, load_model_state, save_checkpoint
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


def _param_groups(model: nn.Module, lr_mults: dict[str, float]) -> list[dict]:
    """One Adam group per learning-rate multiplier; a parameter whose name ends with a key gets its multiplier."""
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        mult = next((m for suffix, m in lr_mults.items() if name.endswith(suffix)), 1.0)
        groups.setdefault(mult, []).append(p)
    return [{"params": ps, "lr_mult": m} for m, ps in groups.items()]


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


def run_loop(model: nn.Module, step_loss: Callable[[int, float], dict], *, config: dict, total_kimg: float,
             max_train_s: float | None, batch_size: int, lr: float, lr_rampup_kimg: float, grad_clip: float,
             lr_mults: dict[str, float],
             ema_halflife_kimg: float, ema_rampup: float, rank: int, world_size: int, device,
             log_every_kimg: float, checkpoint_every_kimg: float, checkpoint_dir, resume,
             metrics_cb: MetricsCallback | None, checkpoint_cb: CheckpointCallback | None, progress: bool,
             eval_cb: EvalCallback | None = None,
             desc: str) -> dict:
    """The engine behind both loops: optimiser, lr ramp-up, EMA, logging, checkpoint and resume."""
    raw = unwrap(model)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.Adam(_param_groups(raw, lr_mults), lr=lr)
    step, nimg, train_s = 0, 0.0, 0.0
    state = None
    src = checkpoint_dir if resume is True else (resume or None)
    if resume is True and (checkpoint_dir is None or not Path(checkpoint_dir).is_dir()):
        src = None   # nothing written yet: a fresh start
    if src is not None:
        state = load_checkpoint(src, map_location=device)
    if state is not None:
        load_model_state(raw, state["model"], str(src))
        load_model_state(ema, state["ema"], str(src))
        opt.load_state_dict(state["optimizer"])
        step, nimg, train_s = state["step"], state["nimg"], state["train_s"]
        log.info("%s: resumed from %s at %.3f kimg (step %d)", desc, src, nimg / 1000, step)
    kimg_per_step = batch_size / 1000
    is_main = rank == 0
    bar = tqdm(total=total_kimg if math.isfinite(total_kimg) else None, initial=min(nimg / 1000, total_kimg),
               unit="kimg", desc=desc,
               disable=not (progress and is_main), bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}]")
    next_log = (int(nimg / 1000 / log_every_kimg) + 1) * log_every_kimg
    next_ckpt = (int(nimg / 1000 / checkpoint_every_kimg) + 1) * checkpoint_every_kimg
    acc: dict[str, float] = {}
    n_acc, t_window, img_window = 0, time.perf_counter(), 0
    metrics: dict[str, float] = {}

    def checkpoint(kimg: float) -> None:
        nonlocal metrics
        if is_main and eval_cb is not None:
            # evaluated at each checkpoint (rank 0): what a scheduler such as ASHA decides on
            evals = eval_cb(ema, kimg)
            metrics = {**metrics, **evals}
            if metrics_cb is not None:
                metrics_cb(evals, kimg)
        path = None
        if is_main and checkpoint_dir is not None:
            path = str(save_checkpoint(checkpoint_dir, {
                "model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "nimg": nimg, "train_s": train_s, "config": config}, kimg))
        if checkpoint_cb is not None:
            checkpoint_cb(path, dict(metrics), kimg)

    def done() -> bool:
        return nimg / 1000 >= total_kimg - 1e-9 or (max_train_s is not None and train_s >= max_train_s)

    model.train()
    while not done():
        t0 = time.perf_counter()
        for g in opt.param_groups:
            ramp = min(1.0, (nimg / 1000) / lr_rampup_kimg) if lr_rampup_kimg > 0 else 1.0
            g["lr"] = lr * g["lr_mult"] * ramp
        cur_lr = lr * ramp
        losses = step_loss(step, nimg / 1000)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        opt.step()
        step += 1
        nimg += batch_size
        _update_ema(ema, raw, nimg, batch_size, ema_halflife_kimg, ema_rampup)
        train_s += time.perf_counter() - t0
        for k, v in losses.items():
            acc[k] = acc.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        acc["grad_norm"] = acc.get("grad_norm", 0.0) + float(grad_norm)
        n_acc += 1
        img_window += batch_size
        kimg = nimg / 1000
        bar.update(min(kimg, total_kimg) - bar.n)
        if kimg >= next_log - 1e-9 or done():
            now = time.perf_counter()
            vals = {f"train/{k}": v / n_acc for k, v in acc.items()}
            vals = _mean_over_ranks(vals, device)
            metrics = {**vals, "train/lr": cur_lr, "train/kimg": kimg, "train/train_s": train_s,
                       "perf/samples_per_s": img_window / max(now - t_window, 1e-9)}
            if is_main:
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                if metrics_cb is not None:
                    metrics_cb(metrics, kimg)
            acc, n_acc, t_window, img_window = {}, 0, now, 0
            next_log = (int(kimg / log_every_kimg) + 1) * log_every_kimg
        if kimg >= next_ckpt - 1e-9 or done():
            checkpoint(kimg)
            next_ckpt = (int(kimg / checkpoint_every_kimg) + 1) * checkpoint_every_kimg
    bar.close()
    model.eval()
    return {"kimg": nimg / 1000, "steps": step, "train_s": train_s, "ema": ema, "model": raw, "metrics": metrics,
            "kimg_per_step": kimg_per_step}


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
    total_kimg: float = 200.0,           # training length, thousands of images over all ranks
    max_train_s: float | None = None,    # optional wall-clock budget, seconds of training
    batch_size: int = 128,               # global batch over all ranks
    lr: float = 1e-3,                    # Adam learning rate after ramp-up
    lr_rampup_kimg: float = 10.0,        # linear learning-rate warm-up, kimg
    grad_clip: float = 1.0,              # max gradient norm (0: off)
    ema_halflife_kimg: float = 10.0,     # EMA half-life, kimg
    ema_rampup: float = 0.05,            # EMA half-life <= this fraction of images seen (EDM)
    p_mean: float = -1.2, p_std: float = 1.2,   # ln(sigma) ~ N(p_mean, p_std^2)
    seed: int = 0,
    rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
    log_every_kimg: float = 1.0,         # metrics interval, kimg
    checkpoint_every_kimg: float = 20.0, # checkpoint interval, kimg
    checkpoint_dir=None,                 # folder for checkpoints (rank 0 writes); None: no checkpoints
    resume=True,                         # True: newest in checkpoint_dir; a path; or False
    metrics_cb: MetricsCallback | None = None,
    checkpoint_cb: CheckpointCallback | None = None,
    progress: bool = True,
    config: dict | None = None,          # stored in checkpoints, for lineage
) -> dict:
    """Train an EDM denoiser with EDM's loss; returns kimg, steps, train_s, the ``ema`` copy and metrics."""
    if not isinstance(unwrap(denoiser), EDMPrecond):
        raise TypeError("train_teacher expects an EDMPrecond-wrapped network")
    per_rank = _check_batch(batch_size, world_size)
    get = _batch_fn(data, per_rank, seed, rank, world_size)
    loss_fn = EDMLoss(p_mean=p_mean, p_std=p_std)
    base = seed * world_size + rank

    def step_loss(step: int, kimg: float) -> dict:
        x0 = get(step).to(device, torch.float32)
        g = torch.Generator(device="cpu").manual_seed(base * 1_000_003 + step + 7)
        return {"loss": loss_fn(denoiser, x0, generator=g if x0.device.type == "cpu" else None).mean()}

    return run_loop(denoiser, step_loss, config=config or {}, total_kimg=total_kimg, max_train_s=max_train_s,
                    batch_size=batch_size, lr=lr, lr_rampup_kimg=lr_rampup_kimg, grad_clip=grad_clip, lr_mults={},
                    ema_halflife_kimg=ema_halflife_kimg, ema_rampup=ema_rampup, rank=rank, world_size=world_size,
                    device=device, log_every_kimg=log_every_kimg, checkpoint_every_kimg=checkpoint_every_kimg,
                    checkpoint_dir=checkpoint_dir, resume=resume, metrics_cb=metrics_cb,
                    checkpoint_cb=checkpoint_cb, progress=progress, desc="teacher")


def train_hkd(
    model: nn.Module,                    # HKD, KD or KDM (see models.build_model), possibly DDP-wrapped
    trajectories,                        # states (N, S+1, C, H, W), or an iterator of this rank's batches
    sigmas: torch.Tensor,                # (S+1,) sigma grid of the stored trajectories
    *,
    total_kimg: float = 50.0,            # training length, thousands of trajectories over all ranks
    max_train_s: float | None = None,    # optional wall-clock budget, seconds of training (cumulative)
    batch_size: int = 64,                # global batch of trajectories over all ranks
    lr: float = 1e-3,                    # Adam learning rate after ramp-up (the paper's)
    koopman_lr_mult: float = 10.0,       # learning-rate multiplier for the generators (alpha, beta; KDM's K)
    lr_rampup_kimg: float = 2.0,         # linear learning-rate warm-up, kimg
    grad_clip: float = 1.0,              # max gradient norm (0: off)
    ema_halflife_kimg: float = 2.0,      # EMA half-life, kimg
    ema_rampup: float = 0.05,            # EMA half-life <= this fraction of images seen
    states_per_traj: int = 4,            # s: x_T plus s - 1 intermediate states (1: no trajectory consistency)
    lambda1_start: float = 1.0,          # MSE weight at 0 kimg ...
    lambda1_end: float = 0.0,            # ... and after the anneal
    lambda1_anneal_kimg: float = 25.0,   # anneal length, kimg
    lambda2: float = 1.0,                # perceptual weight
    perceptual: str = "pseudo_huber",    # 'pseudo_huber' | 'mse' | 'lpips'
    perceptual_kwargs: dict | None = None,  # e.g. LPIPS weight paths
    seed: int = 0,
    rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
    log_every_kimg: float = 0.5,         # metrics interval, kimg
    checkpoint_every_kimg: float = 5.0,  # checkpoint interval, kimg
    checkpoint_dir=None,                 # folder for checkpoints (rank 0 writes); None: no checkpoints
    resume=True,                         # True: newest in checkpoint_dir; a path; or False
    metrics_cb: MetricsCallback | None = None,
    checkpoint_cb: CheckpointCallback | None = None,
    eval_cb: EvalCallback | None = None, # (EMA model, kimg) -> metrics at each checkpoint, e.g. a proxy for ASHA
    progress: bool = True,
    config: dict | None = None,          # stored in checkpoints, for lineage
) -> dict:
    """Distil stored teacher trajectories into a one-step model; returns kimg, steps, train_s, ``ema``, metrics."""
    per_rank = _check_batch(batch_size, world_size)
    get = _batch_fn(trajectories, per_rank, seed, rank, world_size)
    loss_fn = HKDLoss(states_per_traj, LambdaSchedule(lambda1_start, lambda1_end, lambda1_anneal_kimg), lambda2,
                      perceptual_distance(perceptual, **(perceptual_kwargs or {})))
    if states_per_traj - 1 > len(sigmas) - 2:
        raise ValueError(f"train.states_per_traj={states_per_traj} needs {states_per_traj - 1} intermediate "
                         f"states; the trajectories have {len(sigmas) - 2}")
    base = seed * world_size + rank

    def step_loss(step: int, kimg: float) -> dict:
        states = get(step).to(device)
        g = torch.Generator().manual_seed(base * 1_000_003 + step + 11)
        out = loss_fn(model, states, sigmas, kimg, g)
        out["lambda1"] = torch.tensor(loss_fn.lambda1(kimg))
        return out

    return run_loop(model, step_loss, config=config or {}, total_kimg=total_kimg, max_train_s=max_train_s,
                    batch_size=batch_size, lr=lr, lr_rampup_kimg=lr_rampup_kimg, grad_clip=grad_clip,
                    lr_mults={".alpha": koopman_lr_mult, ".beta": koopman_lr_mult, "generator": koopman_lr_mult},
                    ema_halflife_kimg=ema_halflife_kimg, ema_rampup=ema_rampup, rank=rank, world_size=world_size,
                    device=device, log_every_kimg=log_every_kimg, checkpoint_every_kimg=checkpoint_every_kimg,
                    checkpoint_dir=checkpoint_dir, resume=resume, metrics_cb=metrics_cb,
                    checkpoint_cb=checkpoint_cb, progress=progress, desc="distill", eval_cb=eval_cb)

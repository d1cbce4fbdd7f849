"""The engine behind both training loops (hkd_core/train.py): the optimiser and its learning-rate schedule, the EMA,
logging, checkpoints and resume, and the guard against a NaN or inf step; plus the deterministic batches."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import metric_names as M
from . import provenance
from .checkpoint import load_checkpoint, load_model_state, save_checkpoint

log = logging.getLogger("hkd_core.train")


class NonFiniteLossError(FloatingPointError):
    """A training step whose loss or gradient is NaN or inf: the run ends here, naming the step, instead of
    writing NaN weights into its checkpoints (``train.skip_nonfinite=true`` skips such steps instead)."""


MetricsCallback = Callable[[dict, float], None]  # (metrics, kimg), rank 0 only
EvalCallback = Callable[[nn.Module, float], dict]  # (EMA model, kimg) -> metrics, rank 0 only
CheckpointCallback = Callable[["str | None", dict, float], None]  # (path on rank 0 else None, metrics, kimg)


class TensorBatches:
    """Deterministic random batches from an in-memory tensor: batch k of rank r is a function of (seed, r, k)."""

    def __init__(
        self, data: torch.Tensor, batch_per_rank: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.data, self.batch = data, batch_per_rank
        self.seed = seed * world_size + rank

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.data[torch.randint(0, self.data.shape[0], (self.batch,), generator=g)]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _param_groups(
    model: nn.Module, lr_mults: dict[str, float], named: dict[str, float] | None = None
) -> list[dict]:
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


def _update_ema(
    ema: nn.Module, model: nn.Module, nimg: float, batch: int, halflife_kimg: float, rampup: float
):
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


def _agreed_seconds(train_s: float, device) -> float:
    """The ranks' training seconds as one number, the largest. A run with ``max_train_s`` stops by it and its lr
    schedule follows it: timed on each rank alone, the ranks would stop at different steps (the one still
    training then pairs its gradient all-reduce with the other's last collective, and gloo aborts) and step with
    different learning rates (the replicas part)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return train_s
    t = torch.tensor([train_s], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class _Loop:
    """The engine behind both loops: optimiser, lr ramp-up, EMA, logging, checkpoint and resume.

    ``s`` holds the schedule (a TrainConfig or a TeacherConfig: total_kimg, max_train_s, batch_size, lr,
    lr_rampup_kimg, grad_clip, ema_halflife_kimg, ema_rampup, log_every_kimg, checkpoint_every_kimg)."""

    def __init__(
        self,
        model: nn.Module,
        s,
        lr_mults: dict[str, float],
        *,
        rank: int,
        device,
        config: dict,
        checkpoint_dir,
        metrics_cb,
        checkpoint_cb,
        eval_cb,
        progress: bool,
        desc: str,
        named_mults: dict[str, float] | None = None,
        log_cb: EvalCallback | None = None,
        log_cb_every_kimg: float = 0.0,
        extras: dict | None = None,
    ):
        self.model, self.raw, self.s = model, unwrap(model), s
        self.ema = copy.deepcopy(self.raw).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(_param_groups(self.raw, lr_mults, named_mults), lr=s.lr)
        # log_cb: (EMA model, kimg) -> metrics, on rank 0 at the first log point past every log_cb_every_kimg
        self.log_cb, self.log_cb_every = log_cb, log_cb_every_kimg
        self.is_main, self.device, self.config, self.desc = rank == 0, device, config, desc
        self.checkpoint_dir, self.metrics_cb, self.checkpoint_cb, self.eval_cb = (
            checkpoint_dir,
            metrics_cb,
            checkpoint_cb,
            eval_cb,
        )
        self.progress = progress
        # extras: {name: object with state_dict/load_state_dict} that train beside the model (a discriminator),
        # saved in every checkpoint and restored on resume
        self.extras = extras or {}
        self.step, self.nimg, self.train_s = 0, 0.0, 0.0
        self.skipped_nonfinite = 0
        # the compute each segment of the run trained on (provenance.gather: every rank's CPU, kernel set,
        # accelerator), one entry per start or resume: on the CPU the weights are bit-equal only on the same kind
        self.compute: list[dict] = []
        self.metrics: dict[str, float] = {}

    def restore(self, resume) -> None:
        """resume: True (the newest checkpoint in checkpoint_dir, if any), a path, or False."""
        src = self.checkpoint_dir if resume is True else (resume or None)
        if resume is True and (self.checkpoint_dir is None or not Path(self.checkpoint_dir).is_dir()):
            src = None  # nothing written yet: a fresh start
        state = load_checkpoint(src, map_location=self.device) if src is not None else None
        if state is None:
            return
        load_model_state(self.raw, state["model"], str(src))
        load_model_state(self.ema, state["ema"], str(src))
        self.opt.load_state_dict(state["optimizer"])
        missing = sorted(set(self.extras) - set(state.get("extras", {})))
        if missing:
            raise ValueError(
                f"{self.desc}: the checkpoint {src} holds no state for {missing} (it was written by a "
                f"run without them); resume it with the config it was written with, or start afresh"
            )
        for name, obj in self.extras.items():
            obj.load_state_dict(state["extras"][name])
        self.step, self.nimg, self.train_s = state["step"], state["nimg"], state["train_s"]
        self.compute = list(state.get("compute", []))
        log.info("%s: resumed from %s at %.3f kimg (step %d)", self.desc, src, self.nimg / 1000, self.step)

    def done(self) -> bool:
        s = self.s
        return self.nimg / 1000 >= s.total_kimg - 1e-9 or (
            s.max_train_s is not None and self.train_s >= s.max_train_s
        )

    def checkpoint(self, kimg: float) -> None:
        if self.is_main and self.eval_cb is not None:
            # evaluated at each checkpoint (rank 0): what a scheduler such as ASHA decides on
            evals = self.eval_cb(self.ema, kimg)
            self.metrics = {**self.metrics, **evals}
            if self.metrics_cb is not None:
                self.metrics_cb(evals, kimg)
        path = None
        if self.is_main and self.checkpoint_dir is not None:
            path = str(
                save_checkpoint(
                    self.checkpoint_dir,
                    {
                        "model": self.raw.state_dict(),
                        "ema": self.ema.state_dict(),
                        "optimizer": self.opt.state_dict(),
                        "step": self.step,
                        "nimg": self.nimg,
                        "train_s": self.train_s,
                        "config": self.config,
                        "compute": self.compute,
                        **(
                            {"extras": {k: v.state_dict() for k, v in self.extras.items()}}
                            if self.extras
                            else {}
                        ),
                    },
                    kimg,
                )
            )
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
        if not self._finite(losses):
            return self._nonfinite(losses, factor)
        self.opt.step()
        self.step += 1
        self.nimg += s.batch_size
        _update_ema(self.ema, self.raw, self.nimg, s.batch_size, s.ema_halflife_kimg, s.ema_rampup)
        return {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in losses.items()} | {
            "_lr": s.lr * factor
        }

    def _finite(self, losses: dict) -> bool:
        """The step's verdict, the same on every rank: the gradient norm (all-reduced by DDP before this, so equal
        everywhere) and, on one process, the loss too (a NaN loss gives NaN gradients, so DDP sees it as well)."""
        ok = bool(torch.isfinite(losses["grad_norm"]))
        if not (dist.is_available() and dist.is_initialized()):
            ok = ok and bool(torch.isfinite(losses["loss"].detach()))
        return ok

    def _nonfinite(self, losses: dict, factor: float) -> dict:
        kimg = self.nimg / 1000
        loss, norm = float(losses["loss"].detach()), float(losses["grad_norm"])
        if not getattr(self.s, "skip_nonfinite", False):
            raise NonFiniteLossError(
                f"{self.desc}: the loss is {loss} (gradient norm {norm}) at step {self.step} ({kimg:.3f} kimg); the "
                f"run stops before that step reaches the weights (the last checkpoint is intact). Lower train.lr or "
                f"train.grad_clip, check the trajectories, or set train.skip_nonfinite=true to skip such steps"
            )
        self.opt.zero_grad(set_to_none=True)  # nothing of this step reaches the weights or the EMA
        self.skipped_nonfinite += 1
        log.warning(
            "%s: step %d (%.3f kimg) skipped: loss %s, gradient norm %s (%d skipped so far)",
            self.desc,
            self.step,
            kimg,
            loss,
            norm,
            self.skipped_nonfinite,
        )
        self.step += 1  # the batch stream moves on past the batch that did it
        self.nimg += self.s.batch_size
        return {"_lr": self.s.lr * factor, "_skipped": 1.0}

    def run(self, step_loss: Callable[[int, float], dict]) -> dict:
        s = self.s
        self.compute.append({"from_kimg": self.nimg / 1000, "workers": provenance.gather(self.device)})
        finite = math.isfinite(s.total_kimg)
        bar = tqdm(
            total=s.total_kimg if finite else None,
            initial=min(self.nimg / 1000, s.total_kimg),
            unit="kimg",
            desc=self.desc,
            disable=not (self.progress and self.is_main),
            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}]",
        )
        next_log = (int(self.nimg / 1000 / s.log_every_kimg) + 1) * s.log_every_kimg
        next_ckpt = (int(self.nimg / 1000 / s.checkpoint_every_kimg) + 1) * s.checkpoint_every_kimg
        every = self.log_cb_every
        next_cb = (
            (int(self.nimg / 1000 / every) + 1) * every if self.log_cb is not None and every > 0 else math.inf
        )
        acc: dict[str, float] = {}
        n_acc, t_window, img_window = 0, time.perf_counter(), 0
        self.model.train()
        while not self.done():
            t0 = time.perf_counter()
            values = self.optimizer_step(step_loss)
            self.train_s += time.perf_counter() - t0
            if s.max_train_s is not None:  # every rank stops at the same step, on the same lr schedule
                self.train_s = _agreed_seconds(self.train_s, self.device)
            cur_lr = values.pop("_lr")
            if not values.pop("_skipped", 0.0):
                for k, v in values.items():
                    acc[k] = acc.get(k, 0.0) + v
                n_acc = n_acc + 1
            img_window += s.batch_size
            kimg = self.nimg / 1000
            bar.update(min(kimg, s.total_kimg) - bar.n)
            if kimg >= next_log - 1e-9 or self.done():
                now = time.perf_counter()
                vals = (
                    _mean_over_ranks({M.train(k): v / n_acc for k, v in acc.items()}, self.device)
                    if n_acc
                    else {}
                )
                self.metrics = {
                    **vals,
                    M.TRAIN_LR: cur_lr,
                    M.TRAIN_KIMG: kimg,
                    M.TRAIN_S: self.train_s,
                    M.SAMPLES_PER_S: img_window / max(now - t_window, 1e-9),
                }
                if self.skipped_nonfinite:
                    self.metrics[M.TRAIN_SKIPPED_NONFINITE] = float(self.skipped_nonfinite)
                if self.is_main and (kimg >= next_cb - 1e-9 or (self.done() and math.isfinite(next_cb))):
                    self.metrics.update(self.log_cb(self.ema, kimg))  # not counted in train_s
                    next_cb = (int(kimg / every) + 1) * every
                if self.is_main:
                    bar.set_postfix(loss=f"{self.metrics.get(M.TRAIN_LOSS, float('nan')):.4f}")
                    if self.metrics_cb is not None:
                        self.metrics_cb(self.metrics, kimg)
                acc, n_acc, t_window, img_window = {}, 0, time.perf_counter(), 0
                next_log = (int(kimg / s.log_every_kimg) + 1) * s.log_every_kimg
            if kimg >= next_ckpt - 1e-9 or self.done():
                self.checkpoint(kimg)
                next_ckpt = (int(kimg / s.checkpoint_every_kimg) + 1) * s.checkpoint_every_kimg
        bar.close()
        self.model.eval()
        return {
            "kimg": self.nimg / 1000,
            "steps": self.step,
            "train_s": self.train_s,
            "ema": self.ema,
            "model": self.raw,
            "metrics": self.metrics,
            "kimg_per_step": s.batch_size / 1000,
            "skipped_nonfinite": self.skipped_nonfinite,
            "compute": self.compute,
        }

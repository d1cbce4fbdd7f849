"""The whole method on one machine: teacher -> trajectories -> distillation -> evaluation -> figures.

Each stage writes into ``<out>/<stage>-<hash>/``, where the hash covers the stage's config and its
inputs' hashes; a stage whose output is complete is skipped, and an interrupted one resumes (shards already
written, the newest checkpoint). Launch: ``python -m hkd_core run --out runs/demo``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .checkpoint import atomic_write, atomic_write_bytes, load_checkpoint
from .config import RunConfig, stage_hashes, validate
from .data import load_images
from .edm import EDMPrecond, UNet, UNetConfig
from .fid import InceptionFeatures, evaluate_generator, reference_stats
from .editing import band_energy
from .figures import (plot_alpha_maps, plot_band_energy, plot_band_masking, plot_band_masking_levels,
                      plot_band_trajectory, plot_spectrum, plot_trajectory_strip, save_image_grid)
from .generate import generate_trajectories, noise_for_seeds
from .models import HKD, OneStepModel, build_model, count_parameters, model_from_record, model_record
from .sampler import sample_nfe
from .spectra import band_masking, band_trajectory, summarize
from .teachers import EDMTeacher, EmpiricalTeacher, Teacher
from .train import train_hkd, train_teacher
from .trajectories import LocalStore, Manifest, load_all, read_manifest

log = logging.getLogger(__name__)
HOLDOUT_SEED_OFFSET = 10 ** 9   # held-out trajectories use seeds no training trajectory can have


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=float).encode())


def teacher_unet_config(cfg: RunConfig, img_channels: int) -> UNetConfig:
    t = cfg.teacher
    return UNetConfig(img_channels=img_channels, resolution=cfg.data.resolution, channels=t.channels,
                      channel_mult=tuple(t.channel_mult), blocks=t.blocks, attn_resolutions=tuple(t.attn_resolutions),
                      dropout=t.dropout)


def teacher_denoiser(cfg: RunConfig, img_channels: int) -> EDMPrecond:
    """The EDM teacher's network (untrained): the configured U-Net behind EDM's preconditioning."""
    return EDMPrecond(UNet(teacher_unet_config(cfg, img_channels)), sigma_data=cfg.teacher.sigma_data)


def build_teacher(cfg: RunConfig, folder: Path | None, progress: bool = True, metrics_cb=None) -> Teacher:
    """The empirical denoiser of the data subset, or an EDM U-Net (trained here unless a checkpoint is given)."""
    images, _ = load_images(cfg.data.name, cfg.data.split, resolution=cfg.data.resolution, limit=cfg.data.limit,
                            root=cfg.data.root)
    if cfg.teacher.kind == "empirical":
        return EmpiricalTeacher(images, name=f"{cfg.data.name}/{cfg.data.split}/{images.shape[0]}")
    net = teacher_denoiser(cfg, images.shape[1])
    identity = {"unet": teacher_unet_config(cfg, images.shape[1]).to_dict(), "data": cfg.data.name}
    if cfg.teacher.checkpoint:
        state = load_checkpoint(cfg.teacher.checkpoint)
        net.load_state_dict(state["ema"])
        return EDMTeacher(net, {**identity, "checkpoint": cfg.teacher.checkpoint})
    final = folder / "teacher.pt" if folder else None
    if final is not None and final.is_file():
        net.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
        log.info("teacher: reusing %s", final)
    else:
        t = cfg.teacher
        result = train_teacher(net, images, total_kimg=t.total_kimg, max_train_s=t.max_train_s,
                               batch_size=t.batch_size, lr=t.lr, lr_rampup_kimg=t.lr_rampup_kimg,
                               ema_halflife_kimg=t.ema_halflife_kimg, seed=cfg.train.seed,
                               log_every_kimg=t.log_every_kimg, checkpoint_every_kimg=t.checkpoint_every_kimg,
                               checkpoint_dir=folder / "checkpoints" if folder else None, metrics_cb=metrics_cb,
                               progress=progress, config=cfg.to_dict())
        net.load_state_dict(result["ema"].state_dict())
        if final is not None:
            atomic_write(final, lambda f: torch.save(net.state_dict(), f))
    return EDMTeacher(net, {**identity, "kimg": cfg.teacher.total_kimg})


def make_trajectories(cfg: RunConfig, teacher: Teacher, folder: Path, progress: bool = True
                      ) -> tuple[LocalStore, Manifest, LocalStore | None, Manifest | None]:
    """Training and held-out trajectories as shards + manifests (complete sets are reused as they are)."""
    t = cfg.trajectories
    shape = _data_shape(cfg)
    out = []
    for name, num, seed in (("train", t.num, t.seed), ("holdout", t.holdout, t.seed + HOLDOUT_SEED_OFFSET)):
        if num == 0:
            out += [None, None]
            continue
        store = LocalStore(folder / name)
        if store.exists("manifest.json") and read_manifest(store).num_trajectories == num:
            log.info("trajectories/%s: reusing %s", name, store.root)
            manifest = read_manifest(store)
        else:
            manifest = generate_trajectories(store, teacher, num, shape, sampler=t.sampler, steps=t.steps,
                                             shard_size=t.shard_size, seed=seed, batch_size=t.batch_size,
                                             progress=progress)
        out += [store, manifest]
    return tuple(out)


def _data_shape(cfg: RunConfig) -> tuple[int, int, int]:
    from .data import DATASETS

    return (DATASETS[cfg.data.name].channels, cfg.data.resolution, cfg.data.resolution)


def distill(cfg: RunConfig, store: LocalStore, manifest: Manifest, folder: Path, progress: bool = True,
            metrics_cb=None, **overrides) -> tuple[OneStepModel, dict]:
    """Train the configured one-step model on the stored trajectories; returns its EMA copy and a summary."""
    final = folder / "model.pt"
    if final.is_file() and not overrides:
        rec = torch.load(final, map_location="cpu", weights_only=False)
        log.info("distill: reusing %s", final)
        return model_from_record(rec), rec.get("summary", {})
    model = build_model(cfg.model.variant, cfg.hkd_config())
    states, sigmas = load_all(store, manifest)
    tr = cfg.train
    log_path = folder / "metrics.jsonl"
    folder.mkdir(parents=True, exist_ok=True)

    def record(metrics: dict, kimg: float) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"kimg": kimg, **metrics}) + "\n")
        if metrics_cb is not None:
            metrics_cb(metrics, kimg)

    args = dict(total_kimg=tr.total_kimg, max_train_s=tr.max_train_s, batch_size=tr.batch_size, lr=tr.lr,
                koopman_lr_mult=tr.koopman_lr_mult,
                lr_rampup_kimg=tr.lr_rampup_kimg, grad_clip=tr.grad_clip, ema_halflife_kimg=tr.ema_halflife_kimg,
                ema_rampup=tr.ema_rampup, states_per_traj=tr.states_per_traj, lambda1_start=tr.lambda1_start,
                lambda1_end=tr.lambda1_end, lambda1_anneal_kimg=tr.lambda1_anneal_kimg, lambda2=tr.lambda2,
                perceptual=tr.perceptual, seed=tr.seed, log_every_kimg=tr.log_every_kimg,
                checkpoint_every_kimg=tr.checkpoint_every_kimg)
    args.update(overrides)
    result = train_hkd(model, states, sigmas, checkpoint_dir=folder / "checkpoints", metrics_cb=record,
                       progress=progress, config=cfg.to_dict(), **args)
    ema = result["ema"]
    ema.variant = cfg.model.variant
    summary = {"kimg": result["kimg"], "steps": result["steps"], "train_s": result["train_s"],
               "params": count_parameters(ema), **{k: v for k, v in result["metrics"].items()}}
    if not overrides:
        atomic_write(final, lambda f: torch.save({**model_record(ema), "summary": summary}, f))
    return ema, summary


@torch.no_grad()
def holdout_error(model: OneStepModel, store: LocalStore, manifest: Manifest, batch_size: int = 100) -> float:
    """Mean squared error of model(x_T) against the teacher's x_0 on held-out trajectories."""
    states, _ = load_all(store, manifest)
    errs = []
    for i in range(0, states.shape[0], batch_size):
        s = states[i:i + batch_size].float()
        errs.append((model.sample(x_T=s[:, 0]) - s[:, -1]).square().flatten(1).mean(1))
    return torch.cat(errs).mean().item()


def evaluate(cfg: RunConfig, model: OneStepModel, teacher: Teacher | None, progress: bool = True,
             features: InceptionFeatures | None = None, holdout: tuple | None = None) -> dict:
    """FID/KID of the model at NFE = 1 (and of the teacher at eval.teacher_nfe), error vs the teacher, spectra."""
    e = cfg.eval
    features = features or InceptionFeatures(e.inception_weights)
    ref = reference_stats(cfg.data.name, e.split, e.n, features, cfg.data.resolution, root=cfg.data.root,
                          progress=progress)
    shape = _data_shape(cfg)

    def noise(count: int, batch: int) -> torch.Tensor:
        seeds = torch.arange(count) + e.seed * 1_000_000 + batch * e.batch_size
        return noise_for_seeds(seeds, shape) * model.sigma_max

    t0 = time.perf_counter()
    m = evaluate_generator(lambda c, b: model.sample(x_T=noise(c, b)), e.n, ref, features, e.batch_size, progress,
                           e.kid_subset_size)
    out = {"eval/fid": m["fid"], "eval/kid": m["kid"], "eval/kid_std": m["kid_std"], "eval/n": e.n,
           "eval/fid_nfe1": m["fid"], "perf/eval_s": time.perf_counter() - t0}
    if holdout is not None and holdout[0] is not None:
        out["eval/mse_vs_teacher"] = holdout_error(model, *holdout)
    if teacher is not None:
        for nfe in e.teacher_nfe:
            tm = evaluate_generator(lambda c, b: sample_nfe(teacher.denoise, noise(c, b), nfe).x0.clamp(-1, 1),
                                    e.n, ref, features, e.batch_size, progress, e.kid_subset_size)
            out[f"eval/teacher_fid_nfe{nfe}"] = tm["fid"]
            out[f"eval/teacher_kid_nfe{nfe}"] = tm["kid"]
    out.update(summarize(model.spectrum()))
    return out


@torch.no_grad()
def write_figures(model: OneStepModel, folder: Path, n: int = 8, seed: int = 7) -> list[Path]:
    """Samples; for Koopman models also the spectrum (complex plane, alpha and beta histograms), decay-rate
    maps, band masking (all levels, and per level), a trajectory strip, each band along tau (images), and
    the energy of each band along tau (curves)."""
    g = torch.Generator().manual_seed(seed)
    x_T = model.noise(n, g)
    paths = [save_image_grid(model.sample(x_T=x_T), folder / "samples.png")]
    spec = model.spectrum()
    if spec:
        paths.append(plot_spectrum(spec, folder / "spectrum.png", f"{getattr(model, 'variant', '')} eigenvalues"))
    if isinstance(model, HKD):
        paths.append(plot_alpha_maps(spec, folder / "alpha_maps.png"))
        k = min(3, min(ev.shape[0] for ev in spec))
        full = model.sample(x_T=x_T[:6])
        paths.append(plot_band_masking(band_masking(model, x_T[:6], k), folder / "band_masking.png", full=full))
        per_level = [band_masking(model, x_T[:6], k, level=l + 1) for l in range(len(spec))]
        paths.append(plot_band_masking_levels(per_level, folder / "band_masking_levels.png", full))
        taus = torch.linspace(0, 1, 6)
        paths.append(plot_trajectory_strip(model.trajectory(x_T[:4], taus)["previews"], taus.tolist(),
                                           folder / "trajectory.png"))
        bt = band_trajectory(model, x_T[:1], taus.tolist(), k)[:, :, 0]
        paths.append(plot_band_trajectory(bt, taus.tolist(), folder / "band_trajectory.png"))
        fine = torch.linspace(0, 1, 11).tolist()
        paths.append(plot_band_energy(band_energy(model, x_T, fine, k), fine, folder / "band_energy.png"))
    return paths


def run(cfg: RunConfig, out: str | Path, progress: bool = True, evaluate_model: bool = True) -> dict:
    """Every stage in order; returns the results (also written to <out>/results.json)."""
    validate(cfg)
    out = Path(out)
    hashes = stage_hashes(cfg)
    dirs = {k: out / f"{k}-{v}" for k, v in hashes.items()}
    log.info("stages: %s", ", ".join(f"{k}={v}" for k, v in hashes.items()))
    t0 = time.perf_counter()
    teacher = build_teacher(cfg, dirs["teacher"], progress)
    store, manifest, h_store, h_manifest = make_trajectories(cfg, teacher, dirs["trajectories"], progress)
    model, summary = distill(cfg, store, manifest, dirs["distill"], progress)
    results = {"config": cfg.to_dict(), "stages": hashes, "train": summary}
    if evaluate_model:
        results["eval"] = evaluate(cfg, model, teacher, progress, holdout=(h_store, h_manifest))
        results["figures"] = [str(p) for p in write_figures(model, dirs["evaluate"])]
    results["wall_s"] = time.perf_counter() - t0
    _write_json(dirs["evaluate"] / "results.json", results)
    _write_json(out / "results.json", results)
    return results

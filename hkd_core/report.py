"""Quality report: HKD, its ablations and the one-step baselines on the same teacher trajectories.

Budgets (DESIGN 1.4): full HKD trains for ``budget_s`` seconds and reaches K kimg; every other variant
trains to the same K (equal images seen). Variants that use only x_T per trajectory take several times
fewer seconds per kimg, so they also continue, resuming the same run, until they have used the same
seconds as HKD (equal wall-clock), and are scored again. The teacher is scored at NFE 1, 2, 4 and full.
Launch: ``python -m hkd_core report --out runs/report``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from .config import RunConfig, stage_hashes, validate
from .fid import InceptionFeatures, evaluate_generator, reference_stats
from .figures import plot_curves
from .generate import noise_for_seeds
from .pipeline import _data_shape, _write_json, build_teacher, distill, evaluate, make_trajectories
from .sampler import sample_nfe

log = logging.getLogger(__name__)

# (label, model.variant, train overrides); x_T-only variants get an equal-wall-clock row too.
ROWS = [
    ("HKD (full)", "hkd", {}),
    ("HKD w/o Koopman evolution (A = 0)", "no_koopman", {}),
    ("HKD w/o trajectory consistency (s = 1)", "hkd", {"states_per_traj": 1}),
    ("HKD w/o hierarchy (one level)", "one_level", {}),
    ("KD (U-Net x_T -> x_0)", "kd", {"states_per_traj": 1}),
    ("KDM-style (one global operator)", "kdm", {}),
]


def _variant_cfg(base: RunConfig, variant: str, train_over: dict) -> RunConfig:
    return dataclasses.replace(base, model=dataclasses.replace(base.model, variant=variant),
                               train=dataclasses.replace(base.train, **train_over))


def quality_report(base: RunConfig, out: str | Path, budget_s: float = 150.0, teacher_nfe=(1, 2, 4), progress=True,
                   rows=ROWS) -> dict:
    validate(base)
    out = Path(out)
    t_start = time.perf_counter()
    hashes = stage_hashes(base)
    teacher = build_teacher(base, out / f"teacher-{hashes['teacher']}", progress)
    store, manifest, h_store, h_manifest = make_trajectories(base, teacher, out / f"trajectories-{hashes['trajectories']}",
                                                             progress)
    features = InceptionFeatures(base.eval.inception_weights)
    e = base.eval
    ref = reference_stats(base.data.name, e.split, e.n, features, base.data.resolution, root=base.data.root,
                          progress=progress)
    results = {"n": e.n, "rows": [], "teacher": [], "config": base.to_dict(), "budget_s": budget_s}
    shape = _data_shape(base)

    # The teacher at a few NFE and at full NFE (the trajectories' own sampler).
    full = manifest.nfe
    for nfe in sorted(set(teacher_nfe) | {full}):
        t0 = time.perf_counter()

        def sample(c, b, nfe=nfe):
            seeds = torch.arange(c) + e.seed * 1_000_000 + b * e.batch_size
            return sample_nfe(teacher.denoise, noise_for_seeds(seeds, shape) * 80.0, nfe).x0.clamp(-1, 1)

        m = evaluate_generator(sample, e.n, ref, features, e.batch_size, progress, e.kid_subset_size)
        results["teacher"].append({"nfe": nfe, "fid": m["fid"], "kid": m["kid"], "eval_s": time.perf_counter() - t0})
        log.info("teacher NFE %d: FID %.2f", nfe, m["fid"])

    # Full HKD first: its seconds fix K (kimg) for everyone.
    k_budget = None
    hkd_s = None
    curves = {}
    for label, variant, over in rows:
        cfg = _variant_cfg(base, variant, over)
        folder = out / f"distill-{stage_hashes(cfg)['distill']}"
        if k_budget is None:
            phase1 = {"total_kimg": math.inf, "max_train_s": budget_s}
        else:
            phase1 = {"total_kimg": k_budget, "max_train_s": None}
        model, summary = distill(cfg, store, manifest, folder, progress, **phase1)
        if k_budget is None:
            k_budget, hkd_s = summary["kimg"], summary["train_s"]
        ev = evaluate(cfg, model, None, progress, features, (h_store, h_manifest))
        row = {"label": label, "variant": variant, "budget": "equal kimg", **_row(summary, ev)}
        results["rows"].append(row)
        log.info("%s: %s", label, row)
        curves[label] = _curve(folder / "metrics.jsonl")
        x_t_only = cfg.train.states_per_traj == 1
        if x_t_only and summary["train_s"] < 0.9 * hkd_s:
            model, summary = distill(cfg, store, manifest, folder, progress, total_kimg=math.inf, max_train_s=hkd_s)
            ev = evaluate(cfg, model, None, progress, features, (h_store, h_manifest))
            row = {"label": label, "variant": variant, "budget": "equal wall-clock", **_row(summary, ev)}
            results["rows"].append(row)
            log.info("%s: %s", label, row)
    results["wall_s"] = time.perf_counter() - t_start
    results["k_budget"] = k_budget
    plot_curves({k: v for k, v in curves.items() if v[0]}, out / "loss_curves.png", "kimg", "train/loss_recon", True)
    md = to_markdown(results, base)
    (out / "report.md").write_text(md)
    _write_json(out / "report.json", results)
    return results


def _row(summary: dict, ev: dict) -> dict:
    return {"params": summary.get("params"), "kimg": summary["kimg"], "train_s": summary["train_s"],
            "fid": ev["eval/fid"], "kid": ev["eval/kid"], "mse_vs_teacher": ev.get("eval/mse_vs_teacher")}


def _curve(path: Path) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            d = json.loads(line)
            if "train/loss_recon" in d:
                xs.append(d["kimg"])
                ys.append(d["train/loss_recon"])
    return xs, ys


def _overrides(cfg: RunConfig) -> str:
    over = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("variant", "preset") and v is not None}
    return (" with " + ", ".join(f"{k}={v}" for k, v in over.items())) if over else ""


def to_markdown(r: dict, cfg: RunConfig) -> str:
    n = r["n"]
    d = cfg.data
    lines = [
        f"# HKD quality report: {d.name} at {d.resolution}x{d.resolution} (zero-padded)",
        "",
        f"Teacher: {cfg.teacher.kind} over {d.limit} {d.split} images; {cfg.trajectories.num} trajectories "
        f"({cfg.trajectories.sampler}, {cfg.trajectories.steps} steps); model preset `{cfg.model.preset}`"
        f"{_overrides(cfg)}; batch {cfg.train.batch_size}, s = {cfg.train.states_per_traj} for the "
        f"consistency rows; "
        f"FID/KID with N = {n} samples against {n} {cfg.eval.split} images (torch-fidelity, standard Inception). "
        f"Budget: full HKD trains {r['budget_s']:.0f} s, reaching K = {r['k_budget']:.2f} kimg; every row trains to "
        f"K kimg (equal images seen); x_T-only rows also continue to HKD's seconds (equal wall-clock). "
        f"MSE vs teacher: one-step output against the teacher's x_0 on {cfg.trajectories.holdout} held-out noises.",
        "",
        f"| model | NFE | budget | params | kimg | train s | FID@{n} | KID@{n} x1e3 | MSE vs teacher |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in r["teacher"]:
        lines.append(f"| teacher ({cfg.teacher.kind}) | {t['nfe']} | - | - | - | - | {t['fid']:.2f} | "
                     f"{1e3 * t['kid']:.2f} | - |")
    for row in r["rows"]:
        mse = f"{row['mse_vs_teacher']:.4f}" if row["mse_vs_teacher"] is not None else "-"
        lines.append(f"| {row['label']} | 1 | {row['budget']} | {row['params']:,} | {row['kimg']:.2f} | "
                     f"{row['train_s']:.0f} | {row['fid']:.2f} | {1e3 * row['kid']:.2f} | {mse} |")
    lines += ["", f"Total wall-clock: {r['wall_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)

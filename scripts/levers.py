"""Recipe levers measured side by side: each row is the main job's pipeline plus a few overrides, on the same
teacher and trajectories (their stages are shared by content hash), scored at the same N and noise seeds.

A row's JSON line (one per row in ``--out``/levers.jsonl, written as soon as the row is scored, so a stopped
study resumes where it stopped and finished pipelines are skipped by their hashes) holds the row's name,
label, overrides and budget, its pipeline run id, config hash and commit, images seen, training seconds, the
cost per optimiser step, FID, KID and its std with N and the floor, the KID and FID ratios to the teacher at
its full NFE, and the held-out and training-trajectory errors of the EMA model at the end.

    # the rows of issue 23 at the main job's budget (35 kimg); equal-seconds rows take the first row's seconds
    python scripts/levers.py --out docs/results/issue23 --rows baseline,perceptual,cosine,teacher_lr,grow1 \\
        --equal-seconds perceptual,grow1
    python scripts/levers.py --out docs/results/issue23 --table      # levers.md from levers.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (label, overrides); every row adds these to the base overrides (the main job's config by default)
ROWS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the main job's recipe (pseudo-Huber, lr 2e-3 constant)", []),
    "perceptual": ("+ teacher-feature perceptual distance (sigma 0.5)", ["train.perceptual=teacher"]),
    "perceptual_s2": (
        "+ teacher-feature perceptual distance (sigma 2)",
        ["train.perceptual=teacher", "train.perceptual_sigma=2.0"],
    ),
    "cosine": ("+ cosine lr decay to 1 %", ["train.lr_schedule=cosine"]),
    "teacher_lr": (
        "+ cosine, teacher tensors at 0.25x lr",
        ["train.lr_schedule=cosine", "train.teacher_lr_mult=0.25"],
    ),
    "grow1": ("+ one identity-initialised decoder block per level", ["model.grow_blocks=1"]),
    "more_traj": ("+ 4,000 trajectories (1,000 in the others)", ["trajectories.num=4000"]),
}


def parse_row(spec: str) -> tuple[str, str, list[str]]:
    """A built-in row's name, or ``name=override;override`` for a row given on the command line."""
    if spec not in ROWS and spec.count("=") > 1:
        name, rest = spec.split("=", 1)
        overrides = [o for o in rest.split(";") if o]
        return name, "+ " + ", ".join(overrides), overrides
    if spec not in ROWS:
        raise SystemExit(
            f"levers: unknown row {spec!r}; built in: {', '.join(ROWS)}; or name=key=value;key=value"
        )
    return (spec, *ROWS[spec])


def history_last(tracker, run_id: str, key: str) -> float | None:
    h = tracker.history(run_id, key)
    return h[max(h)] if h else None


def run_row(
    name: str, label: str, overrides: list[str], budget: str, base: list[str], seconds: float | None
) -> dict:
    from hkd_core import metric_names as M
    from hkd_core import provenance
    from orchestrator import identity
    from orchestrator.api import compose as compose_for_cli
    from orchestrator.config import from_composed
    from orchestrator.stages.driver import run_stages

    extra = [] if budget == "images" else ["train.total_kimg=100000", f"train.max_train_s={seconds:.1f}"]
    over = base + overrides + extra
    cfg = compose_for_cli(over)
    pc = from_composed(cfg)
    t0 = time.perf_counter()
    res = run_stages(pc, "evaluate", progress=False)
    m, d = res["evaluate"]["metrics"], res["distill"]
    from orchestrator.services.tracking import Tracker

    tracker = Tracker(pc.tracking)
    distill_run = tracker.find_run(identity.run_key(pc, "distill"))
    did = distill_run.info.run_id if distill_run else None
    full = max(pc.run.eval.teacher_nfe)  # the teacher at its best NFE, whatever the trajectories used
    t_fid, t_kid = m.get(M.teacher_fid(full)), m.get(M.teacher_kid(full))
    row = {
        "name": name,
        "label": label,
        "overrides": overrides,
        "budget": budget,
        "command": "hkd pipeline " + " ".join(over),
        "run_id": res["_parent_run_id"],
        "distill_run_id": did,
        "config_hash": identity.pipeline_hash(pc),
        "commit": identity.git_sha(),
        "n": int(m[M.EVAL_N]),
        "fid": m[M.FID],
        "kid": m[M.KID],
        "kid_std": m[M.KID_STD],
        "floor_fid": m.get(M.NOISE_FLOOR_FID),
        "teacher_nfe": full,
        "teacher_fid": t_fid,
        "teacher_kid": t_kid,
        "kid_ratio": m[M.KID] / t_kid if t_kid else None,
        "fid_ratio": m[M.FID] / t_fid if t_fid else None,
        "kimg": d["kimg"],
        "steps": d["steps"],
        "train_s": d["train_s"],
        "s_per_step": d["train_s"] / max(d["steps"], 1),
        "params": d.get("params"),
        "trained_on": provenance.summary(d.get("compute")) or None,  # seconds and last digits depend on it
        "holdout_mse": history_last(tracker, did, M.TRAIN_HOLDOUT_MSE) if did else None,
        "train_mse": history_last(tracker, did, M.TRAIN_FIT_MSE) if did else None,
        "wall_s": time.perf_counter() - t0,
        "skipped": res.get("_skipped", []),
    }
    return row


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    n = {r["n"] for r in rows}
    floor = {round(r["floor_fid"], 2) for r in rows if r.get("floor_fid")}
    lines = [
        f"FID/KID at N = {', '.join(map(str, sorted(n)))} (floor: FID {', '.join(map(str, sorted(floor)))}), "
        f"KID x1e3 ± its std over subsets; ratios to the teacher at {rows[0]['teacher_nfe']} NFE "
        f"(KID {f(rows[0]['teacher_kid'] and rows[0]['teacher_kid'] * 1e3, '.1f')}, FID "
        f"{f(rows[0]['teacher_fid'], '.2f')}).",
        "",
        "| row | budget | kimg | train s | s / step | KID x1e3 | KID ratio | FID | FID ratio | held-out MSE | "
        "train MSE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['budget']} | {r['kimg']:.1f} | {r['train_s']:.0f} | {r['s_per_step']:.3f} | "
            f"{r['kid'] * 1e3:.1f} ± {r['kid_std'] * 1e3:.1f} | {f(r['kid_ratio'], '.2f')} | {r['fid']:.2f} | "
            f"{f(r['fid_ratio'], '.2f')} | {f(r['holdout_mse'], '.4f')} | {f(r['train_mse'], '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for levers.jsonl and levers.md")
    p.add_argument("--rows", default="", help=f"comma-separated rows ({', '.join(ROWS)}) or name=k=v;k=v")
    p.add_argument(
        "--equal-seconds", default="", help="rows to run again at the first row's training seconds"
    )
    p.add_argument(
        "--seconds", type=float, help="the equal-seconds budget (default: the baseline row's train_s)"
    )
    p.add_argument(
        "--base", nargs="*", default=[], help="overrides every row starts from (default: the main job)"
    )
    p.add_argument("--table", action="store_true", help="only write levers.md from levers.jsonl")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "levers.jsonl"
    done = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    if not a.table:
        plan = [(parse_row(s), "images") for s in a.rows.split(",") if s]
        plan += [(parse_row(s), "seconds") for s in a.equal_seconds.split(",") if s]
        for (name, label, overrides), budget in plan:
            if any(r["name"] == name and r["budget"] == budget for r in done):
                logging.info("levers: %s (%s) already measured, skipped", name, budget)
                continue
            seconds = a.seconds
            if budget == "seconds" and seconds is None:
                base_rows = [r for r in done if r["name"] == "baseline" and r["budget"] == "images"]
                if not base_rows:
                    raise SystemExit("levers: equal-seconds rows need the baseline row first (or --seconds)")
                seconds = base_rows[0]["train_s"]
            logging.info("levers: row %s (%s): %s", name, budget, " ".join(overrides) or "(base)")
            row = run_row(name, label, overrides, budget, a.base, seconds)
            done.append(row)
            with path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            logging.info(
                "levers: %s (%s): KID %.1f ± %.1f (ratio %s), FID %.2f, %.0f s",
                name,
                budget,
                row["kid"] * 1e3,
                row["kid_std"] * 1e3,
                row["kid_ratio"],
                row["fid"],
                row["train_s"],
            )
    (out / "levers.md").write_text(table(done))
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())

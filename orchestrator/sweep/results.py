"""What a sweep ends with: the trials ranked (``summarize_sweep``: NaN never best, ties by trial id), the table
(Markdown, CSV) and the best config as an experiment preset, logged to the sweep's MLflow run."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from hkd_core import metric_names as M
from orchestrator.config import user_conf_dir
from orchestrator.services.storage import make_store
from orchestrator.services.tracking import Tracker
from orchestrator.sweep.spec import SweepSpec


def summarize_sweep(spec: SweepSpec, sweep_id: str, results, total_kimg: float, pc) -> dict:
    rows = []
    for r in results:
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items() if k in spec.space}
        kimg = float(m.get("kimg", 0.0))
        status = "error" if r.error else ("completed" if m.get("final") else "stopped early (ASHA)")
        rows.append(
            {
                "trial_id": m.get("trial_id", r.path.rsplit("/", 1)[-1] if r.path else "?"),
                "status": status,
                "kimg": kimg,
                "metric": m.get(spec.metric),
                "params": params,
                "fid": m.get(M.FID),
                "kid": m.get(M.KID),
                "eval_n": m.get(M.EVAL_N),
                "mse_vs_teacher": m.get(M.MSE_VS_TEACHER),
            }
        )
    sign = 1 if spec.mode == "min" else -1
    for r in rows:  # a completed trial whose metric is NaN or inf is no candidate: it would sort anywhere
        if r["status"] == "completed" and not _finite(r["metric"]):
            r["status"] = f"completed, {spec.metric} not finite"
    done = [r for r in rows if r["status"] == "completed"]
    done.sort(key=lambda r: (sign * r["metric"], str(r["trial_id"])))  # ties: by trial id, not by input order
    return {
        "sweep_id": sweep_id,
        "metric": spec.metric,
        "mode": spec.mode,
        "rows": rows,
        "ranked": done,
        "best": done[0] if done else None,
        "total_kimg": total_kimg,
    }


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def to_markdown(summary: dict) -> str:
    m = summary["metric"]
    lines = [
        f"# Sweep {summary['sweep_id']}: {m} ({summary['mode']})",
        "",
        f"| rank | trial | status | kimg | {m} | FID | MSE vs teacher | params |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    ranked = summary["ranked"] + [r for r in summary["rows"] if r not in summary["ranked"]]
    for i, r in enumerate(ranked, 1):
        f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"  # noqa: E731
        lines.append(
            f"| {i if r in summary['ranked'] else '-'} | {r['trial_id']} | {r['status']} | {r['kimg']:.3g} | "
            f"{f(r['metric'])} | {f(r['fid'])} | {f(r['mse_vs_teacher'])} | "
            f"{json.dumps(r['params'], sort_keys=True)} |"
        )
    return "\n".join(lines) + "\n"


def best_preset(summary: dict, base_cfg: dict) -> str | None:
    """The best trial's full method config as a Hydra experiment preset (`hkd pipeline experiment=<name>`)."""
    import yaml

    best = summary["best"]
    if best is None:
        return None
    params = best["params"]
    cfg = json.loads(json.dumps(base_cfg))
    for k, v in params.items():
        node = cfg
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    core = {k: cfg[k] for k in ("data", "teacher", "trajectories", "model", "train", "eval")}
    header = (
        f"# @package _global_\n# Best trial of sweep {summary['sweep_id']} ({summary['metric']} = "
        f"{best['metric']:.4g}, {summary['mode']}), written by `hkd sweep`.\n"
    )
    return header + yaml.safe_dump(core, sort_keys=False)


def publish(
    tracker: Tracker, run_id: str, spec: SweepSpec, sweep_id: str, summary: dict, pc, base_cfg: dict
) -> None:
    """Summary table (markdown + CSV), the best config as an experiment preset, metrics on the sweep run."""
    tracker.log_text(run_id, to_markdown(summary), "summary/trials.md")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", "status", "kimg", spec.metric, "fid", "mse_vs_teacher", "params"])
    for r in summary["rows"]:
        w.writerow(
            [
                r["trial_id"],
                r["status"],
                r["kimg"],
                r["metric"],
                r["fid"],
                r["mse_vs_teacher"],
                json.dumps(r["params"], sort_keys=True),
            ]
        )
    tracker.log_text(run_id, buf.getvalue(), "summary/trials.csv")
    stopped = sum(r["status"].startswith("stopped") for r in summary["rows"])
    tracker.log_metrics(
        run_id,
        {
            M.SWEEP_TRIALS: len(summary["rows"]),
            M.SWEEP_STOPPED_EARLY: stopped,
            M.SWEEP_COMPLETED: len(summary["ranked"]),
        },
        0,
    )
    preset = best_preset(summary, base_cfg)
    if preset:
        name = f"sweep_{sweep_id.replace('-', '_')}"
        tracker.log_metrics(run_id, {M.sweep_best(spec.metric): summary["best"]["metric"]}, 0)
        tracker.log_text(run_id, preset, f"summary/experiment_{name.removeprefix('sweep_')}.yaml")
        tracker.set_tags(run_id, {"hkd.best_params": json.dumps(summary["best"]["params"], sort_keys=True)})
        make_store(pc.storage, f"sweeps/{sweep_id}").put("best_experiment.yaml", preset.encode())
        summary["preset"], summary["preset_path"] = name, str(write_preset(name, preset))


def write_preset(name: str, text: str) -> Path:
    """An experiment preset in the user's config folder ($HKD_USER_CONF, default ./conf; on Hydra's search path),
    never inside the installed package: ``hkd pipeline experiment=<name>`` then finds it."""
    from hkd_core.checkpoint import atomic_write_bytes

    path = user_conf_dir() / "experiment" / f"{name}.yaml"
    atomic_write_bytes(path, text.encode())
    return path

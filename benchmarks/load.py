"""Load on the services (issue 28): N concurrent synthetic trials, Ray tasks with a fraction of a CPU each, log
metrics at a given rate and upload checkpoints of a given size through the project's own ``Tracker`` (buffered,
a background sender) and storage code (``make_store(...).put``: one PUT, retried), with no training. Afterwards
the driver counts what MLflow and S3 hold against what was logged and uploaded: **lost** must be 0.

    python benchmarks/load.py --n 4,16,64 --seconds 30 --out docs/results/issue28/sqlite.json
    eval "$(python infra/local/cluster_tracking.py env)"       # MLflow on PostgreSQL, started before
    python benchmarks/load.py --n 4,16,64 --seconds 30 --backend postgres --out docs/results/issue28/postgres.json
    python benchmarks/load.py --n 16 --seconds 60 --fault --out docs/results/issue28/fault.json
    python benchmarks/load.py --plot docs/results/issue28/sqlite.json docs/results/issue28/postgres.json

Per N, one row: metric values logged and held, lost, writes/s the server accepted (values held over the time from
the first value to the last trial's drained buffer), p50/p99 of a logging call (what a training loop waits: the
buffered ``log_metrics``) and of a batch sent to the server (``log_batch``, from the sender thread), failed
sends, checkpoint uploads held/made, uploads/s, MB/s and p99 of an upload. ``--fault``: once every trial has
opened its run, a third of the way into the logging, MLflow (the local stack's) and S3 are stopped for 10 s,
then started; the row adds the outage, how many trials were logging at its start and at the restart, and the
time from the restart until every trial had sent all it held.

Runs against the local stack (``infra/local/stack.py start --ray``): its Ray, S3 and, unless the environment
names another tracking server (``MLFLOW_TRACKING_URI``, as ``cluster_tracking.py env`` exports), its MLflow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEYS = ("load/a", "load/b")


def trial(
    tracking, storage, tag: str, i: int, seconds: float, rate: float, ckpt_bytes: int, ckpt_every_s: float
) -> dict:
    """One synthetic trial: a run of its own; len(KEYS) values every 1/rate s (step k holds k and -k), a
    checkpoint blob every ckpt_every_s; then close() (the buffer drained, retried up to its deadline)."""
    from orchestrator.services.storage import make_store
    from orchestrator.services.tracking import Tracker

    tracker = Tracker(tracking, background_flush_s=1.0)
    run_id = tracker.open_run(f"{tag}-{i}", f"{tag}-{i}", None, {"hkd.stage": "load", "load.tag": tag})
    send_s, failed = [], [0]
    send = tracker.client.log_batch

    def timed_send(*a, **k):
        t = time.perf_counter()
        try:
            return send(*a, **k)
        except Exception:
            failed[0] += 1
            raise
        finally:
            send_s.append(time.perf_counter() - t)

    tracker.client.log_batch = timed_send
    store = make_store(storage, f"load/{tag}/{i}")
    blob = np.random.default_rng(i).bytes(ckpt_bytes)
    call_s, up_s, up_fail = [], [], 0
    t0 = time.monotonic()
    step, next_up = 0, ckpt_every_s
    while (now := time.monotonic() - t0) < seconds:
        t = time.perf_counter()
        tracker.log_metrics(run_id, {KEYS[0]: step, KEYS[1]: -step}, step)
        call_s.append(time.perf_counter() - t)
        step += 1
        if now >= next_up:
            next_up += ckpt_every_s
            t = time.perf_counter()
            try:
                store.put(f"ckpt-{len(up_s):05d}.bin", blob)
                up_s.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - counted: the store gave up past its deadline
                up_fail += 1
        time.sleep(max(0.0, step / rate - (time.monotonic() - t0)))
    t_close = time.monotonic()
    t_last = time.time()
    tracker.close()
    tracker.end(run_id)
    return {
        "run_id": run_id,
        "logged": step * len(KEYS),
        "uploads": len(up_s),
        "upload_failed": up_fail,
        "call_s": call_s,
        "send_s": send_s,
        "send_failed": failed[0],
        "upload_s": up_s,
        "t_last": t_last,  # the last value logged (wall clock)
        "closed_at": time.time(),
        "close_s": time.monotonic() - t_close,
        "t_first": time.time() - (time.monotonic() - t0),
    }


def run_n(pc, n: int, a, fault: bool = False) -> dict:
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.services.storage import make_store

    tag = f"load-{n}-{uuid.uuid4().hex[:6]}"
    frac = min(1.0, a.cpus / n)
    fn = ray.remote(num_cpus=frac, max_retries=0)(trial)
    # the two configs only (torch-free clients, 18 MB): the whole PipelineConfig would import hkd_core.config,
    # and torch with it, into every trial's process (0.3-0.6 GB each: 64 of them do not fit 24 GB)
    refs = [
        fn.remote(pc.tracking, pc.storage, tag, i, a.seconds, a.rate, int(a.ckpt_mb * 2**20), a.ckpt_every)
        for i in range(n)
    ]
    from orchestrator.services.tracking_auth import use_credentials_file

    use_credentials_file()  # a server with basic auth (cluster_tracking.py): the clients' user, from its file
    client = MlflowClient(pc.tracking.resolved_uri())
    outage = None
    if fault:
        # the outage must meet every trial while it logs: wait until all have opened their runs (their loops
        # start right after), then a third of their logging time; trials still starting would only wait for it
        exp = client.get_experiment_by_name(pc.tracking.experiment)
        deadline = time.monotonic() + 600
        while len(client.search_runs([exp.experiment_id], f"tags.`load.tag` = '{tag}'", max_results=n)) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"load: not all {n} trials opened their runs within 600 s")
            time.sleep(0.5)
        time.sleep(a.seconds / 3)
        t = time.monotonic()
        started_at = time.time()
        _stack("stop", "--service=mlflow")
        _stack("stop", "--service=s3")
        time.sleep(10)
        _stack("start")
        outage = {"outage_s": time.monotonic() - t, "started_at": started_at, "restarted_at": time.time()}
    res = ray.get(refs)
    held = sum(len(client.get_metric_history(r["run_id"], k)) for r in res for k in KEYS)
    store = make_store(pc.storage, f"load/{tag}")
    objects = len(list(store.list("")))
    logged, uploads = sum(r["logged"] for r in res), sum(r["uploads"] for r in res)
    span = max(r["closed_at"] for r in res) - min(r["t_first"] for r in res)
    calls = np.concatenate([r["call_s"] for r in res])
    sends = np.concatenate([r["send_s"] for r in res]) if any(r["send_s"] for r in res) else np.zeros(1)
    ups = np.concatenate([r["upload_s"] for r in res]) if uploads else np.zeros(1)
    row = {
        "n": n,
        "cpus_per_trial": frac,
        "seconds": a.seconds,
        "values_logged": logged,
        "values_held": held,
        "values_lost": logged - held,
        "offered_per_s": n * a.rate * len(KEYS),
        "writes_per_s": held / span,
        "log_call_p50_ms": 1e3 * float(np.percentile(calls, 50)),
        "log_call_p99_ms": 1e3 * float(np.percentile(calls, 99)),
        "send_p50_ms": 1e3 * float(np.percentile(sends, 50)),
        "send_p99_ms": 1e3 * float(np.percentile(sends, 99)),
        "sends_failed": sum(r["send_failed"] for r in res),
        "uploads": uploads,
        "uploads_held": objects,
        "uploads_lost": uploads - objects,
        "upload_failed": sum(r["upload_failed"] for r in res),
        "uploads_per_s": uploads / a.seconds,
        "upload_mb_per_s": uploads * a.ckpt_mb / a.seconds,
        "upload_p99_s": float(np.percentile(ups, 99)),
        "close_max_s": max(r["close_s"] for r in res),
        "span_s": span,
    }
    if outage:
        row["outage_s"] = outage["outage_s"]
        row["drained_after_restart_s"] = max(r["closed_at"] for r in res) - outage["restarted_at"]
        # every trial was logging when the outage began, and still when it ended (else it met only part of it)
        row["trials_logging_at_outage"] = sum(r["t_first"] <= outage["started_at"] for r in res)
        row["trials_logging_at_restart"] = sum(r["t_last"] >= outage["restarted_at"] for r in res)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def _stack(*args: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "infra" / "local" / "stack.py"), *args], check=True, capture_output=True
    )


def table(paths: list[str]) -> str:
    """The rows of these JSON files as one Markdown table (the docs' tables are printed by this, not typed)."""
    head = (
        "| backend | N | values logged | held | **lost** | values/s held (offered) | p99 logging call "
        "| p50 / p99 batch sent | uploads (held) | **lost** | outage: trials logging at start / restart, drained |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in paths:
        d = json.loads(Path(p).read_text())
        for r in d["rows"]:
            out = "-"
            if r.get("outage_s"):
                out = (
                    f"{r['outage_s']:.0f} s away; {r.get('trials_logging_at_outage', '?')} / "
                    f"{r.get('trials_logging_at_restart', '?')} of {r['n']}; "
                    f"drained {r['drained_after_restart_s']:.0f} s after"
                )
            lines.append(
                f"| {d['backend']} | {r['n']} | {r['values_logged']:,} | {r['values_held']:,} "
                f"| **{r['values_lost']}** | {r['writes_per_s']:.0f} ({r['offered_per_s']:.0f}) "
                f"| {r['log_call_p99_ms']:.2f} ms | {r['send_p50_ms']:,.0f} / {r['send_p99_ms']:,.0f} ms "
                f"| {r['uploads']} ({r['uploads_held']}) | **{r['uploads_lost']}** | {out} |"
            )
    return "\n".join(lines)


def plot(paths: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for p in paths:
        d = json.loads(Path(p).read_text())
        rows = [r for r in d["rows"] if "outage_s" not in r]
        ns = [r["n"] for r in rows]
        ax1.plot(ns, [r["writes_per_s"] for r in rows], "o-", label=d["backend"])
        ax2.plot(ns, [r["send_p99_ms"] for r in rows], "o-", label=d["backend"])
    for ax, what in ((ax1, "metric values/s held"), (ax2, "p99 of a batch sent (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent trials")
        ax.set_ylabel(what)
        ax.legend()
    fig.tight_layout()
    out = Path(paths[0]).with_name("load.png")
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4,16,64", help="concurrent trials, comma-separated")
    p.add_argument("--seconds", type=float, default=30.0, help="how long each trial logs")
    p.add_argument("--rate", type=float, default=20.0, help="log calls per second per trial (2 values each)")
    p.add_argument("--ckpt-mb", type=float, default=2.0, help="checkpoint size (MB)")
    p.add_argument("--ckpt-every", type=float, default=5.0, help="seconds between a trial's checkpoints")
    p.add_argument("--cpus", type=float, default=2.0, help="CPUs the trials share (each gets cpus/N)")
    p.add_argument("--backend", default="sqlite", help="the label of the tracking server's backend store")
    p.add_argument("--fault", action="store_true", help="stop MLflow and S3 for 10 s halfway")
    p.add_argument("--out", help="JSON file of the rows (kept: a rerun replaces only the N it measures)")
    p.add_argument(
        "--machine", default="2 cores, no GPU", help="what the rows ran on, as recorded in each row"
    )
    p.add_argument("--plot", nargs="*", help="plot these JSON files (no run)")
    p.add_argument("--table", nargs="*", help="print these JSON files' rows as a Markdown table (no run)")
    a = p.parse_args(argv)
    if a.plot:
        print(plot(a.plot))
        return 0
    if a.table:
        print(table(a.table))
        return 0
    if not a.out:
        p.error("--out is required for a run")
    from orchestrator.config import load
    from orchestrator.services.localstack import adopt_local_stack
    from orchestrator.stages.driver import init_ray

    adopt_local_stack()
    pc = load(["experiment=smoke", f"tracking.experiment=load-{a.backend}"])
    init_ray(pc)
    path = Path(a.out)
    # rows already in --out are kept (another N, measured before) unless this run measures that N again
    done = json.loads(path.read_text()) if path.exists() else {}
    runs = [dict(r) for r in done.get("runs", [])]
    rows = {(r["n"], bool(r.get("outage_s"))): r for r in done.get("rows", [])}
    runs.append(
        {
            "command": " ".join(["python", "benchmarks/load.py", *(argv or sys.argv[1:])]),
            "machine": a.machine,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    )
    for n in a.n.split(","):
        row = run_n(pc, int(n), a, a.fault)
        row["machine"] = a.machine
        rows[(row["n"], bool(row.get("outage_s")))] = row
        out = {
            **done,  # notes kept beside the rows (e.g. a failure recorded before a fix)
            "backend": a.backend,
            "tracking_uri": pc.tracking.resolved_uri(),
            "runs": runs,
            "rows": sorted(rows.values(), key=lambda r: (r["n"], bool(r.get("outage_s")))),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(path)  # after each N: a row measured is never lost to a later one's failure
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

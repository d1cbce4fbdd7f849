"""The sweep driver's overhead as trials grow (issue 28), on a simulated many-node cluster: a head with 0 CPUs
and several worker nodes on loopback addresses (``infra/local/cluster.py``, each a ``ray start`` of its own,
with more logical CPUs than the machine has cores), and the sweep's own Tuner (``orchestrator.sweep.run.
tuner``: Optuna's TPE, ASHA, the trial-closing callback, Tune's experiment state in S3) over a trivial trainable
that opens its MLflow run through the project's Tracker, reports four times and ends. For each trial count it
measures the wall time, the time per trial, MLflow runs created per second, and the size of Tune's experiment
state (what grows with the trials), and where the driver's time goes: its CPU seconds, the seconds spent in
Tune's experiment-state snapshots (``--checkpoint-s``: the sweep's own period, a number, or Tune's ``auto``),
and the seconds per trial in each quarter of the sweep (flat if nothing grows with the trials).
Progress (trials ended) is printed as the job runs.

    eval "$(python infra/local/stack.py env)"     # S3 and MLflow of the local stack
    python benchmarks/tune_overhead.py --trials 64,256 --nodes 3 --cpus-per-node 16 --concurrency 32 \\
        --out docs/results/issue28/tune_overhead.json

The driver runs as a Ray job on the cluster (``ray job submit``), as a sweep does there; ``--inner`` is that
job's side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trivial(params: dict, tracking) -> None:
    """A trial with no work: its MLflow run opened and closed through the Tracker, four reports to Tune."""
    from ray import tune

    from hkd_core import metric_names as M
    from orchestrator.services.tracking import Tracker

    t0 = time.perf_counter()
    tracker = Tracker(tracking)
    trial = tune.get_context().get_trial_id()
    run_id = tracker.open_run(
        f"tune-overhead-{trial}", trial, None, {"hkd.stage": "trial", "hkd.trial_id": trial}
    )
    opened = time.perf_counter() - t0  # the tracking server's share of a trial: does it grow with the runs?
    x = abs(params["train.lr"] - 1e-2)
    for k in (1, 2, 3):
        tune.report({M.MSE_VS_TEACHER: x + 0.1 / k, "kimg": 0.1 * k, "open_run_s": opened})
    t1 = time.perf_counter()
    tracker.end(run_id)
    tune.report(
        {
            M.MSE_VS_TEACHER: x,
            "kimg": 0.4,
            "final": 1.0,
            "open_run_s": opened,
            "end_run_s": time.perf_counter() - t1,
        }
    )


def inner(a) -> int:
    """The job's side: one sweep per trial count, timed; one JSON line per count on stdout."""
    import resource

    import ray
    from ray import tune
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from hkd_core import metric_names as M
    from orchestrator.config import load
    from orchestrator.services.storage import make_store
    from orchestrator.stages.driver import init_ray
    from orchestrator.sweep.callbacks import StoppedTrialCloserCallback
    from orchestrator.sweep.run import tuner
    from orchestrator.sweep.spec import Report, Resources, Scheduler, SweepSpec

    # the sweep's own period (orchestrator.sweep.snapshots.snapshot_period_s) unless one is given ("auto" is Tune's: at
    # most 5 % of the driver's time, at least 10 s)
    if a.checkpoint_s != "sweep":
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = a.checkpoint_s
    # where the driver's time goes: Tune's experiment-state snapshots, timed in this process
    saves = {"n": 0, "s": 0.0}
    sync_up = _ExperimentCheckpointManager.sync_up_experiment_state

    def timed_sync_up(self, *args, **kwargs):
        before = self._last_save_time
        t = time.monotonic()
        try:
            return sync_up(self, *args, **kwargs)
        finally:
            if self._last_save_time != before:  # a snapshot was taken (not throttled)
                saves["n"] += 1
                saves["s"] += time.monotonic() - t

    _ExperimentCheckpointManager.sync_up_experiment_state = timed_sync_up
    # when each trial ends, seen by the driver (the sweep's own closing callback, wrapped), with progress
    ends: list[float] = []
    on_complete = StoppedTrialCloserCallback.on_trial_complete

    def counted(self, *args, **kwargs):
        ends.append(time.monotonic())
        if len(ends) % 16 == 0:
            print(f"PROGRESS {len(ends)} trials ended, {ends[-1] - t0:.0f} s", flush=True)
        return on_complete(self, *args, **kwargs)

    StoppedTrialCloserCallback.on_trial_complete = counted

    pc = load(["experiment=smoke", "train.total_kimg=0.4", f"tracking.experiment=tune-overhead-{a.tag}"])
    init_ray(pc)
    print("NODES", len([n for n in ray.nodes() if n["Alive"]]), flush=True)
    for n in [int(x) for x in a.trials.split(",")]:
        spec = SweepSpec(
            name=f"overhead{n}",
            base=[],
            space={"train.lr": {"loguniform": [1.0e-4, 1.0e-1]}},
            metric=M.MSE_VS_TEACHER,
            mode="min",
            trials=n,
            max_concurrency=a.concurrency,
            scheduler=Scheduler("asha", 0.1, 2.0),
            report=Report(0.1, 32),
            resources=Resources(1, 1.0, 0.0),
            study_storage=f"sqlite:///{tempfile.mkdtemp()}/optuna.db",
            seed=0,
        )
        sweep_id = f"overhead-{a.tag}-{n}"
        saves.update(n=0, s=0.0)
        ends.clear()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        grid = tuner(spec, pc, sweep_id, tune.with_parameters(trivial, tracking=pc.tracking)).fit()
        wall = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        driver_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        # seconds per trial in each quarter of the sweep, by the order trials ended: flat if nothing grows
        q = max(1, len(ends) // 4)
        marks = [t0] + [ends[min(len(ends), (i + 1) * q) - 1] for i in range(4)] if ends else []
        quarters = [(marks[i + 1] - marks[i]) / q for i in range(len(marks) - 1)]
        # the trial's own MLflow calls, by the order trials ended, in quarters
        timed = sorted(
            (
                (r.metrics.get("timestamp", 0), r.metrics)
                for r in grid
                if r.metrics and "open_run_s" in r.metrics
            ),
            key=lambda t: t[0],
        )
        k = max(1, len(timed) // 4)
        open_q = [
            sum(m["open_run_s"] for _, m in timed[i * k : (i + 1) * k]) / len(timed[i * k : (i + 1) * k])
            for i in range(4)
            if timed[i * k : (i + 1) * k]
        ]
        errors = sum(1 for r in grid if r.error)
        store = make_store(pc.storage, f"ray/sweeps/{sweep_id}")
        states = [k for k in store.list("") if k.split("/")[-1].startswith("experiment_state")]
        state_bytes = len(store.get(states[-1])) if states else 0
        print(
            "ROW "
            + json.dumps(
                {
                    "trials": n,
                    "concurrency": a.concurrency,
                    "wall_s": wall,
                    "s_per_trial": wall / n,
                    "mlflow_runs_per_s": n / wall,
                    "errors": errors,
                    "experiment_state_bytes": state_bytes,
                    "checkpoint_period_s": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S"),
                    "state_snapshots": saves["n"],
                    "state_snapshot_s": saves["s"],
                    "state_snapshot_share": saves["s"] / wall,
                    "driver_cpu_s": driver_cpu,
                    "driver_cpu_share": driver_cpu / wall,
                    "s_per_trial_by_quarter": quarters,
                    "open_run_s_by_quarter": open_q,
                }
            ),
            flush=True,
        )
    return 0


def outer(a) -> int:
    sys.path.insert(0, str(ROOT / "infra" / "local"))
    import signal

    from cluster import LocalCluster

    # a kill (SIGTERM) still stops the cluster's nodes, in the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    c = LocalCluster(Path(tempfile.mkdtemp(prefix="hkd-overhead-")))
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    }
    c.start([0] + [a.cpus_per_node] * a.nodes, first_ip=a.first_ip, env=env)
    tag = time.strftime("%H%M%S")
    try:
        from orchestrator.services.jobdir import submit_command

        entry = ["python", "benchmarks/tune_overhead.py", "--inner", "--trials", a.trials]
        entry += ["--concurrency", str(a.concurrency), "--tag", tag, "--checkpoint-s", a.checkpoint_s]
        cmd = submit_command(entry, ROOT)
        # the job's log, streamed: its progress lines shown as they come, the rest kept for an error
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, **c.client_env()}
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "PROGRESS " in line or "ROW {" in line:
                print(
                    line.split("PROGRESS ", 1)[-1].rstrip() if "PROGRESS " in line else line.rstrip(),
                    flush=True,
                )
        proc.wait(timeout=7200)
        r = subprocess.CompletedProcess(cmd, proc.returncode)
        out = "".join(lines)
        rows = [json.loads(line.split("ROW ", 1)[1]) for line in out.splitlines() if "ROW {" in line]
        if r.returncode != 0 or not rows:
            print(out[-5000:])
            return 1
    finally:
        c.stop()
    result = {
        "command": " ".join(["python", "benchmarks/tune_overhead.py", *sys.argv[1:]]),
        "cluster": f"head 0 CPUs + {a.nodes} nodes x {a.cpus_per_node} logical CPUs, loopback",
        "machine": a.machine,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    for row in rows:
        print(json.dumps(row))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", default="64,256", help="trial counts, comma-separated")
    p.add_argument("--nodes", type=int, default=3, help="worker nodes")
    p.add_argument("--cpus-per-node", type=int, default=16, help="logical CPUs per worker node")
    p.add_argument("--concurrency", type=int, default=32, help="trials at once")
    p.add_argument(
        "--checkpoint-s",
        default="sweep",
        help="Tune's experiment-state period, TUNE_GLOBAL_CHECKPOINT_S: the sweep's own (default: it grows with "
        "the trials), seconds, or 'auto' (Tune's)",
    )
    p.add_argument("--first-ip", default="127.0.0.20", help="the head's loopback address")
    p.add_argument("--out", help="JSON file of the rows")
    p.add_argument(
        "--machine", default="2 cores", help="what ran it, for the JSON (e.g. 'one core: taskset -c 0')"
    )
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="x", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    return inner(a) if a.inner else outer(a)


if __name__ == "__main__":
    raise SystemExit(main())

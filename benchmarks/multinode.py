"""Distillation on two Ray nodes against one, on the same work: Ray Train with 2 workers (DDP over gloo), packed
on one node or spread over two (infra/local/cluster.py: a head on 127.0.0.4, a worker node on 127.0.0.5, each
its own `ray start`). Same model, batch, steps and data; the rows alternate (one, two, one, two, ...) so that the
machine's drift hits both alike, and the ratio is the number to read.

Caveat: both "nodes" are processes on the same 2 cores, so the two-node row cannot be faster by having more
hardware; what it measures is the price of crossing nodes (the gradient all-reduce over TCP between two
raylets' workers instead of within one node, the object transfer of the data) at equal compute.

    python benchmarks/multinode.py                       # about 4 minutes on 2 CPU cores
    python benchmarks/multinode.py --rounds 3 --steps 80 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from ray_scaling import _train_kwargs, loop_worker, toy_data  # noqa: E402  (the one-node benchmark's work)


def one_row(args, states, sigmas, strategy: str, i: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "m")
        t0 = time.perf_counter()
        TorchTrainer(
            loop_worker,
            train_loop_config={
                "data": (states, sigmas),
                "preset": args.preset,
                "kw": _train_kwargs(args),
                "out": out,
                "threads": 1,
            },
            scaling_config=ScalingConfig(
                num_workers=2, resources_per_worker={"CPU": 1}, placement_strategy=strategy
            ),
            run_config=RunConfig(name=f"mn-{strategy}-{i}", storage_path=d),
        ).fit()
        wall = time.perf_counter() - t0
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    return {
        "placement": strategy,
        "round": i,
        "samples_per_s": ranks[0]["samples_per_s"],
        "loop_s": ranks[0]["train_s"],
        "wall_s": wall,
        "nodes": sorted({r["node"] for r in ranks}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per row")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--s", type=int, default=4, help="states per trajectory")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--first-ip", default="127.0.0.4")
    p.add_argument("--json")
    args = p.parse_args()

    spec = importlib.util.spec_from_file_location(
        "hkd_local_cluster", ROOT / "infra" / "local" / "cluster.py"
    )
    cl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cl)
    from hkd_core.architecture import preset

    _, states, sigmas = toy_data(2000, 256, 18, preset(args.preset).resolution)
    with tempfile.TemporaryDirectory() as d:
        c = cl.LocalCluster(Path(d))
        try:
            # head: the two workers fit on it (PACK); worker node: one of them (SPREAD)
            c.start(
                [2, 1], first_ip=args.first_ip, env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
            )
            os.environ.update({k: v for k, v in c.client_env().items() if k != "RAY_ADDRESS"})
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
            import ray

            ray.init(address=c.gcs, _node_ip_address=args.first_ip, log_to_driver=False)
            try:
                rows = [
                    one_row(args, states, sigmas, s, i)
                    for i in range(args.rounds)
                    for s in ("PACK", "SPREAD")
                ]
            except BaseException:
                traceback.print_exc()  # before the cluster goes: a driver left connected then aborts unprinted
                raise
            finally:
                ray.shutdown()
        finally:
            c.stop()

    by = {s: [r["samples_per_s"] for r in rows if r["placement"] == s] for s in ("PACK", "SPREAD")}
    ratio = statistics.mean(by["SPREAD"]) / statistics.mean(by["PACK"])
    print(
        f"distillation, preset {args.preset}, batch {args.batch}, s = {args.s}, {args.steps} steps, 2 workers, "
        f"{args.rounds} rounds alternating"
    )
    print("| round | placement | nodes | samples/s | loop s | fit wall s |")
    print("|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['round']} | {r['placement']} | {', '.join(r['nodes'])} | {r['samples_per_s']:.0f} | "
            f"{r['loop_s']:.1f} | {r['wall_s']:.1f} |"
        )
    print(
        f"\ntwo nodes / one node, samples/s: {ratio:.2f} (means over {args.rounds} rounds; "
        f"one node {statistics.mean(by['PACK']):.0f}, two nodes {statistics.mean(by['SPREAD']):.0f})"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "ratio_two_over_one": ratio, "args": vars(args)}, indent=1)
        )


if __name__ == "__main__":
    main()

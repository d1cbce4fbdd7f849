"""Ray Train against the single-process loop on the same work, and trajectory generation over Ray tasks.

Measured side by side in one run (the ratios are the numbers to read on a noisy machine):
- distillation samples/s: hkd_core's loop in this process, then Ray Train with 1 and 2 workers (DDP, gloo),
  same model, batch and number of steps; Ray's fixed start-up cost is reported apart from the loop's rate;
- trajectory generation trajectories/s: hkd_core in this process, then 1 and 2 Ray tasks (one shard each).

    python benchmarks/ray_scaling.py                  # about 3 minutes on 2 CPU cores
    python benchmarks/ray_scaling.py --steps 40 --preset small
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from hkd_core.architecture import preset
from hkd_core.generate import generate_shard, sampler_spec
from hkd_core.models import build_model
from hkd_core.sampler import karras_sigmas, sample_heun
from hkd_core.teachers import EmpiricalTeacher
from hkd_core.train import train_hkd
from hkd_core.trajectories import LocalStore


def toy_data(n_images: int, n_traj: int, steps: int, res: int):
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand(n_images, 1, res, res, generator=g) * 2 - 1, 3, 1, 1)
    teacher = EmpiricalTeacher(images)
    sig = karras_sigmas(steps)
    tr = sample_heun(teacher.denoise, torch.randn(n_traj, 1, res, res, generator=g) * 80, sig)
    return images, tr.states.transpose(0, 1).contiguous(), sig


def _train_kwargs(args):
    return dict(
        total_kimg=args.steps * args.batch / 1000,
        batch_size=args.batch,
        states_per_traj=args.s,
        lr_rampup_kimg=0,
        log_every_kimg=args.steps * args.batch / 1000 / 2,
        checkpoint_every_kimg=1e9,
        progress=False,
    )


def loop_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    states, sigmas = config["data"]
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model("hkd", preset(config["preset"])))
    rates = []
    res = train_hkd(
        model,
        states,
        sigmas,
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        metrics_cb=lambda m, k: rates.append(m["perf/samples_per_s"]),
        **config["kw"],
    )
    import ray

    # rank 0's rate counts the global batch (only rank 0 reports it); every rank says which node it ran on
    # (benchmarks/multinode.py reads both: the nodes come from here, all on this machine's one /tmp)
    with open(f"{config['out']}.{ctx.get_world_rank()}", "w") as f:
        json.dump(
            {
                "samples_per_s": rates[-1] if rates else None,
                "train_s": res["train_s"],
                "node": ray.util.get_node_ip_address(),
            },
            f,
        )


def bench_ray_train(args, states, sigmas, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "metrics.json")
        trainer = TorchTrainer(
            loop_worker,
            train_loop_config={
                "data": (states, sigmas),
                "preset": args.preset,
                "kw": _train_kwargs(args),
                "threads": max(1, args.cpus // workers),
                "out": out,
            },
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"bench-{workers}", storage_path=d),
        )
        trainer.fit()
        with open(f"{out}.0") as f:
            m = json.load(f)
    wall = time.perf_counter() - t0
    return {"workers": workers, "samples_per_s": m["samples_per_s"], "loop_s": m["train_s"], "wall_s": wall}


def gen_task(images, index: int, count: int, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        generate_shard(
            LocalStore(d),
            EmpiricalTeacher(images),
            index,
            index * count,
            count,
            tuple(images.shape[1:]),
            sampler_spec("heun", steps),
            batch_size=count,
        )
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per training measurement")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--s", type=int, default=4, help="states per trajectory")
    p.add_argument("--traj", type=int, default=1024, help="trajectories per generation measurement")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--json")
    args = p.parse_args()
    cfg = preset(args.preset)
    images, states, sigmas = toy_data(2000, 256, 18, cfg.resolution)

    torch.set_num_threads(args.cpus)
    torch.manual_seed(0)
    rates = []
    res = train_hkd(
        build_model("hkd", cfg),
        states,
        sigmas,
        metrics_cb=lambda m, k: rates.append(m["perf/samples_per_s"]),
        **_train_kwargs(args),
    )
    local = {"samples_per_s": rates[-1], "loop_s": res["train_s"]}

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local benchmark; don't switch token auth on
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(
        num_cpus=max(args.cpus, 2) + 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    train_rows = [bench_ray_train(args, states, sigmas, w) for w in (1, 2)]

    t0 = time.perf_counter()
    gen_task(images, 0, args.traj, 18, args.cpus)
    gen_local = args.traj / (time.perf_counter() - t0)
    remote = ray.remote(gen_task)
    img_ref = ray.put(images)
    # warm the task workers (a fresh worker spends seconds importing torch): rates, not start-up, are compared
    ray.get([remote.options(num_cpus=1).remote(img_ref, 0, 8, 18, 1) for _ in range(2)])
    gen_rows = []
    for w in (1, 2):
        per = args.traj // w
        t0 = time.perf_counter()
        ray.get(
            [remote.options(num_cpus=1).remote(img_ref, i, per, 18, max(1, args.cpus // w)) for i in range(w)]
        )
        gen_rows.append({"tasks": w, "traj_per_s": per * w / (time.perf_counter() - t0)})
    ray.shutdown()

    print(
        f"distillation, preset {args.preset}, batch {args.batch}, s = {args.s}, {args.steps} steps, {args.cpus} CPUs"
    )
    print("| runner | samples/s (loop) | vs single process | fit wall s |")
    print("|---|---:|---:|---:|")
    print(
        f"| single process ({args.cpus} threads) | {local['samples_per_s']:.0f} | 1.00 | {local['loop_s']:.1f} |"
    )
    for r in train_rows:
        print(
            f"| Ray Train, {r['workers']} worker(s) | {r['samples_per_s']:.0f} | "
            f"{r['samples_per_s'] / local['samples_per_s']:.2f} | {r['wall_s']:.1f} |"
        )
    print(
        f"\ntrajectory generation (empirical teacher over 2000 images, Heun 18 steps, {args.traj} trajectories)"
    )
    print("| runner | trajectories/s | vs single process |")
    print("|---|---:|---:|")
    print(f"| single process | {gen_local:.0f} | 1.00 |")
    for r in gen_rows:
        print(f"| Ray, {r['tasks']} task(s) | {r['traj_per_s']:.0f} | {r['traj_per_s'] / gen_local:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"local": local, "ray_train": train_rows, "gen_local": gen_local, "gen_ray": gen_rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

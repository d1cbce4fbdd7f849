"""Trajectory generation against the teacher's raw forward rate: efficiency = trajectories/s divided by
(denoiser forwards/s / NFE). 1.0 means the sampler, the shard writing and the teacher wrapper cost nothing
beyond the network itself. Measured side by side in one process, per thread count, with the shipped EDM
teacher (``teacher=edm``) in the layout the teacher wrapper uses (channels_last, inference_mode, chunks of 64),
and the default layout's forward rate beside it.

    python benchmarks/trajectory_efficiency.py [--threads 1 2] [--count 128] [--steps 18] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _default_teacher import default_teacher

from hkd_core.generate import generate_shard, sampler_nfe, sampler_spec
from hkd_core.teachers import build_teacher, teacher_denoiser


class _Memory:
    """A BlobStore in a dict: the benchmark measures sampling and encoding, not a disk or a network."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> None:
        self.blobs[key] = bytes(data)

    def get(self, key: str) -> bytes:
        return self.blobs[key]

    def exists(self, key: str) -> bool:
        return key in self.blobs

    def uri(self, key: str = "") -> str:
        return f"memory://{key}"


def forward_rate(net, batch: int, seconds: float, channels_last: bool) -> float:
    x = torch.randn(batch, 1, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    s = torch.full((batch,), 10.0)
    with torch.inference_mode():
        net(x, s)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            net(x, s)
            n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--count", type=int, default=128, help="trajectories per measurement")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (2 * steps - 1 NFE)")
    p.add_argument("--seconds", type=float, default=8.0, help="per forward-rate measurement")
    p.add_argument("--json")
    a = p.parse_args()
    data, cfg, shipped = default_teacher()  # teacher=edm, as `hkd pipeline` composes it
    weights = shipped.load(1) if shipped else teacher_denoiser(cfg, 1, 32).state_dict()
    spec = sampler_spec("heun", a.steps)
    nfe = sampler_nfe(spec)
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        teacher = build_teacher(data, cfg, None, weights, "benchmark")  # channels_last, chunks of 64
        plain = teacher_denoiser(cfg, 1, 32)
        plain.load_state_dict(weights)
        plain.eval()
        raw = forward_rate(teacher.net, teacher.batch_size, a.seconds, True)
        default = forward_rate(plain, 250, a.seconds, False)
        t0 = time.perf_counter()
        generate_shard(_Memory(), teacher, 0, 0, a.count, (1, 32, 32), spec, 0, 250)
        traj_s = a.count / (time.perf_counter() - t0)
        row = {
            "threads": threads,
            "nfe": nfe,
            "forward_per_s": raw,
            "forward_per_s_default_layout_b250": default,
            "trajectories_per_s": traj_s,
            "efficiency": traj_s / (raw / nfe),
        }
        rows.append(row)
        print(
            f"threads {threads}: forwards/s {raw:.1f} (default layout, batch 250: {default:.1f}); "
            f"trajectories/s {traj_s:.2f} at {nfe} NFE; efficiency {row['efficiency']:.3f}",
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Is a distillation run on the CPU reproducible, and on what does that depend?

The main job's student (``small`` HKD started from the shipped teacher, the main job's loss and schedule) trains
for ``--steps`` steps on the same seeded trajectories in a fresh process per variant:

- ``again``: the same process environment as ``reference``, a second time;
- ``contended``: the same, with ``--hogs`` busy-looping processes taking the cores from it;
- ``threads=1`` (reference has 2 when the machine has them): intra-op threads change how kernels split sums;
- ``kernels=DEFAULT``: ATEN_CPU_CAPABILITY=default, PyTorch's kernels without AVX2/AVX-512, standing in for a
  machine whose CPU has another instruction set (MKL's own paths are chosen by the CPU itself).

Each variant reports the largest difference of its weights from the reference after the first step and after
the last, and of its one-step samples on fixed noise. Equal to the last bit means reproducible; a difference
in the last bits after one step that grows with the steps is how another CPU gives another model.

    python benchmarks/determinism.py --steps 20 --json docs/results/benchmarks/determinism.json    # ~4 min
    python benchmarks/determinism.py --steps 100 --json docs/results/benchmarks/determinism_100steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "reference": {},
    "again": {},
    "contended": {},
    "threads=1": {"HKD_DET_THREADS": "1"},
    "kernels=DEFAULT": {"ATEN_CPU_CAPABILITY": "default"},
}


def train(steps: int, threads: int, out: str) -> None:
    """One run (in its own process): the weights after the first step and after the last, and the samples."""
    import torch

    sys.path.insert(0, str(ROOT))
    from hkd_core import provenance
    from hkd_core.config import ModelConfig, RunConfig
    from hkd_core.models import build_model
    from hkd_core.sampler import karras_sigmas
    from hkd_core.shipped import SHIPPED_DIR, read_shipped
    from hkd_core.teacher_init import init_from_teacher
    from hkd_core.train import train_hkd

    torch.set_num_threads(threads)
    shipped = read_shipped(SHIPPED_DIR / "fmnist-edm")
    cfg = RunConfig(data=shipped.data, teacher=shipped.teacher, model=ModelConfig(init="teacher"))
    torch.manual_seed(0)
    model = build_model("hkd", cfg.hkd_config())
    init_from_teacher(model, shipped.load(1), "teacher")
    sigmas = karras_sigmas(cfg.trajectories.steps).float()
    g = torch.Generator().manual_seed(7)  # straight-line stand-ins for trajectories: x_0 + sigma * noise
    x0 = torch.randn(256, 1, 1, 32, 32, generator=g).tanh()
    states = x0 + torch.randn(256, 1, 1, 32, 32, generator=g) * sigmas.view(1, -1, 1, 1, 1)
    snaps = {}

    def grab(metrics, kimg):
        if "first" not in snaps:
            snaps["first"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    t = cfg.train
    res = train_hkd(
        model,
        states,
        sigmas,
        total_kimg=steps * t.batch_size / 1000,
        batch_size=t.batch_size,
        log_every_kimg=t.batch_size / 1000,
        checkpoint_every_kimg=1e9,
        holdout_every_kimg=0,
        metrics_cb=grab,
        progress=False,
    )
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(11)) * sigmas[0]
    with torch.no_grad():
        samples = res["ema"].sample(x_T=x)
    torch.save(
        {
            "first": snaps["first"],
            "last": {k: v.detach().clone() for k, v in res["model"].state_dict().items()},
            "samples": samples,
            "compute": provenance.fingerprint(),
        },
        out,
    )


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--json", type=Path)
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        train(int(a._child[0]), int(a._child[1]), a._child[2])
        return 0
    import tempfile

    import torch

    threads = min(2, os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="hkd-det-"))
    runs, secs = {}, {}
    for name, env in VARIANTS.items():
        n = int(env.get("HKD_DET_THREADS", threads))
        cmd = [sys.executable, __file__, "--_child", str(a.steps), str(n), str(tmp / f"{name}.pt")]
        hogs = []
        if name == "contended":
            hog = "while True: pass"
            hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(a.hogs)]
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, env={**os.environ, **env})
        finally:
            for h in hogs:
                h.kill()
        secs[name] = time.perf_counter() - t0
        runs[name] = torch.load(tmp / f"{name}.pt", weights_only=False)
        (tmp / f"{name}.pt").unlink()
        print(f"determinism: {name}: {secs[name]:.0f} s", flush=True)
    tmp.rmdir()
    ref = runs["reference"]
    rows = []
    for name, r in runs.items():
        if name == "reference":
            continue
        rows.append(
            {
                "variant": name,
                "env": VARIANTS[name],
                "weights_after_step_1": max_diff(r["first"], ref["first"]),
                "weights_after_last_step": max_diff(r["last"], ref["last"]),
                "samples": float((r["samples"] - ref["samples"]).abs().max()),
                "bit_equal": all(torch.equal(r["last"][k], ref["last"][k]) for k in ref["last"]),
                "seconds": secs[name],
            }
        )
    result = {
        "steps": a.steps,
        "threads": threads,
        "hogs": a.hogs,
        "reference_compute": ref["compute"],
        "kernels_default_compute": runs["kernels=DEFAULT"]["compute"],
        "rows": rows,
        "command": "python benchmarks/determinism.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"{'variant':<18}{'step 1':>12}{'step ' + str(a.steps):>12}{'samples':>12}  bit-equal")
    for r in rows:
        print(
            f"{r['variant']:<18}{r['weights_after_step_1']:>12.2e}{r['weights_after_last_step']:>12.2e}"
            f"{r['samples']:>12.2e}  {r['bit_equal']}"
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

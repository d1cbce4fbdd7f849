"""The cost of one distillation step for each recipe lever, measured side by side in one process: the main job's
student (``small`` HKD from the shipped teacher, latent term on) at its per-worker batch (32 over 2 workers = 16;
step_cost.json was measured at 32, the main job's 64 over 2 until issue 23 made it 32) and one thread per worker,
with pseudo-Huber against the teacher-feature distance (``train.perceptual=teacher``) and with 0, 1 or 2 grown
decoder blocks per level (``model.grow_blocks``). The rows alternate, round after round, so the machine's drift
hits all alike; the ratio to the baseline is the number to read.

    python benchmarks/step_cost.py                                    # about 3 minutes on 2 CPU cores
    python benchmarks/step_cost.py --rounds 5 --steps 20 --json docs/results/issue23/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {
    "baseline": ({}, {}),
    "perceptual=teacher": ({"perceptual": "teacher"}, {}),
    "grow_blocks=1": ({}, {"grow_blocks": 1}),
    "grow_blocks=2": ({}, {"grow_blocks": 2}),
}


def build(train_over: dict, model_over: dict, teacher_state, teacher_cfg, data_cfg):
    from hkd_core.config import ModelConfig, RunConfig, TrainConfig
    from hkd_core.losses import HKDLoss, LambdaSchedule, perceptual_distance
    from hkd_core.models import build_model
    from hkd_core.teacher_init import init_from_teacher
    from hkd_core.teachers import teacher_denoiser

    cfg = RunConfig(
        data=data_cfg,
        teacher=teacher_cfg,
        model=ModelConfig(init="teacher", **model_over),
        train=TrainConfig(**train_over),
    )
    torch.manual_seed(0)
    model = build_model("hkd", cfg.hkd_config())
    init_from_teacher(model, teacher_state, "teacher")
    model = model.to(memory_format=torch.channels_last)
    t = cfg.train
    kwargs = {}
    if t.perceptual == "teacher":
        net = teacher_denoiser(teacher_cfg, 1, data_cfg.resolution)
        net.load_state_dict(teacher_state)
        kwargs = {"denoiser": net, "sigma": t.perceptual_sigma}
    loss = HKDLoss(
        1,
        LambdaSchedule(t.lambda1_start, t.lambda1_end, t.lambda1_anneal_kimg),
        t.lambda2,
        perceptual_distance(t.perceptual, **kwargs),
        None,
        0.0,
        0.1,
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, loss, opt


def time_steps(model, loss, opt, states, sigmas, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(steps):
        out = loss(model, states[i % len(states)], sigmas, 10.0, g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--steps", type=int, default=15, help="timed steps per row and round (after 2 warm-up steps)"
    )
    p.add_argument("--batch", type=int, default=16, help="per worker: the main job's 32 over 2 workers")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from hkd_core.sampler import karras_sigmas
    from hkd_core.shipped import SHIPPED_DIR, read_shipped

    shipped = read_shipped(SHIPPED_DIR / "fmnist-edm")
    state = shipped.load(1)
    sigmas = karras_sigmas(18)
    g = torch.Generator().manual_seed(1)
    states = [
        torch.randn(a.batch, len(sigmas), 1, 32, 32, generator=g) * sigmas.float().view(1, -1, 1, 1, 1)
        for _ in range(4)
    ]
    built = {name: build(t, m, state, shipped.teacher, shipped.data) for name, (t, m) in ROWS.items()}
    for name, b in built.items():
        time_steps(*b, states, sigmas, 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for r in range(a.rounds):
        for name, b in built.items():
            times[name].append(time_steps(*b, states, sigmas, a.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.3f} s" for n, v in times.items()), flush=True)
    base = statistics.median(times["baseline"])
    rows = {
        n: {
            "s_per_step": statistics.median(v),
            "ratio": statistics.median(v) / base,
            "all": v,
            "params": sum(p.numel() for p in built[n][0].parameters()),
        }
        for n, v in times.items()
    }
    out = {
        "batch_per_worker": a.batch,
        "threads": a.threads,
        "rounds": a.rounds,
        "steps": a.steps,
        "rows": rows,
        "torch": torch.__version__,
    }
    print("\n| row | params | s / step (median) | ÷ baseline |\n|---|---:|---:|---:|")
    for n, r in rows.items():
        print(f"| {n} | {r['params']:,} | {r['s_per_step']:.3f} | {r['ratio']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

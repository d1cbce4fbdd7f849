"""One-step HKD sampling against the teacher's full-NFE Heun sampler, on the same batch of noise.

Both are measured in one run, side by side (these machines are noisy, so the ratio is the number to read),
each in its own child process so that its peak memory is its own: peak RSS above the process's baseline
on CPU, ``torch.cuda.max_memory_allocated`` on GPU.

    python benchmarks/sampling_throughput.py                       # CPU, presets 'small' vs the default U-Net
    python benchmarks/sampling_throughput.py --device cuda --preset cifar --batch 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from hkd_core.architecture import preset
from hkd_core.edm import EDMPrecond, UNet, UNetConfig
from hkd_core.models import build_model, count_parameters
from hkd_core.sampler import karras_sigmas, sample_heun
from hkd_core.teachers import EDMTeacher


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = preset(args.preset)
    x_T = torch.randn(args.batch, cfg.img_channels, cfg.resolution, cfg.resolution, device=dev) * 80
    if args.which == "hkd":
        model = build_model("hkd", cfg).to(dev).eval()
        run = lambda: model.sample(x_T=x_T)  # noqa: E731
        nfe, params = 1, count_parameters(model)
    else:
        unet = UNetConfig(
            img_channels=cfg.img_channels,
            resolution=cfg.resolution,
            channels=args.teacher_channels,
            channel_mult=tuple(args.teacher_mult),
            blocks=args.teacher_blocks,
            attn_resolutions=(cfg.resolution // 4,),
        )
        teacher = EDMTeacher(EDMPrecond(UNet(unet)).to(dev), batch_size=args.batch)
        sig = karras_sigmas(args.steps).to(dev)
        run = lambda: sample_heun(teacher.denoise, x_T, sig, keep_states=False).x0  # noqa: E731
        nfe, params = 2 * args.steps - 1, count_parameters(teacher.net)
    with torch.no_grad():
        base = _rss_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()  # warm-up (and the memory peak)
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        )
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "which": args.which,
        "nfe": nfe,
        "params": params,
        "batch": args.batch,
        "best_s": best,
        "images_per_s": args.batch / best,
        "peak_mb": peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=18, help="teacher Heun steps (2 * steps - 1 NFE)")
    p.add_argument("--teacher-channels", type=int, default=32)
    p.add_argument("--teacher-mult", type=int, nargs="+", default=[1, 2, 2])
    p.add_argument("--teacher-blocks", type=int, default=2)
    p.add_argument("--which", choices=["hkd", "teacher"], help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.which:
        print(json.dumps(child(args)))
        return
    rows = {}
    for which in ("hkd", "teacher"):
        cmd = [sys.executable, __file__, "--which", which] + sys.argv[1:]
        rows[which] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    h, t = rows["hkd"], rows["teacher"]
    print(f"device {args.device}, batch {args.batch}, preset {args.preset}, best of {args.repeats}")
    print("| sampler | NFE | params | images/s | peak memory MB |")
    print("|---|---:|---:|---:|---:|")
    for r in (h, t):
        name = "HKD one step" if r["which"] == "hkd" else f"teacher Heun ({r['nfe']} NFE)"
        print(f"| {name} | {r['nfe']} | {r['params']:,} | {r['images_per_s']:.1f} | {r['peak_mb']:.0f} |")
    print(f"speed-up (HKD / teacher images per second): {h['images_per_s'] / t['images_per_s']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hkd": h, "teacher": t, "speedup": h["images_per_s"] / t["images_per_s"]}, f, indent=1)


if __name__ == "__main__":
    main()

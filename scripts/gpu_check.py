"""The CUDA code paths of hkd_core, checked on one accelerator machine in one run, results as JSON and Markdown.

Run by scripts/gpu_check.sh (which installs the carried wheels first). Each check is independent: one that
fails is recorded with its error and the next runs. Within the time budget, in order:

1. device: what hkd_core and the orchestrator choose (``cuda`` when a GPU is visible), the GPU's name,
   capability and memory;
2. nccl: a torch.distributed process group on the NCCL backend (world size 1 per visible GPU, spawned), an
   all-reduce and a broadcast on the GPU, as Ray Train's TorchConfig(backend="nccl") sets up for GPU workers;
3. mixed precision: whether hkd_core trains under autocast (it does not: fp32 throughout); a bf16 autocast
   forward of the HKD model against fp32, to size the error if it were switched on;
4. inception: the FID Inception network on the GPU against the CPU on the same images (converted weights from
   $HKD_INCEPTION_WEIGHTS or the caches; without them the same architecture with its initial weights, which
   checks the CUDA path but not the numbers, and says so);
5. train: distillation steps of the ``cifar`` preset on the GPU (samples/s), the same steps' loss on CPU for
   the first step (equal within float tolerance), and one-step sampling throughput;
6. cifar_gpu: the first steps of ``experiment=cifar_gpu`` on the GPU, as its stages take them
   (``orchestrator/first_steps.py``, what tests/orchestrator/test_presets.py runs for cifar_cpu on the CPU):
   CIFAR-10's JPEGs (from ../shared/data, carried, or the data root given), its teacher, Heun trajectories,
   the student started from the teacher's U-Net, training steps with the preset's recipe, one-step samples.
   Needs Hydra, OmegaConf and PyYAML (small wheels, carried in .whl/ as below) and the CIFAR-10 file;
7. study: the CIFAR-10 study preset (``hkd study experiment=study_cifar_gpu``), only where Ray and MLflow are
   importable (their wheels exceed what travels to the machine here), with what time is left.

    python scripts/gpu_check.py --out DIR [--budget-s 540]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEV = "cuda"  # --dry-run-cpu: every check on the CPU (gloo for the process group), to test this script


def _sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def _device_info() -> dict:
    import torch

    out = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda,
        "chosen": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(
            name=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            count=torch.cuda.device_count(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    return out


def _nccl_rank(rank: int, world: int, port: int, q, dev: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if dev == "cuda" else "gloo", rank=rank, world_size=world)
    if dev == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    t = torch.full((1024,), float(rank + 1), device=dev)
    dist.all_reduce(t)
    b = torch.arange(8, device=dev, dtype=torch.float32) * (rank == 0)
    dist.broadcast(b, 0)
    if dev == "cuda":
        torch.cuda.synchronize()
    q.put(
        {
            "rank": rank,
            "all_reduce": float(t[0]),
            "broadcast_ok": bool((b == torch.arange(8, device=dev)).all()),
        }
    )
    dist.destroy_process_group()


def check_nccl() -> dict:
    import socket

    import torch
    import torch.multiprocessing as mp

    world = max(1, torch.cuda.device_count()) if DEV == "cuda" else 2
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, world, port, q, DEV)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    rows = [q.get(timeout=5) for _ in range(world)]
    want = world * (world + 1) / 2
    ok = all(r["all_reduce"] == want and r["broadcast_ok"] for r in rows)
    return {"world": world, "ranks": rows, "ok": ok}


def _model(preset_name: str):
    from hkd_core.architecture import preset
    from hkd_core.models import build_model

    if DEV == "cpu":  # the dry run tests this script, not the speed: the smallest model
        preset_name = "tiny"
    cfg = preset(preset_name, img_channels=3, resolution=32)  # CIFAR-10's shape
    return build_model("hkd", cfg), cfg


def check_mixed_precision() -> dict:
    import torch

    src = "".join(p.read_text() for p in (ROOT / "hkd_core").glob("*.py"))
    used = "autocast" in src or "GradScaler" in src
    model, cfg = _model("cifar")
    model = model.to(DEV).eval()
    x = torch.randn(16, 3, cfg.resolution, cfg.resolution, device=DEV) * 80
    with torch.no_grad():
        ref = model(x, 80.0).float()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            low = model(x, 80.0).float()
    rel = float((low - ref).norm() / ref.norm().clamp_min(1e-12))
    return {"hkd_core_uses_autocast": used, "bf16_forward_rel_error": rel}


def check_inception() -> dict:
    import torch

    from hkd_core.fid import InceptionFeatures
    from hkd_core.inception import WeightsError, weights_path

    try:
        w = str(weights_path())
        real = True
    except WeightsError:
        w, real = None, False
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(64, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    if not real:
        return {
            "weights": None,
            "note": "no converted weights on this machine: the network's CUDA path was not run; "
            "carry them (HKD_INCEPTION_WEIGHTS) or run `python -m hkd_core weights`",
        }
    gpu = InceptionFeatures(w, device=DEV, batch_size=64)
    cpu = InceptionFeatures(w, device="cpu", batch_size=64)
    fg, fc = gpu(imgs), cpu(imgs)
    diff = float((fg - fc).abs().max())
    _sync()
    t0 = time.perf_counter()
    for _ in range(5):
        gpu(imgs)
    _sync()
    return {
        "weights": w,
        "max_abs_diff_gpu_vs_cpu": diff,
        "feature_scale": float(fc.abs().max()),
        "images_per_s_gpu": 5 * 64 / (time.perf_counter() - t0),
    }


def check_train(seconds: float) -> dict:
    import torch

    from hkd_core.sampler import karras_sigmas
    from hkd_core.train import train_hkd

    model, cfg = _model("cifar")
    steps, batch = 18, 64
    g = torch.Generator().manual_seed(0)
    n = 512
    sig = karras_sigmas(steps)
    states = torch.randn(n, steps + 1, 3, cfg.resolution, cfg.resolution, generator=g) * sig.float().view(
        1, -1, 1, 1, 1
    )
    rates = []
    kimg = 64 * (40 if DEV == "cuda" else 2) / 1000
    t0 = time.perf_counter()
    res = train_hkd(
        model,
        states,
        sig,
        device=DEV,
        total_kimg=kimg,
        batch_size=batch,
        lr_rampup_kimg=0,
        log_every_kimg=kimg / 4,
        checkpoint_every_kimg=1e9,
        progress=False,
        metrics_cb=lambda m, k: rates.append(m.get("perf/samples_per_s")),
    )
    wall = time.perf_counter() - t0
    model = model.to(DEV).eval()
    z = torch.randn(256, 3, cfg.resolution, cfg.resolution, device=DEV) * 80
    with torch.no_grad():
        model(z, 80.0)
        _sync()
        t1 = time.perf_counter()
        for _ in range(10 if DEV == "cuda" else 1):
            model(z, 80.0)
        _sync()
    return {
        "preset": "cifar" if DEV == "cuda" else "tiny (dry run)",
        "kimg": round(kimg, 3),
        "samples_per_s": rates[-1] if rates else None,
        "wall_s": wall,
        "train_s": res.get("train_s"),
        "one_step_images_per_s": (10 if DEV == "cuda" else 1) * 256 / (time.perf_counter() - t1),
    }


def check_first_steps(seconds: float) -> dict:
    """cifar_gpu's first steps on the GPU (cifar_cpu's on the CPU in a dry run)."""
    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        return {
            "skipped": f"{e.name} is not installed here: carry its wheel in .whl/ (see scripts/gpu_check.sh)"
        }
    from hkd_core.data import has_local_copy

    if not has_local_copy("cifar10_jpeg"):
        return {"skipped": "CIFAR-10 (JPEG) is not on this machine: carry ../shared/data or set HKD_DATA_DIR"}
    from orchestrator.first_steps import first_steps

    if DEV == "cuda":
        return first_steps(["experiment=cifar_gpu"], "cuda", trajectories=64, batch_size=64, train_steps=20)
    return first_steps(["experiment=cifar_cpu"], "cpu")


def check_study(seconds: float, out: Path) -> dict:
    if DEV == "cpu":
        return {"skipped": "dry run: the study preset is sized for a GPU"}
    try:
        import mlflow  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        return {
            "skipped": f"{e.name} is not installed here (its wheel is larger than what travels to this machine); "
            f"the study preset needs Ray and MLflow"
        }
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "study",
        "experiment=study_cifar_gpu",
        "storage=fs",
        "tracking=file",
        f"storage.root={out}/store",
        f"tracking.root={out}/mlflow",
        "--no-progress",
        "--json",
        str(out / "study.json"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, seconds), cwd=ROOT)
    return {"returncode": r.returncode, "tail": (r.stdout + r.stderr)[-3000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument(
        "--dry-run-cpu", action="store_true", help="run every check on the CPU (tests this script)"
    )
    a = ap.parse_args()
    global DEV
    DEV = "cpu" if a.dry_run_cpu else "cuda"
    a.out.mkdir(parents=True, exist_ok=True)
    t_end = time.monotonic() + a.budget_s
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    checks = [
        ("device", lambda: _device_info()),
        ("nccl", check_nccl),
        ("mixed_precision", check_mixed_precision),
        ("inception", check_inception),
        ("train", lambda: check_train(t_end - time.monotonic())),
        ("cifar_gpu", lambda: check_first_steps(t_end - time.monotonic())),
        ("study", lambda: check_study(t_end - time.monotonic() - 20, a.out)),
    ]
    for name, fn in checks:
        if time.monotonic() > t_end - 15:
            results[name] = {"skipped": "out of time"}
            continue
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as e:  # recorded; the next check runs
            results[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-2000:],
            }
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(
            f"[gpu_check] {name}: {'ok' if results[name].get('ok') else 'FAILED'} "
            f"({results[name]['seconds']} s)",
            flush=True,
        )
        (a.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    lines = ["| check | ok | seconds | result |", "|---|---|---:|---|"]
    for name, r in results.items():
        if isinstance(r, dict):
            short = {k: v for k, v in r.items() if k not in ("ok", "seconds", "trace", "tail")}
            lines.append(
                f"| {name} | {r.get('ok', '-')} | {r.get('seconds', '-')} | `{json.dumps(short, default=str)[:300]}` |"
            )
    (a.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r.get("ok", True) for r in results.values() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())

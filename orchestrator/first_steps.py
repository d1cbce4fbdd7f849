"""A preset's first steps, in this process, as its stages take them: what ``experiment=cifar_cpu``'s test and
``scripts/gpu_check.py`` (``experiment=cifar_gpu`` on a lent GPU) run, so that a preset that cannot run for its
full length here is still checked on its own code path.

The steps: the data set's images (its real files, as the teacher stage loads them), its teacher (the shipped
weights where a record matches the config, else the configured network as initialised: the path, not the
quality), a few Heun trajectories of it (fewer steps than the preset's), the student built from the config and
started from the teacher's U-Net (``model.init``), a few steps of ``train_hkd`` with the preset's recipe (its
perceptual distance, its adversarial term where set), and the EMA model's one-step samples. Needs the config's
composition (Hydra) and hkd_core only: no Ray, MLflow or S3.

    python -m orchestrator.first_steps experiment=cifar_cpu [--device cuda] [--steps 4]
"""

from __future__ import annotations

import dataclasses
import math
import time


def first_steps(
    overrides: list[str],
    device: str = "cpu",
    trajectories: int = 16,
    sampler_steps: int = 2,
    batch_size: int = 8,
    train_steps: int = 4,
    images: int = 32,
) -> dict:
    """Run the first steps of the composed config on ``device``; return what they produced (shapes, the loss at
    each logged step, rates, where the teacher came from). Raises where a step fails."""
    import torch

    from hkd_core.data import DATASETS, load_images
    from hkd_core.generate import noise_for_seeds
    from hkd_core.models import build_model
    from hkd_core.sampler import karras_sigmas, sample_heun
    from hkd_core.shipped import find_shipped
    from hkd_core.teacher_init import init_from_teacher
    from hkd_core.teachers import build_teacher, teacher_denoiser
    from hkd_core.train import recipe_extras, train_hkd
    from orchestrator.config import load

    t_start = time.perf_counter()
    run = load(overrides).run
    channels, res = DATASETS[run.data.name].channels, run.data.resolution
    real, labels = load_images(run.data.name, resolution=res, limit=images, root=run.data.root)
    if run.teacher.kind != "edm":
        raise ValueError(
            f"first_steps follows an EDM teacher's path; this config's teacher is {run.teacher.kind}"
        )
    shipped = find_shipped(run.data, run.teacher)
    torch.manual_seed(0)
    weights = shipped.load(channels) if shipped else teacher_denoiser(run.teacher, channels, res).state_dict()
    teacher = build_teacher(
        run.data, run.teacher, None, weights, str(shipped.folder) if shipped else "initialised"
    )
    teacher.net.to(device)
    sigmas = karras_sigmas(sampler_steps)
    x_T = noise_for_seeds(torch.arange(trajectories), (channels, res, res)).to(device) * float(sigmas[0])
    t0 = time.perf_counter()
    with torch.no_grad():
        traj = sample_heun(teacher.denoise, x_T, sigmas.to(device))
    sample_s = time.perf_counter() - t0
    states = traj.states.transpose(0, 1).contiguous().cpu()
    if not torch.isfinite(states).all():
        raise FloatingPointError("the teacher's trajectories hold non-finite values")
    teacher.net.cpu()

    torch.manual_seed(run.train.seed)
    model = build_model(run.model.variant, run.hkd_config())
    copied = (
        init_from_teacher(model, weights, run.model.init, "first_steps") if run.model.init != "none" else []
    )
    per_step = batch_size / 1000
    tr = dataclasses.replace(
        run.train,
        total_kimg=per_step * train_steps,
        batch_size=batch_size,
        log_every_kimg=per_step,
        checkpoint_every_kimg=per_step * train_steps,
        holdout_every_kimg=0.0,
    )
    extra = recipe_extras(tr, lambda: teacher.net, lambda: real)
    logged: list[dict] = []
    t0 = time.perf_counter()
    out = train_hkd(
        model,
        states,
        sigmas,
        device=device,
        metrics_cb=lambda m, k: logged.append(m),
        progress=False,
        teacher_tensors=copied,
        **extra,
        **dataclasses.asdict(tr),
    )
    train_s = time.perf_counter() - t0
    losses = [float(m["train/loss"]) for m in logged if "train/loss" in m]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise FloatingPointError(f"the training loss is not finite: {losses}")
    ema = out["ema"].eval().to(device)
    with torch.no_grad():
        one_step = ema.sample(x_T=x_T[:4])
    if not torch.isfinite(one_step).all():
        raise FloatingPointError("the one-step samples hold non-finite values")
    return {
        "overrides": overrides,
        "device": device,
        "data": {
            "name": run.data.name,
            "images": list(real.shape),
            "classes_seen": len(set(labels.tolist())),
        },
        "teacher": {
            "source": str(shipped.folder)
            if shipped
            else "initialised (no shipped record matches this config)",
            "params": sum(v.numel() for v in weights.values() if v.is_floating_point()),
            "trajectories": list(states.shape),
            "sample_s": sample_s,
        },
        "student": {
            "variant": run.model.variant,
            "preset": run.model.preset,
            "params": sum(p.numel() for p in model.parameters()),
            "tensors_from_teacher": len(copied),
            "steps": out["steps"],
            "losses": losses,
            "train_s": train_s,
            "one_step": list(one_step.shape),
        },
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. experiment=cifar_cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4, help="training steps")
    a = ap.parse_args(argv)
    print(json.dumps(first_steps(a.overrides, a.device, train_steps=a.steps), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

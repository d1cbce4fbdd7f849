"""The two teachers' noise-to-image maps under a 5 % nudge of x_T (hkd_core.evaluation.endpoint_sensitivity):
the empirical optimal denoiser (``teacher=empirical``: a lookup table over 5,000 training images) against the
shipped EDM U-Net (``teacher=edm``). A map worth distilling into one step is smooth: a small nudge of the
noise moves the image a little and does not swap it for another training image.

    python benchmarks/teacher_sensitivity.py [--n 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _default_teacher import default_teacher

from hkd_core.config import DataConfig, TeacherConfig
from hkd_core.data import load_images
from hkd_core.evaluation import endpoint_sensitivity, noise
from hkd_core.teachers import build_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="x_T draws per teacher")
    p.add_argument("--rel", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    full, edm, shipped = default_teacher()  # teacher=edm, as `hkd pipeline` composes it
    train = load_images(full.name, "train", resolution=full.resolution)[0]
    sub = DataConfig()  # the empirical teacher's default: 5,000 images
    subset = load_images(sub.name, "train", resolution=sub.resolution, limit=sub.limit)[0]
    if shipped is None:
        raise SystemExit("no shipped teacher matches the default teacher=edm config")
    teachers = {
        "empirical (5,000 images)": build_teacher(sub, TeacherConfig(), subset),
        "EDM U-Net (shipped)": build_teacher(full, edm, None, shipped.load(1), str(shipped.weights_path)),
    }
    x_T = noise(range(a.n), (1, 32, 32))
    rows = {}
    for name, t in teachers.items():
        t0 = time.perf_counter()
        rows[name] = {
            **endpoint_sensitivity(t.denoise, x_T, train, a.rel),
            "seconds": time.perf_counter() - t0,
        }
        r = rows[name]
        print(
            f"{name}: endpoint RMS change mean {r['endpoint_rms_change']:.3f} / median {r['median_change']:.3f} / "
            f"p90 {r['p90_change']:.3f}; jump rate (> {r['jump_rms']}) {r['jump_rate']:.1%}; nearest training "
            f"image changes for {r['nn_change_rate']:.1%}; endpoints at RMS {r['nn_rms']:.3f} from the nearest "
            f"training image (N = {r['n']}, {r['seconds']:.0f} s)",
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

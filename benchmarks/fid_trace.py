"""FID's matrix square root, in seconds: torch-fidelity's ``fid_statistics_to_metric`` (scipy.linalg.sqrtm of the
non-symmetric 2048 x 2048 product) against hkd_core.fid.fid_from_stats (the same trace from symmetric
eigendecompositions; from the features' Gram matrix where N <= 2048), side by side in one run, with the relative
difference of the FIDs. Every FID the project logs pays this once: each evaluation (the model, the teacher at each
NFE, the noise floor), each curve point at a checkpoint, each sweep trial's final score.

    python benchmarks/fid_trace.py [--n 32 1000 10000] [--repeat 2] [--json docs/results/benchmarks/fid_trace.json]

Features are seeded stand-ins with Inception's width (2048) and a non-negative, skewed distribution like pool3's;
two sets differ in mean and covariance. At N <= 2048 the covariances are singular, as real ones at those N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def _features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(2048, 2048, generator=g) / 2048**0.5
    a = torch.relu(torch.randn(n, 2048, generator=g) @ mix + 0.3)
    b = torch.relu(torch.randn(n, 2048, generator=g) @ (mix * 1.2) + 0.25)
    return a, b


def main() -> None:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    from hkd_core.fid import FeatureStats, fid_from_stats

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[32, 1000, 10000])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for n in a.n:
        fa, fb = _features(n, n)
        sa, sb = FeatureStats.of(fa), FeatureStats.of(fb)
        ma, mb = sa.mu_sigma(), sb.mu_sigma()
        ways = {
            "torch-fidelity (scipy sqrtm)": lambda: fid_statistics_to_metric(ma, mb, verbose=False)[
                KEY_METRIC_FID
            ],
            "hkd_core, statistics only": lambda: fid_from_stats(sa, sb),
            "hkd_core, with the features": lambda: fid_from_stats(sa, sb, fa, fb),
        }
        times: dict[str, list[float]] = {k: [] for k in ways}
        values: dict[str, float] = {}
        for _ in range(a.repeat):  # interleaved, so that load changes hit every row alike
            for k, fn in ways.items():
                t0 = time.perf_counter()
                values[k] = float(fn())
                times[k].append(time.perf_counter() - t0)
        base = values["torch-fidelity (scipy sqrtm)"]
        t_base = statistics.median(times["torch-fidelity (scipy sqrtm)"])
        for k in ways:
            t = statistics.median(times[k])
            row = {
                "n": n,
                "way": k,
                "seconds_median": t,
                "seconds": times[k],
                "fid": values[k],
                "rel_diff_to_torch_fidelity": (values[k] - base) / base,
                "speed_up": t_base / t,
            }
            rows.append(row)
            print(
                f"N={n:6d}  {k:30s} {t:7.3f} s  x{row['speed_up']:6.1f}  FID {values[k]:.6f}  "
                f"rel. diff {row['rel_diff_to_torch_fidelity']:+.1e}"
            )
    if a.json:
        out = {
            "what": "FID's trace term: torch-fidelity's sqrtm against hkd_core.fid's eigendecompositions, side by side",
            "command": "python benchmarks/fid_trace.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}",
            "repeat": a.repeat,
            "rows": rows,
        }
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

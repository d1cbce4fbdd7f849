"""Does the shipped teacher need all 35 NFE? Its FID/KID at fewer Heun steps, on the evaluation's own seeds
and reference (N = 1000 against the test split, as the shipped record), beside the 35-NFE row it records.

    python benchmarks/teacher_steps.py [--nfe 13 17 25 35] [--n 1000] [--redraw 35] [--json out.json]

``--redraw NFE`` scores that NFE again on other noise (the evaluation's seed set ``eval.seed = 1``): the
difference between the two draws is the FID's own sampling noise at this N, the yardstick for "within the noise".

Read a row as "within the noise" when its FID is within the spread that resampling gives at this N: the KID
std (100 subsets) is printed with every row, and the record's train-vs-test floor says what N allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from _default_teacher import default_teacher

from hkd_core import evaluation as E
from hkd_core.config import EvalConfig
from hkd_core.fid import FeatureStats, InceptionFeatures, Reference
from hkd_core.teachers import build_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nfe", type=int, nargs="+", default=[13, 17, 25])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--redraw", type=int, nargs="*", default=[], help="NFEs to score again on other noise")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data, cfg, shipped = default_teacher()  # teacher=edm, as `hkd pipeline` composes it
    e = EvalConfig(n=a.n)
    if shipped is None:
        raise SystemExit("no shipped teacher matches the default teacher=edm config")
    teacher = build_teacher(data, cfg, None, shipped.load(1), str(shipped.weights_path))
    feats = InceptionFeatures(e.inception_weights, batch_size=e.batch_size)
    t0 = time.perf_counter()
    ref_feats = feats(E.reference_images(data, e.split, a.n))
    ref = Reference({}, FeatureStats.of(ref_feats), ref_feats)
    print(f"reference: {a.n} {e.split} images ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = {}
    recorded = (shipped.record.get("eval") or {}).get("by_nfe", {})
    other = dataclasses.replace(e, seed=e.seed + 1)
    for nfe, seeds, key in [(k, E.eval_seeds(e), str(k)) for k in a.nfe] + [
        (k, E.eval_seeds(other), f"{k}_redraw") for k in a.redraw
    ]:
        t0 = time.perf_counter()
        s = E.score_in_process(
            E.teacher_generator(teacher, nfe),
            seeds,
            E.image_shape(data),
            feats,
            ref,
            e.kid_subset_size,
            e.batch_size,
        )
        rows[key] = {**s, "nfe": nfe, "seeds_from": seeds[0], "seconds": time.perf_counter() - t0}
        print(
            f"NFE {key}: FID {s['fid']:.2f}  KID x1e3 {s['kid'] * 1e3:.1f} ± {s['kid_std'] * 1e3:.1f}  "
            f"({rows[key]['seconds']:.0f} s)",
            flush=True,
        )
    for nfe, r in sorted(recorded.items(), key=lambda kv: int(kv[0])):
        print(
            f"NFE {nfe} (the shipped record): FID {r['fid']:.2f}  KID x1e3 {r['kid'] * 1e3:.1f} ± "
            f"{r['kid_std'] * 1e3:.1f}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"n": a.n, "measured": rows, "recorded": recorded}, indent=1))


if __name__ == "__main__":
    main()

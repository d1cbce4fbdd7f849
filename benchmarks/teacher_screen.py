"""Teacher sizes at equal wall-clock: train an EDM teacher of each size through the project's own teacher stage
(Ray Train, ``hkd teacher``) for the same number of training seconds, then score each through ``hkd
ship-teacher``'s path (FID and KID at N against the data set's test reference, at every ``eval.teacher_nfe``, with
the noise floor at that N) and write one row per size. What a CIFAR-10 teacher for 2 CPU cores should be is
picked from these rows (issue 27): the size that scores best in the same seconds.

    python benchmarks/teacher_screen.py --seconds 1800 --n 1000 --out docs/results/issue27/screen.json \\
        --size "c32: teacher.channels=32 teacher.blocks=1" \\
        --size "c48: teacher.channels=48 teacher.blocks=1" \\
        --size "c64b2: teacher.channels=64 teacher.blocks=2" \\
        -- data=cifar10_jpeg teacher=edm model.init=none teacher.sigma_data=0.5 "teacher.attn_resolutions=[]"

Everything after ``--`` is common to every size (Hydra overrides, as ``hkd teacher`` takes them). Each size's
teacher is a stage of its own (its config differs), cached like any stage: a rerun of the screen skips the
training of a size that finished and only scores it again; rows already in ``--out`` are kept (the screen
resumes). Each row: the overrides, parameters, kimg reached in the seconds, seconds per kimg, and per NFE the
FID, KID and its std; the floor at N once. Sizes run one after another with the whole machine each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_size(text: str) -> tuple[str, list[str]]:
    """``"name: key=value key=value"`` -> (name, overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or not rest.split():
        raise SystemExit(f"teacher_screen: --size {text!r}: write it as 'name: key=value key=value ...'")
    return name.strip(), rest.split()


def row_of(name: str, overrides: list[str], shipped: dict, trained: dict, n: int, seconds: float) -> dict:
    """One size's row from ship-teacher's result (its record: params, the evaluation at N with the floor) and its
    teacher stage's summary (kimg reached, seconds)."""
    record = shipped["record"]
    ev = next(e for e in record["evals"] if e["n"] == n)
    kimg = float(trained.get("kimg") or 0.0)
    return {
        "name": name,
        "overrides": overrides,
        "params": record.get("params"),
        "kimg": kimg,  # reached within the training seconds (teacher.max_train_s)
        "train_s": seconds,
        "kimg_per_hour": kimg / seconds * 3600 if seconds else None,
        "stage_wall_s": trained.get("wall_s"),  # the stage's whole fit, Ray Train's start included
        "n": n,
        "floor": ev["noise_floor_train_vs_test"],
        "scores": ev["by_nfe"],
        "config_hash": record.get("teacher_hash"),
        "weights_sha256": record.get("weights_sha256"),
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", action="append", required=True, help="'name: key=value ...' (repeat)")
    p.add_argument(
        "--seconds", type=float, required=True, help="training seconds per size (teacher.max_train_s)"
    )
    p.add_argument("--n", type=int, default=1000, help="samples per score (eval.n)")
    p.add_argument("--nfe", default="[35]", help="eval.teacher_nfe, e.g. [4,35]")
    p.add_argument("--out", required=True, help="JSON file of the rows (kept and resumed)")
    a = p.parse_args(argv)
    sizes = [parse_size(s) for s in a.size]
    from orchestrator import api

    api.compose_checked(common)  # a mistake in the common overrides: refused before any training
    out = Path(a.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for name, over in sizes:
        if any(r["name"] == name for r in rows):
            print(f"{name}: already in {out}, kept", flush=True)
            continue
        budget = [f"teacher.max_train_s={a.seconds:g}", "teacher.total_kimg=1000000"]
        run = common + over + budget
        t0 = time.monotonic()
        trained = api.pipeline(run, upto="teacher", progress=False)["teacher"]
        with tempfile.TemporaryDirectory() as tmp:
            shipped = api.ship_teacher(run + [f"eval.n={a.n}", f"eval.teacher_nfe={a.nfe}"], tmp)
        row = row_of(name, over, shipped, trained, a.n, a.seconds)
        row["wall_s"] = time.monotonic() - t0
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_text(json.dumps({"seconds": a.seconds, "common": common, "rows": rows}, indent=1))
        tmp_out.replace(out)
        best = ", ".join(
            f"NFE {k}: FID {v['fid']:.2f} KID x1e3 {v['kid'] * 1e3:.1f} ± {v['kid_std'] * 1e3:.1f}"
            for k, v in row["scores"].items()
        )
        print(f"{name}: {row['kimg']:.1f} kimg in {a.seconds:g} s of training; {best}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

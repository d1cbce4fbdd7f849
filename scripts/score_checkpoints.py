"""FID/KID of saved distill checkpoints, after the fact: a run's curve without stopping its training to score it.

A curve point scored inside training (eval.curve_n) holds both Ray Train workers while rank 0 samples and runs
Inception; on 2 shared cores one point at N = 1000 cost 6.5 minutes of the long run. This scores checkpoint
files (hkd_core.checkpoint's ``ckpt-*.pt``: the EMA weights, images seen, training seconds) the same way, on the
same evaluation seeds and cached reference statistics as the distill stage's curve (orchestrator.stages.workers.
make_eval_cb), whenever the cores are free. Give the run's overrides so that the model and data match.

    python scripts/score_checkpoints.py --n 1000 --out docs/results/issue23/long_run/checkpoints.json \\
        /work/runs/lr_ckpts/ckpt-0000[3-9]*.pt /work/runs/lr_ckpts/ckpt-0001*.pt -- train.total_kimg=240 ...

Rows are appended as each checkpoint is scored (a stopped scoring resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="ckpt-*.pt files of one run")
    p.add_argument("--n", type=int, default=1000, help="samples per point (the evaluation's first N seeds)")
    p.add_argument("--out", required=True, help="JSON file of the points (appended to, resumed)")
    p.add_argument(
        "--grid",
        metavar="PNG",
        help="also draw the last checkpoint's samples beside the teacher's (its stage output in storage, at the "
        "largest eval.teacher_nfe) on the evaluation's first noise seeds, as the evaluate stage does",
    )
    a = p.parse_args(argv)
    import torch

    from hkd_core import metric_names as M
    from hkd_core.models import build_model
    from orchestrator.config import load
    from orchestrator.services.localstack import adopt_local_stack
    from orchestrator.stages import evaluation
    from orchestrator.stages.driver import init_ray
    from orchestrator.stages.workers import make_eval_cb

    adopt_local_stack()
    pc = load(overrides)
    missing = [c for c in a.checkpoints if not Path(c).is_file()]
    if missing:
        raise SystemExit(f"score_checkpoints: no such checkpoint file(s): {missing}")
    out = Path(a.out)
    rows = json.loads(out.read_text())["points"] if out.exists() else []
    init_ray(pc)
    spec = {"metric": M.CURVE, "fid_n": a.n, "reference_key": evaluation.reference(pc, a.n)[1]}
    score = make_eval_cb(pc, spec, "cpu")
    for path in sorted(a.checkpoints):
        state = torch.load(path, map_location="cpu", weights_only=False)
        kimg = state["nimg"] / 1000
        if any(abs(r["kimg"] - kimg) < 1e-6 for r in rows):
            continue
        model = build_model(pc.run.model.variant, pc.run.hkd_config())
        model.load_state_dict(state["ema"])
        m = score(model.eval(), -1.0)  # kimg -1: never the final point that the evaluate stage scores
        rows.append(
            {
                "kimg": kimg,
                "train_s": state["train_s"],
                "step": state["step"],
                "n": a.n,
                "fid": m[M.CURVE_FID],
                "kid": m[M.CURVE_KID],
                "kid_std": m[M.CURVE_KID_STD],
                "checkpoint": Path(path).name,
            }
        )
        rows.sort(key=lambda r: r["kimg"])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"overrides": overrides, "n": a.n, "points": rows}, indent=1))
        tmp.replace(out)
        print(
            f"{Path(path).name}: {kimg:.1f} kimg, FID@{a.n} {m[M.CURVE_FID]:.2f}, KID x1e3 "
            f"{m[M.CURVE_KID] * 1e3:.1f} ± {m[M.CURVE_KID_STD] * 1e3:.1f}",
            flush=True,
        )
    if a.grid:
        draw_grid(pc, sorted(a.checkpoints)[-1], Path(a.grid))
    return 0


def draw_grid(pc, path: str, out: Path) -> None:
    """samples_vs_teacher.png of a checkpoint: the evaluate stage's figure, from the teacher stage's output."""
    import json as _json
    import shutil

    import torch

    from hkd_core.data import load_images
    from hkd_core.models import build_model
    from orchestrator import identity
    from orchestrator.services.storage import make_store
    from orchestrator.stages import evaluation
    from orchestrator.stages.context import DONE

    done = make_store(pc.storage, identity.stage_prefix(pc, "teacher"))
    if not done.exists(DONE):
        raise SystemExit(
            f"score_checkpoints --grid: the teacher stage has no output at {done.uri(DONE)}; run it"
        )
    teacher_key = _json.loads(done.get(DONE)).get("teacher_key")
    model = build_model(pc.run.model.variant, pc.run.hkd_config())
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["ema"])
    d = pc.run.data
    tmp = evaluation.beside_teacher(
        pc,
        model.eval(),
        teacher_key,
        lambda: load_images(d.name, "train", resolution=d.resolution, root=d.root)[0],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), out)
    print(f"{out}: {Path(path).name} beside the teacher", flush=True)


if __name__ == "__main__":
    sys.exit(main())

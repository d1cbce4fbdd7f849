"""``hkd ship-teacher``: turn a trained teacher stage into a shipped teacher (hkd_core/shipped.py).

It takes the teacher stage's output for the given config (run ``hkd teacher`` with the same overrides
first), scores it through the evaluation path (Ray tasks) at every ``eval.teacher_nfe`` with N = eval.n,
measures the noise floor at the same N (N training images against the N reference test images), draws a
sample grid, and writes ``teacher.pt``, ``record.json`` and ``samples.png`` into ``--out``. Commit that
folder under ``hkd_core/shipped/`` and every pipeline with the same data and teacher config adopts it.

Each evaluation goes into the record's ``evals`` with its reference identity (the reference images' sha256,
the Inception weights' sha256, N, split, seeds): the evaluate stage reuses a score only under an equal
identity. Shipping into a folder that already holds the same weights adds (or replaces) the evaluation at
this N and keeps the others and the training facts, so a teacher can be scored at N = 10,000 later. Each score
(the teacher at one NFE under its weights' sha256, the floor under the reference alone) is cached in storage
(``teacher-scores/``) as soon as it is measured: an interrupted shipping, run again, measures only what is left
(at N = 10,000 on 2 cores each of them takes about 20 minutes):

    hkd teacher teacher=edm ... && hkd ship-teacher teacher=edm ... eval.n=1000 eval.teacher_nfe=[1,2,4,35] \\
        --out hkd_core/shipped/fmnist-edm
    hkd ship-teacher eval.n=10000 eval.teacher_nfe=[35] --out hkd_core/shipped/fmnist-edm
    hkd ship-teacher eval.n=10000 eval.teacher_nfe=[1,2,4] --out hkd_core/shipped/fmnist-edm

The last line adds NFE 1, 2 and 4 to the N = 10,000 evaluation and keeps its NFE 35 and its floor (the same
weights and identity: they still hold); a study that ran at N = 10,000 in this storage cached those scores, so
that shipping measures nothing, and every later study at N = 10,000 takes all its teacher rows from the record.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import torch

from hkd_core import evaluation as E
from hkd_core import metric_names as M
from hkd_core.shipped import same_eval
from orchestrator import identity
from orchestrator.services.storage import make_store
from orchestrator.stages import evaluation
from orchestrator.stages.context import DONE, OUTPUTS

log = logging.getLogger(__name__)


def merged_evals(record: dict | None, new: dict) -> list[dict]:
    """The record's evaluations with ``new`` added: one that has the same N, seed, split and reference identity
    is replaced, the others are kept (``record`` None: a new teacher, ``new`` alone). The replaced one's scores at
    the NFEs that ``new`` did not measure stay (the same weights, the same identity: they still hold), each under
    the command that measured it (``kept``), so a teacher shipped at NFE 35 can be scored at NFE 1, 2 and 4 later
    without measuring NFE 35 again."""
    if not record:
        return [new]
    old = same_eval(record, new)
    rest = [ev for ev in record.get("evals") or [] if ev is not old]
    if old is None:
        return rest + [new]
    kept = sorted(set(old.get("by_nfe") or {}) - set(new.get("by_nfe") or {}), key=int)
    if not kept:
        return rest + [new]
    merged = {**new, "by_nfe": {**old["by_nfe"], **new["by_nfe"]}}
    merged["kept"] = [
        *(old.get("kept") or []),
        {"nfe": kept, "command": old.get("command"), "git_sha": old.get("git_sha")},
    ]
    return rest + [merged]


def ship_teacher(pc, out: str | Path, command: str = "") -> dict:
    from hkd_core.data import DATASETS
    from hkd_core.figures import save_image_grid
    from hkd_core.shipped import write_shipped
    from hkd_core.teachers import build_teacher
    from orchestrator.stages.driver import init_ray

    out = Path(out)
    prefix = identity.stage_prefix(pc, "teacher")
    store = make_store(pc.storage, prefix)
    if pc.run.teacher.kind != "edm" or not store.exists(DONE):
        raise FileNotFoundError(
            f"no trained EDM teacher for this config at {store.uri('')}: run `hkd teacher` "
            f"with the same overrides first (teacher=edm)"
        )
    import json

    summary = json.loads(store.get(DONE))
    summary.pop(OUTPUTS, None)
    ema = torch.load(io.BytesIO(store.get("teacher.pt")), map_location="cpu", weights_only=True)
    init_ray(pc)
    t0 = time.perf_counter()
    ref = evaluation.reference(pc, progress=True)[0]
    # each score (the teacher at one NFE, the floor) is cached under this reference identity and these
    # weights as soon as it is measured, so an interrupted shipping at N = 10,000 resumes where it stopped
    ident = evaluation.teacher_identity(pc, f"{prefix}/teacher.pt")
    scores = {}
    for nfe in pc.run.eval.teacher_nfe:

        def measure(nfe=nfe):
            return evaluation.sample_scores(
                pc, ref, {"kind": "teacher", "nfe": nfe}, teacher_key=f"{prefix}/teacher.pt", progress=True
            )

        s = evaluation.cached_scores(pc, ident, f"nfe{nfe}", measure)
        scores[str(nfe)] = s
        log.info(
            "teacher at NFE %d: FID@%d %.2f, KID %.4f ± %.4f",
            nfe,
            pc.run.eval.n,
            s["fid"],
            s["kid"],
            s["kid_std"],
        )
    old = _existing_record(out) if _same_weights(out, ema) else None
    prior = same_eval(
        old,
        {
            "n": pc.run.eval.n,
            "seed": pc.run.eval.seed,
            "split": pc.run.eval.split,
            "reference": evaluation.identity_of(pc),
        },
    )
    floor = (prior or {}).get("noise_floor_train_vs_test") or evaluation.cached_scores(
        pc, evaluation.identity_of(pc), "floor", lambda: evaluation.noise_floor(pc, ref, progress=True)
    )
    channels = DATASETS[pc.run.data.name].channels
    teacher = build_teacher(pc.run.data, pc.run.teacher, None, ema, "shipping")
    # the grid at the fullest NFE the record will hold (NFE 35 kept from an earlier shipping included)
    nfe_full = max([*pc.run.eval.teacher_nfe, *map(int, (prior or {}).get("by_nfe") or {})] or [35])
    grid = E.teacher_generator(teacher, nfe_full)(
        E.noise(E.eval_seeds(pc.run.eval, 64), (channels, pc.run.data.resolution, pc.run.data.resolution))
    )
    save_image_grid(grid, out / "samples.png")
    new = {
        "n": pc.run.eval.n,
        "split": pc.run.eval.split,
        "seed": pc.run.eval.seed,
        "reference": evaluation.identity_of(pc),
        "by_nfe": scores,
        "noise_floor_train_vs_test": floor,
        "samples": f"samples.png: {len(grid)} samples at NFE {nfe_full}",
        "command": command,
        "eval_wall_s": time.perf_counter() - t0,
        "git_sha": identity.git_sha(),
    }
    facts = (
        {k: v for k, v in old.items() if k not in ("config", "teacher_hash", "weights_sha256", "evals")}
        if old
        else {
            "kimg": summary.get("kimg"),
            "train_wall_s": summary.get("wall_s"),  # the last segment's run
            "train_s": summary.get("train_s"),  # seconds of training, every segment together
            "source": summary.get("checkpoint_uri"),
            "params": sum(v.numel() for v in ema.values() if v.is_floating_point()),
            "command": command,
            "git_sha": identity.git_sha(),
        }
    )
    shipped = write_shipped(out, pc.run.data, pc.run.teacher, ema, **facts, evals=merged_evals(old, new))
    return {
        "folder": str(out),
        "record": shipped.record,
        "metrics": {
            **{M.teacher_fid(int(k)): v["fid"] for k, v in scores.items()},
            "floor/fid": floor["fid"],
        },
    }


def _existing_record(folder: Path) -> dict | None:
    import json

    try:
        return json.loads((folder / "record.json").read_text())
    except (OSError, ValueError):
        return None


def _same_weights(folder: Path, ema: dict) -> bool:
    """Does ``folder`` already ship exactly these tensors (then its record's facts and evaluations still hold)?"""
    try:
        old = torch.load(folder / "teacher.pt", map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - no file, or not a state dict: a new teacher
        return False
    return old.keys() == ema.keys() and all(torch.equal(old[k], ema[k].cpu()) for k in old)

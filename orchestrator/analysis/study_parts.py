"""A study in parts: ``hkd study --variants A,B --out DIR1`` now, ``hkd study --variants C,D --out DIR2`` later
(another session, another machine), then ``hkd study --merge DIR1 DIR2 --out DIR``: one table, one bar chart and
one set of curves, as if the variants had run in one study.

A study at N = 10,000 on two CPU cores takes about four hours per seed, more than one sitting; its parts are
each a whole ``hkd study`` (their own MLflow study run, their ``study.json``). Parts merge only when they were
run on the same base overrides (so on the same teacher, trajectories, budget, N and noise seeds; each part's
``study.json`` records them and the shared stages' content hashes) and name each variant once; the teacher's
scores may come from any part, and where two parts scored the same NFE they must agree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from orchestrator.analysis.study import curve_teacher, study_order
from orchestrator.config import compose, from_composed

# what every part must share to be one study (keys of a part's study.json)
SHARED = ("overrides", "shared_stages", "n")


class StudyMergeError(ValueError):
    pass


def read_part(folder: str | Path, flag: str = "--merge") -> dict:
    """A study folder's study.json, checked to hold what a merge (or ``--seeds``) needs."""
    path = Path(folder) / "study.json"
    if not path.is_file():
        raise StudyMergeError(
            f"hkd study {flag}: {path} does not exist; give the folders that `hkd study --out` wrote"
        )
    try:
        part = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StudyMergeError(f"hkd study {flag}: {path} is not JSON ({e})") from None
    missing = [k for k in (*SHARED, "variants", "teacher") if k not in part]
    if missing:
        raise StudyMergeError(
            f"hkd study {flag}: {path} lacks {', '.join(missing)}: it was written before studies could be "
            f"merged; run that part again (finished stages are skipped)"
        )
    part["_path"] = str(path)
    return part


def add_teacher(teacher: dict, study: dict, flag: str, why: str) -> None:
    """Adds ``study``'s teacher scores (by NFE) to ``teacher``; an NFE scored already must agree, or the studies
    were not scored alike (``why`` says what that means for the caller) and nothing combines."""
    for nfe, score in study["teacher"].items():
        nfe = int(nfe)
        if nfe in teacher and abs(teacher[nfe]["fid"] - score["fid"]) > 1e-6 * max(1.0, abs(score["fid"])):
            raise StudyMergeError(
                f"hkd study {flag}: the teacher at NFE {nfe} scores FID {score['fid']} in {study['_path']} and "
                f"{teacher[nfe]['fid']} in {teacher[nfe].get('_from', 'an earlier folder')}; {why}"
            )
        teacher.setdefault(nfe, {**score, "_from": study["_path"]})


def strip_sources(teacher: dict) -> dict:
    """The teacher rows without the bookkeeping ``add_teacher`` adds."""
    return {nfe: {k: v for k, v in score.items() if k != "_from"} for nfe, score in teacher.items()}


def merge_parts(parts: list[dict]) -> dict:
    """One study's results from its parts, its rows in the study's order (``study_order``); refuses parts of
    different studies."""
    if len(parts) < 2:
        raise StudyMergeError("hkd study --merge: give at least two part folders")
    first = parts[0]
    for p in parts[1:]:
        for key in SHARED:
            if p[key] != first[key]:
                raise StudyMergeError(
                    f"hkd study --merge: {p['_path']} and {first['_path']} differ in {key} "
                    f"({p[key]!r} against {first[key]!r}); only parts of one study (the same base overrides, "
                    f"teacher trajectories and N) merge"
                )
    found: dict = {}
    teacher: dict = {}
    floor = next((p["floor"] for p in parts if p.get("floor")), None)  # the data's: the same in every part
    for p in parts:
        for v, row in p["variants"].items():
            if v in found:
                raise StudyMergeError(
                    f"hkd study --merge: variant {v} is in {p['_path']} and in an earlier part; each variant "
                    f"belongs to one part"
                )
            found[v] = row
        add_teacher(teacher, p, "--merge", "the parts were not scored alike")
    variants = {v: found[v] for v in study_order(found)}  # the study's row order, not the parts'
    ident = hashlib.sha256(json.dumps([p["study"] for p in parts]).encode()).hexdigest()[:8]
    name = first["study"].split("-study-")[0]
    return {
        "study": f"{name}-study-merged-{ident}",
        "parts": [p["study"] for p in parts],
        "variants": variants,
        "teacher": strip_sources(teacher),
        **({"floor": floor} if floor else {}),
        "shared_s": next((p["shared_s"] for p in parts if p.get("shared_s")), {}),
        # variants a part named but had not finished when it stopped (and no other part ran)
        "pending": [v for p in parts for v in p.get("pending") or [] if v not in variants],
        "wall_s": sum(p.get("wall_s") or 0.0 for p in parts),
        "curve_n": first.get("curve_n", 0),
        **{k: first[k] for k in SHARED},
    }


def merge_study(folders: list[str | Path], out: str | Path) -> dict:
    """Read the parts, merge them, and write the merged table and figures into ``out``."""
    from orchestrator.analysis.study import to_markdown, write_outputs

    merged = merge_parts([read_part(f) for f in folders])
    pc = from_composed(compose(list(merged["overrides"])))
    full = max(merged["teacher"]) if merged["teacher"] else None
    merged["teacher_curve"] = curve_teacher(list(merged["overrides"]), merged["curve_n"], merged["n"], full)
    merged["markdown"] = to_markdown(merged, pc) + f"\nMerged from the parts {', '.join(merged['parts'])}.\n"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_outputs(merged, folder)
    merged["folder"] = str(folder)
    return merged

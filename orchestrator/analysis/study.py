"""``hkd study``: the quality study on Ray. Full HKD, the paper's cumulative ablation rows (DESIGN 1.4), KD (from
the teacher, and from scratch as the paper's KD) and the KDM-style model (HKD's trunk width), trained and
evaluated on the
same teacher trajectories with the same budget (images seen), and the teacher at NFE 1, 2, 4 and full; a
markdown table, a bar chart, with ``eval.curve_n`` FID-against-kimg curves and a table at equal wall-clock,
and an MLflow study run whose variants' pipeline runs carry the tag ``hkd.study`` (the MLflow UI's compare
view then shows them side by side).

Each variant is a pipeline with the base config plus its overrides. The teacher and trajectory stages do
not depend on the model or the training, so their content hashes are equal: they run once and every later
variant skips them. A rerun of the study skips every finished stage, so a stopped study resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import time
from pathlib import Path

from hkd_core import metric_names as M
from orchestrator import identity
from orchestrator.config import PipelineConfig, compose, from_composed

log = logging.getLogger(__name__)

# name -> (label, extra overrides). The first four are the paper's cumulative ablation table, in its order:
# (no Koopman, no consistency, hierarchical), (+ Koopman), (+ consistency, one level), (+ hierarchy = full).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "no_koopman_no_tcons": (
        "no Koopman, no consistency, hierarchical",
        ["model.variant=no_koopman", "train.states_per_traj=1"],
    ),
    "no_tcons": ("+ Koopman (no consistency, hierarchical)", ["train.states_per_traj=1"]),
    "one_level": ("+ consistency, one level (no hierarchy)", ["model.variant=one_level"]),
    "hkd": ("HKD (full): + hierarchy", []),
    "kd": ("KD (U-Net x_T -> x_0, the teacher's size)", ["model.variant=kd", "train.states_per_traj=1"]),
    "kd_scratch": (
        "KD from scratch (the paper's KD baseline)",
        ["model.variant=kd", "train.states_per_traj=1", "model.init=none"],
    ),
    "kdm": ("KDM-style (one global operator, HKD's trunk width)", ["model.variant=kdm"]),
    "hkd_scratch": ("HKD (full), not initialised from the teacher", ["model.init=none"]),
}
# Rows with trajectory consistency score s > 1 states per trajectory: the config's train.states_per_traj when it
# is > 1, else the paper's 4 (the default of 1 is the main job's choice at 2 CPU cores, not the paper's).
CONSISTENCY_ROWS = ("one_level", "hkd", "kdm", "hkd_scratch")
PAPER_STATES_PER_TRAJ = 4
ABLATION_ROWS = ("no_koopman_no_tcons", "no_tcons", "one_level", "hkd")  # DESIGN 1.4, top to bottom
DEFAULT_VARIANTS = ("no_koopman_no_tcons", "no_tcons", "one_level", "hkd", "kd", "kd_scratch", "kdm")


def study_order(names) -> list[str]:
    """Variant names in the study's table order (VARIANTS: the paper's ablation rows first); unknown names after
    them, in their given order. A merged or multi-seed table reads alike whatever order its parts ran in."""
    names = list(dict.fromkeys(names))
    return sorted((n for n in names if n in VARIANTS), key=list(VARIANTS).index) + [
        n for n in names if n not in VARIANTS
    ]


def row_label(v: str, pc: PipelineConfig) -> str:
    """A row's label with what its number depends on: the states per trajectory in its loss (s) and its init;
    a row with the adversarial term says it is beyond the paper."""
    beyond = ", adversarial: beyond the paper" if pc.run.train.adversarial_weight else ""
    return f"{VARIANTS[v][0]} [s = {pc.run.train.states_per_traj}, init {pc.run.model.init}{beyond}]"


def with_final(curve: list[dict], res: dict, e) -> list[dict]:
    """The distill stage's curve plus its last point, the evaluate stage's score (eval.curve_n = eval.n: the
    same seeds and reference, so the checkpoint evaluation leaves the final one to it)."""
    if not curve or e.curve_n != e.n:
        return curve
    m, d = res["evaluate"]["metrics"], res["distill"]
    if curve[-1]["kimg"] >= d["kimg"] - 1e-9:
        return curve
    return curve + [
        {
            "kimg": d["kimg"],
            "fid": m[M.FID],
            "kid": m[M.KID],
            "kid_std": m.get(M.KID_STD),
            "train_s": d.get("train_s"),
        }
    ]


def parse_variants(text: str | None) -> list[str]:
    names = [v.strip() for v in (text or ",".join(DEFAULT_VARIANTS)).split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise ValueError(
            f"--variants {text!r}: unknown {bad or 'empty list'}; choose from {', '.join(VARIANTS)}"
        )
    return names


def variant_configs(
    overrides: list[str], variants: list[str], teacher_nfe: list[int] | None = None
) -> tuple[str, dict[str, tuple[PipelineConfig, dict]]]:
    """Every variant's composed and validated config (before anything runs), and the study's id."""
    base = from_composed(compose(overrides))
    consistency = (
        [] if base.run.train.states_per_traj > 1 else [f"train.states_per_traj={PAPER_STATES_PER_TRAJ}"]
    )
    t = base.run.trajectories
    full = 2 * t.steps - 1 if t.sampler == "heun" else t.steps  # the NFE the trajectories were made with
    nfe = sorted(set(teacher_nfe if teacher_nfe is not None else [1, 2, 4, full]))
    ident = hashlib.sha256(json.dumps({"o": overrides, "v": variants, "t": nfe}).encode()).hexdigest()[:8]
    study = f"{base.name}-study-{ident}"
    out = {}
    for i, v in enumerate(variants):
        # the first variant also scores the teacher; the others need not repeat it
        extra = (
            (consistency if v in CONSISTENCY_ROWS else [])
            + VARIANTS[v][1]
            + [
                f"name={base.name}-{v}",
                "eval.teacher_nfe=[" + (",".join(map(str, nfe)) if i == 0 else "") + "]",
            ]
        )
        d = compose(overrides + extra)
        pc = from_composed(d)
        pc = dataclasses.replace(
            pc, tracking=dataclasses.replace(pc.tracking, tags={**pc.tracking.tags, "hkd.study": study})
        )
        out[v] = (pc, d)
    hashes = {v: pc.stages() for v, (pc, _) in out.items()}
    first = next(iter(hashes.values()))
    for v, h in hashes.items():
        if (h["teacher"], h["trajectories"]) != (first["teacher"], first["trajectories"]):
            raise ValueError(
                f"variant {v} would not share the teacher trajectories; its overrides change them"
            )
    return study, out


def part_fields(overrides: list[str], cfgs: dict) -> dict:
    """What a study's part records so that parts of one study merge (orchestrator/analysis/study_parts.py): its
    base overrides, the content hashes of the stages every variant shares, and N."""
    first = next(iter(cfgs.values()))[0]
    stages = first.stages()
    return {
        "overrides": list(overrides),
        "shared_stages": {k: stages[k] for k in ("teacher", "trajectories")},
        "n": first.run.eval.n,
    }


def curve_teacher(overrides: list[str], curve_n: int, n: int, nfe: int | None) -> dict | None:
    """The teacher at ``nfe`` at the curves' N (``eval.curve_n``), their reference line (FID depends on N: its floor
    is 22.6 at N = 1000, 2.4 at 10,000), from the shipped record where it was measured as an evaluation at that N
    would be (``recorded_teacher_scores``); None when the curves are at the study's N or there is no such score."""
    if not curve_n or curve_n == n or nfe is None:
        return None
    from hkd_core.data import DataError
    from hkd_core.inception import WeightsError, weights_path
    from orchestrator.stages.evaluation import recorded_teacher_scores  # the stage's own rule for reuse

    pc = from_composed(compose([*overrides, f"eval.n={curve_n}"]))
    try:  # on this machine only (a merge needs no service): the weights' and the reference images' sha256
        weights_path(pc.run.eval.inception_weights)
        scores, _ = recorded_teacher_scores(pc)
    except (WeightsError, DataError) as e:
        log.warning("no teacher line at the curves' N = %d (%s)", curve_n, e)
        return None
    if nfe not in scores:
        return None
    return {**{k: scores[nfe].get(k) for k in ("fid", "kid", "kid_std")}, "nfe": nfe, "n": curve_n}


def run_study(
    overrides: list[str],
    variants: list[str],
    teacher_nfe: list[int] | None = None,
    progress: bool = True,
    out: str | Path | None = None,
) -> dict:
    from orchestrator.services.tracking import Tracker
    from orchestrator.stages.driver import run_stages

    study, cfgs = variant_configs(overrides, variants, teacher_nfe)
    t0 = time.perf_counter()
    results: dict = {"study": study, "variants": {}, "teacher": {}, **part_fields(overrides, cfgs)}
    first = next(iter(cfgs.values()))[0]
    results["curve_n"] = first.run.eval.curve_n
    folder = Path(out or Path("runs") / study)
    for v, (pc, _) in cfgs.items():
        log.info("study %s: variant %s (%s)", study, v, row_label(v, pc))
        res = run_stages(pc, "evaluate", progress)
        m = res["evaluate"]["metrics"]
        results["variants"][v] = {
            "label": row_label(v, pc),
            "s": pc.run.train.states_per_traj,
            "init": pc.run.model.init,
            "fid": m[M.FID],
            "kid": m[M.KID],
            "n": int(m[M.EVAL_N]),
            "kimg": res["distill"]["kimg"],
            "train_s": res["distill"].get("train_s"),
            "params": res["distill"].get("params"),
            "pipeline_run_id": res["_parent_run_id"],
            "kid_std": m.get(M.KID_STD),
            "curve": with_final(res["distill"].get("curve", []), res, pc.run.eval),
            "skipped": res.get("_skipped", []),
            # the stages' own seconds, also when this run skipped them (a resumed study): what the row costs
            "stage_s": {"distill": res["distill"].get("wall_s"), "evaluate": m.get(M.EVAL_S)},
        }
        results.setdefault(
            "shared_s", {k: res[k].get("wall_s") for k in ("teacher", "trajectories") if k in res}
        )
        for k, val in m.items():
            nfe = M.teacher_nfe_of(k)
            if nfe is not None:
                results["teacher"][nfe] = {
                    "fid": val,
                    "kid": m.get(M.teacher_kid(nfe)),
                    "kid_std": m.get(M.teacher_kid_std(nfe)),
                    "n": int(m[M.EVAL_N]),
                }
        if M.NOISE_FLOOR_FID in m:
            results["floor"] = {
                "fid": m[M.NOISE_FLOOR_FID],
                "kid": m.get(M.NOISE_FLOOR_KID),
                "n": int(m[M.EVAL_N]),
            }
        results["_tracking_uri"], results["_experiment_id"] = res["_tracking_uri"], res["_experiment_id"]
        results["wall_s"] = time.perf_counter() - t0
        results["pending"] = [w for w in cfgs if w not in results["variants"]]
        if results["pending"]:  # what has finished is on disk at once: a part stopped later keeps it
            results["markdown"] = to_markdown(results, first)
            write_outputs(results, folder)
    del results["pending"]
    full = max(results["teacher"]) if results["teacher"] else None
    results["teacher_curve"] = curve_teacher(overrides, results["curve_n"], first.run.eval.n, full)
    md = to_markdown(results, first)
    results["markdown"] = md
    paths = write_outputs(results, folder)
    tracker = Tracker(first.tracking)
    run_id = tracker.open_run(
        identity.study_run_key(study), study, None, {"hkd.stage": "study", "hkd.study": study}
    )
    tracker.log_params(
        run_id,
        {"study": {"variants": variants, "overrides": overrides, "teacher_nfe": sorted(results["teacher"])}},
    )
    metrics = {M.study(v, "fid"): r["fid"] for v, r in results["variants"].items()}
    metrics.update({M.study(v, "kid"): r["kid"] for v, r in results["variants"].items()})
    metrics.update({M.study(f"teacher_nfe{k}", "fid"): r["fid"] for k, r in results["teacher"].items()})
    metrics[M.STUDY_WALL_S] = results["wall_s"]
    tracker.log_metrics(run_id, metrics, 0)
    for p in paths:
        tracker.log_artifact(run_id, p, "study")
    tracker.end(run_id)
    results.update({"_study_run_id": run_id, "folder": str(folder)})
    return results


def to_markdown(r: dict, pc: PipelineConfig) -> str:
    t = pc.run.train
    n = next(iter(r["variants"].values()))["n"] if r["variants"] else 0
    lines = [
        f"Quality study `{r['study']}`: {pc.run.data.name} {pc.run.data.resolution}x{pc.run.data.resolution}, "
        f"{pc.run.teacher.kind} teacher, {pc.run.trajectories.num} trajectories, every model trained for "
        f"{t.total_kimg:g} kimg (batch {t.batch_size}); FID/KID with N = {n} (standard Inception).",
        "",
        "**At equal images seen**"
        + (f" (ratios to the teacher at {max(r['teacher'])} NFE)" if r["teacher"] else ""),
        "",
        "| model | NFE | KID x1e3 (± std) | KID ratio | FID | FID ratio | kimg | train s | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in r["variants"].values():
        kr, fr = ratios(v, r["teacher"])
        lines.append(
            f"| {v['label']} | 1 | {_kid(v)} | {kr} | {v['fid']:.2f} | {fr} | {v['kimg']:.2f} | "
            f"{(v['train_s'] or 0):.0f} | {v['params'] or 0:,} |"
        )
    for nfe, tr in sorted(r["teacher"].items()):
        kr, fr = ratios(tr, r["teacher"])
        lines.append(
            f"| teacher ({pc.run.teacher.kind}, Heun) | {nfe} | {_kid(tr)} | {kr} | {tr['fid']:.2f} | {fr} "
            "| - | - | - |"
        )
    floor = r.get("floor")
    if floor:
        kid = f", KID x1e3 {floor['kid'] * 1e3:.1f}" if floor.get("kid") is not None else ""
        lines += ["", f"Floor at N = {floor['n']}: FID {floor['fid']:.2f}{kid} (N real training images)."]
    wall = equal_wall(r)
    if wall:
        lines += [
            "",
            f"**At equal wall-clock**: each model's curve point (eval.curve_n = {wall['n']}) with the most "
            f"training seconds up to {wall['seconds']:.0f} s, the shortest run's total.",
            "",
            "| model | kimg | train s | FID | KID x1e3 (± std) |",
            "|---|---|---|---|---|",
        ]
        for v, p in wall["rows"].items():
            secs = f"{p['train_s']:.0f}" + (
                " (its first point: past the budget)" if p.get("past_budget") else ""
            )
            lines.append(
                f"| {r['variants'][v]['label']} | {p['kimg']:.2f} | {secs} | {p['fid']:.2f} | {_kid(p)} |"
            )
        if any(p.get("past_budget") for p in wall["rows"].values()):
            lines += [
                "",
                "A row marked past the budget has no curve point within it (a smaller train.checkpoint_every_kimg "
                "scores its curve at more points).",
            ]
    if r.get("pending"):
        lines += [
            "",
            f"Not run yet: {', '.join(r['pending'])} (the same command again resumes, skipping what finished).",
        ]
    cost = stage_seconds(r)
    lines += [
        "",
        f"The command's wall-clock {r['wall_s'] / 60:.1f} min (a resumed study counts what it ran, a merged one "
        "sums its parts')"
        + (f"; the stages' own time {cost / 60:.1f} min (the shared stages once)" if cost else "")
        + ". Each model row is a pipeline run tagged "
        f"`hkd.study = {r['study']}` in MLflow.",
    ]
    return "\n".join(lines) + "\n"


def stage_seconds(r: dict) -> float:
    """What the study's rows cost from scratch: the shared stages once and every variant's distill and evaluate
    stages, from their own records (a resumed study's wall-clock counts only what it ran)."""
    own = [x for row in r["variants"].values() for x in (row.get("stage_s") or {}).values()]
    return sum(x for x in [*(r.get("shared_s") or {}).values(), *own] if x)


def ratios(row: dict, teacher: dict) -> tuple[str, str]:
    """KID and FID of ``row`` over the teacher's at its fullest NFE, formatted; "-" where there is no teacher or
    its KID is within its std of 0 (then a ratio of it means nothing)."""
    if not teacher:
        return "-", "-"
    t = teacher[max(teacher)]
    kid_ok = row.get("kid") is not None and t.get("kid") is not None and t["kid"] > (t.get("kid_std") or 0)
    return (f"{row['kid'] / t['kid']:.2f}" if kid_ok else "-"), f"{row['fid'] / t['fid']:.2f}"


def _kid(row: dict) -> str:
    if row.get("kid") is None:
        return "-"
    std = f" ± {row['kid_std'] * 1e3:.1f}" if row.get("kid_std") is not None else ""
    return f"{row['kid'] * 1e3:.1f}{std}"


def equal_wall(r: dict) -> dict | None:
    """Every variant at the same training seconds: its last curve point at or before the shortest run's total."""
    curves = {
        v: [p for p in row.get("curve") or [] if p.get("train_s") is not None]
        for v, row in r["variants"].items()
    }
    if not curves or not all(curves.values()):
        return None
    budget = min(c[-1]["train_s"] for c in curves.values())
    rows = {}
    for v, c in curves.items():
        within = [p for p in c if p["train_s"] <= budget * 1.0001]
        # a run with no point inside the budget shows its first point, marked: it is not at equal seconds
        rows[v] = within[-1] if within else {**c[0], "past_budget": True}
    n = r.get("curve_n", 0)
    return {"seconds": budget, "rows": rows, "n": n}


def write_outputs(r: dict, folder: Path) -> list[Path]:
    from orchestrator.analysis import study_figures

    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "study.md"
    md.write_text(r["markdown"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "nfe", "fid", "kid", "kid_std", "n", "kimg", "train_s", "params"])
    for v, row in r["variants"].items():
        w.writerow([v, 1, *(row.get(k) for k in ("fid", "kid", "kid_std", "n", "kimg", "train_s", "params"))])
    for nfe, tr in sorted(r["teacher"].items()):
        w.writerow(
            [f"teacher_nfe{nfe}", nfe, tr["fid"], tr.get("kid"), tr.get("kid_std"), tr["n"], "", "", ""]
        )
    table = folder / "study.csv"
    table.write_text(buf.getvalue())
    # written whole or not at all: a part stopped mid-write keeps its last study.json
    tmp = folder / "study.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, indent=1, default=str))
    tmp.replace(folder / "study.json")
    study_figures.bars(r, folder / "study_fid.png")
    out = [md, table, folder / "study.json", folder / "study_fid.png"]
    if any(row.get("curve") for row in r["variants"].values()):
        out.append(study_figures.curves(r, folder / "study_curves.png", ABLATION_ROWS, tuple(VARIANTS)))
    return out

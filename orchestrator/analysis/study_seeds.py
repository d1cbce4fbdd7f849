"""A study over seeds: ``hkd study --seeds DIR0 DIR1 --out DIR`` puts the same study run at several
``train.seed`` values (each a whole or merged ``hkd study`` folder) into one table: per model, every seed's KID and
FID, their mean and their spread over seeds, and the ratios of the means to the teacher at its fullest NFE.

The per-seed KID std (over subsets of one sample set) says how well one run's score is measured; the spread over
seeds says how much the recipe's result moves with the student's initial noise and data order. Both go in the
table, so a difference between two rows can be read against both. Studies combine only when they differ in
``train.seed`` alone: the same other overrides, the same teacher (its stage hash), the same N; their teacher rows,
which do not depend on the student's seed, must agree.

    hkd study experiment=study_fmnist eval.n=10000 --out runs/seed0
    hkd study experiment=study_fmnist eval.n=10000 train.seed=1 --out runs/seed1
    hkd study --seeds runs/seed0 runs/seed1 --out runs/seeds
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from pathlib import Path

from orchestrator.analysis.study import ratios, study_order
from orchestrator.analysis.study_parts import StudyMergeError, add_teacher, read_part, strip_sources

SEED = re.compile(r"^\+{0,2}train\.seed=")


def base_overrides(overrides: list[str]) -> list[str]:
    """A study's overrides without its ``train.seed``."""
    return [o for o in overrides if not SEED.match(o)]


def seed_of(study: dict) -> int:
    """The student's seed the study ran with: its ``train.seed`` override, else the composed default."""
    given = [o for o in study["overrides"] if SEED.match(o)]
    if given:
        value = given[-1].split("=", 1)[1]
        try:
            return int(value)
        except ValueError:
            raise StudyMergeError(
                f"hkd study --seeds: {study['_path']} has train.seed={value!r}, not an integer"
            ) from None
    from orchestrator.config import compose, from_composed

    return from_composed(compose(list(study["overrides"]))).run.train.seed


def _check_alike(studies: list[dict]) -> None:
    first = studies[0]
    for s in studies[1:]:
        checks = (
            (
                "overrides other than train.seed",
                base_overrides(s["overrides"]),
                base_overrides(first["overrides"]),
            ),
            ("N", s["n"], first["n"]),
            ("teacher stage", s["shared_stages"].get("teacher"), first["shared_stages"].get("teacher")),
        )
        for what, a, b in checks:
            if a != b:
                raise StudyMergeError(
                    f"hkd study --seeds: {s['_path']} and {first['_path']} differ in their {what} ({a!r} against "
                    f"{b!r}); only one study run at several train.seed values combines"
                )


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def combine_seeds(studies: list[dict]) -> dict:
    """One table's data from the same study at several seeds (each a study.json as ``read_part`` reads it)."""
    if len(studies) < 2:
        raise StudyMergeError("hkd study --seeds: give at least two study folders, one per seed")
    _check_alike(studies)
    seeds = [seed_of(s) for s in studies]
    for i, s in enumerate(seeds):
        if s in seeds[:i]:
            other = studies[seeds.index(s)]["_path"]
            raise StudyMergeError(
                f"hkd study --seeds: {studies[i]['_path']} and {other} both ran at train.seed={s}; give one "
                f"folder per seed (merge the parts of one seed first: hkd study --merge)"
            )
    teacher: dict = {}
    for st in studies:
        add_teacher(
            teacher,
            st,
            "--seeds",
            "the teacher does not depend on the student's seed, so these were not scored alike",
        )
    teacher = strip_sources(teacher)
    order = study_order(v for st in studies for v in st["variants"])
    variants: dict = {}
    for v in order:
        per_seed = {
            seed: st["variants"][v] for seed, st in zip(seeds, studies, strict=True) if v in st["variants"]
        }
        first = next(iter(per_seed.values()))
        kids = [r["kid"] for r in per_seed.values() if r.get("kid") is not None]
        fids = [r["fid"] for r in per_seed.values()]
        row = {
            "label": first["label"],
            "s": first.get("s"),
            "init": first.get("init"),
            "n": first["n"],
            "seeds": {
                str(seed): {
                    k: r.get(k)
                    for k in ("kid", "kid_std", "fid", "kimg", "train_s", "params", "pipeline_run_id")
                }
                for seed, r in per_seed.items()
            },
            "missing_seeds": [s for s in seeds if s not in per_seed],
            "kid": statistics.fmean(kids) if kids else None,
            "fid": statistics.fmean(fids),
            "kid_spread": _spread(kids),
            "fid_spread": _spread(fids),
            # one run's KID std over subsets, averaged over the seeds: how well each seed's score is measured
            "kid_std": statistics.fmean(
                [r["kid_std"] for r in per_seed.values() if r.get("kid_std") is not None]
            )
            if any(r.get("kid_std") is not None for r in per_seed.values())
            else None,
        }
        row["kid_ratio"], row["fid_ratio"] = ratios(row, teacher)
        variants[v] = row
    ident = hashlib.sha256(json.dumps([s["study"] for s in studies]).encode()).hexdigest()[:8]
    name = studies[0]["study"].split("-study-")[0]
    floor = next((s["floor"] for s in studies if s.get("floor")), None)
    return {
        "study": f"{name}-study-seeds-{ident}",
        "studies": [s["study"] for s in studies],
        "folders": [str(Path(s["_path"]).parent) for s in studies],
        "seeds": seeds,
        "overrides": base_overrides(studies[0]["overrides"]),
        "n": studies[0]["n"],
        "variants": variants,
        "teacher": teacher,
        **({"floor": floor} if floor else {}),
        "pending": sorted({v for s in studies for v in s.get("pending") or []}),
    }


def _per_seed(row: dict, key: str, scale: float, seeds: list[int]) -> str:
    vals = []
    for s in seeds:
        r = row["seeds"].get(str(s))
        vals.append("-" if r is None or r.get(key) is None else f"{r[key] * scale:.1f}")
    return " / ".join(vals)


def to_markdown(r: dict) -> str:
    seeds = r["seeds"]
    names = " / ".join(str(s) for s in seeds)
    lines = [
        f"Quality study over seeds `{r['study']}` (train.seed = {names}; the same teacher, trajectories, budget, "
        f"N = {r['n']} and evaluation noise in each): {', '.join(f'`{o}`' for o in r['overrides'])}.",
        "",
        f"Mean over seeds ± their spread (the sample std over seeds), then each seed's value (seeds {names}); "
        + (
            f"ratios of the means to the teacher at {max(r['teacher'])} NFE."
            if r["teacher"]
            else "no teacher."
        ),
        "",
        "| model | KID x1e3, mean ± spread | KID per seed | KID std per run | KID ratio | FID, mean ± spread "
        "| FID per seed | FID ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pm(mean, spread, scale):
        if mean is None:
            return "-"
        return f"{mean * scale:.1f}" + (f" ± {spread * scale:.1f}" if spread is not None else " (one seed)")

    for row in r["variants"].values():
        std = f"{row['kid_std'] * 1e3:.1f}" if row.get("kid_std") is not None else "-"
        lines.append(
            f"| {row['label']} | {pm(row['kid'], row['kid_spread'], 1e3)} | {_per_seed(row, 'kid', 1e3, seeds)} | "
            f"{std} | {row['kid_ratio']} | {pm(row['fid'], row['fid_spread'], 1.0)} | "
            f"{_per_seed(row, 'fid', 1.0, seeds)} | {row['fid_ratio']} |"
        )
    for nfe, tr in sorted(r["teacher"].items()):
        kr, fr = ratios(tr, r["teacher"])
        kid = f"{tr['kid'] * 1e3:.1f}" if tr.get("kid") is not None else "-"
        std = f"{tr['kid_std'] * 1e3:.1f}" if tr.get("kid_std") is not None else "-"
        lines.append(f"| teacher, {nfe} NFE | {kid} | - | {std} | {kr} | {tr['fid']:.2f} | - | {fr} |")
    floor = r.get("floor")
    if floor:
        lines += ["", f"Floor at N = {floor['n']}: FID {floor['fid']:.2f} (N real training images)."]
    missing = {v: row["missing_seeds"] for v, row in r["variants"].items() if row["missing_seeds"]}
    if missing:
        lines += [
            "",
            "Not at every seed yet: "
            + "; ".join(f"{v} (seed {', '.join(map(str, s))})" for v, s in missing.items())
            + ". Their mean is over the seeds they have.",
        ]
    lines += ["", f"From the studies {', '.join(r['studies'])}."]
    return "\n".join(lines) + "\n"


def seed_points(r: dict, key: str, scale: float) -> list[tuple]:
    """Each seed's value of ``key`` per model row as (x, y, its KID std or None, the seed's index, its legend
    label the first time only): seeds side by side within a row, one colour per seed whichever rows have it."""
    order = [str(s) for s in r["seeds"]]
    out, labelled = [], set()
    for i, row in enumerate(r["variants"].values()):
        for seed, s in row["seeds"].items():
            if s.get(key) is None:
                continue
            j = order.index(str(seed))
            err = s["kid_std"] * scale if key == "kid" and s.get("kid_std") is not None else None
            y = i + 0.2 * (j - (len(order) - 1) / 2)
            out.append((s[key] * scale, y, err, j, None if str(seed) in labelled else f"seed {seed}"))
            labelled.add(str(seed))
    return out


def seeds_figure(r: dict, path: Path) -> Path:
    """Per model the mean KID and FID over seeds as bars, each seed's value a dot (KID with its std over subsets),
    the teacher's rows gray."""
    from hkd_core.figures import plt
    from orchestrator.analysis.study_figures import axis_limit, clipped_barh, title

    rows = list(r["variants"].values())
    teacher = [(f"teacher NFE {k}", r["teacher"][k]) for k in sorted(r["teacher"])]
    labels = [row["label"] for row in rows] + [name for name, _ in teacher]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.4), sharey=True)
    for ax, key, scale in ((axes[0], "kid", 1e3), (axes[1], "fid", 1.0)):
        means = [(row.get(key) or 0) * scale for row in rows] + [
            (t.get(key) or 0) * scale for _, t in teacher
        ]
        colors = ["tab:blue"] * len(rows) + ["tab:gray"] * len(teacher)
        dots = [s[key] * scale for row in rows for s in row["seeds"].values() if s.get(key) is not None]
        focus = means[: len(rows)] + dots + means[-1:]  # the models, each seed, the teacher's fullest NFE
        clipped_barh(ax, means, colors, limit=axis_limit(focus, means + dots), alpha=0.6)
        for x, y, err, j, label in seed_points(r, key, scale):
            ax.errorbar(
                x, y, xerr=err, fmt="o", ms=4, color=f"C{j + 1}", elinewidth=0.8, capsize=2, label=label
            )
    floor = r.get("floor")
    if floor:
        axes[1].axvline(floor["fid"], color="k", ls=":", lw=1, label=f"floor at N = {floor['n']}")
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"KID x1e3 at N = {r['n']}: seeds' mean (bar), each seed (dot ± its std)")
    axes[1].set_xlabel(f"FID at N = {r['n']}: seeds' mean (bar), each seed (dot)")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title(r), fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def combine_study_seeds(folders: list[str | Path], out: str | Path) -> dict:
    """Read the studies, combine them, and write seeds.json, seeds.md and seeds.png into ``out``."""
    from hkd_core.blobstore import atomic_write_bytes

    r = combine_seeds([read_part(f, flag="--seeds") for f in folders])
    r["markdown"] = to_markdown(r)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "seeds.json", (json.dumps(r, indent=1, default=float) + "\n").encode())
    (folder / "seeds.md").write_text(r["markdown"])
    seeds_figure(r, folder / "seeds.png")
    r["folder"] = str(folder)
    return r

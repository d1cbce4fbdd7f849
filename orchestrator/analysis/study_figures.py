"""The quality study's figures: every row's KID (with its std over subsets) beside its FID, and the curves of
both against kimg and against training seconds. KID leads: it is unbiased at any N, while FID at N = 1000 carries a
floor of about 22.6 that squeezes every difference (docs/results/issue23)."""

from __future__ import annotations

from pathlib import Path

# the bars' axis ends at this many times the largest model row: the teacher at 1-2 NFE is far out
OFF_SCALE = 1.3


def title(r: dict) -> str:
    """The study's id over the overrides it ran with (its N, seed and budget are there)."""
    over = " ".join(r.get("overrides") or [])
    return f"{r['study']}\n{over}" if over else r["study"]


def axis_limit(focus: list[float], everything: list[float]) -> float | None:
    """Where a bar axis ends so that the rows in ``focus`` (the models, the teacher at its fullest NFE) keep their
    differences readable: OFF_SCALE x their largest value, or None when every value fits under it anyway."""
    top = max((v for v in focus if v is not None), default=0.0)
    if top <= 0 or max(everything, default=0.0) <= OFF_SCALE * top:
        return None
    return OFF_SCALE * top


def clipped_barh(
    ax, values: list[float], colors: list[str], errs: list[float] | None = None, limit=None, **kw
):
    """Horizontal bars with their values written at their ends; a bar past ``limit`` is cut there and its label
    ends with an arrow: its value is off the scale."""
    shown = [min(v, limit) if limit else v for v in values]
    cut = [s < v for s, v in zip(shown, values, strict=True)]
    xerr = [0.0 if c else e for c, e in zip(cut, errs, strict=True)] if errs else None
    ax.barh(range(len(values)), shown, xerr=xerr, color=colors, error_kw={"lw": 0.8, "capsize": 2}, **kw)
    for i, (v, s, c) in enumerate(zip(values, shown, cut, strict=True)):
        ax.text(s, i, f" {v:.1f}" + (" →" if c else ""), va="center", fontsize=7)
    if limit:
        ax.set_xlim(0, limit * 1.12)


def bars(r: dict, path: Path) -> Path:
    """One bar per model and per teacher NFE: KID x1e3 with its std (left), FID (right), the floor dotted."""
    from hkd_core.figures import plt

    rows = [(row["label"], row) for row in r["variants"].values()]
    rows += [(f"teacher NFE {k}", r["teacher"][k]) for k in sorted(r["teacher"])]
    colors = ["tab:blue"] * len(r["variants"]) + ["tab:gray"] * len(r["teacher"])
    full = [len(rows) - 1] if r["teacher"] else []  # the teacher's fullest NFE stays on the scale
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, key, scale in ((axes[0], "kid", 1e3), (axes[1], "fid", 1.0)):
        vals = [(row.get(key) or 0) * scale for _, row in rows]
        focus = vals[: len(r["variants"])] + [vals[i] for i in full]
        errs = [(row.get("kid_std") or 0) * 1e3 for _, row in rows] if key == "kid" else None
        clipped_barh(ax, vals, colors, errs, axis_limit(focus, vals))
    floor = r.get("floor")
    if floor:
        axes[1].axvline(floor["fid"], color="k", ls=":", lw=1, label=f"floor at N = {floor['n']}")
        axes[1].legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    n = next(iter(r["variants"].values()))["n"] if r["variants"] else "?"
    axes[0].set_xlabel(f"KID x1e3 at N = {n}, ± std over subsets (lower is better)")
    axes[1].set_xlabel(f"FID at N = {n} (lower is better; → off the scale)")
    fig.suptitle(title(r), fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def curve_reference(r: dict, key: str) -> tuple[float, str] | None:
    """The teacher's line on the curves' ``key`` (kid or fid) panels: its score at the curves' N (the study's
    ``teacher_curve``, from the shipped record), else its row at the study's N where that is the curves' N too,
    or, for KID alone, at another N (KID is unbiased in N; FID is not, so no FID line is drawn from another N)."""
    tc = r.get("teacher_curve")
    if tc and tc.get(key) is not None:
        return tc[key], f"teacher, {tc['nfe']} NFE (N = {tc['n']})"
    if not r.get("teacher"):
        return None
    full = max(r["teacher"])
    t = r["teacher"][full]
    same_n = t.get("n") == r.get("curve_n")
    if t.get(key) is None or not (same_n or key == "kid"):
        return None
    note = "" if same_n else "; KID is unbiased in N"
    return t[key], f"teacher, {full} NFE (N = {t.get('n', '?')}{note})"


def curves(r: dict, path: Path, solid: tuple[str, ...] = (), palette: tuple[str, ...] = ()) -> Path:
    """KID (top) and FID (bottom) of every checkpoint against kimg (left) and training seconds (right), one line
    per variant (``solid``: the ablation rows; the others dashed; a variant in ``palette`` has the colour of its
    place there, the same in every study), the teacher's fullest NFE as a dotted line at the curves' N
    (``curve_reference``); the legend under the panels."""
    names = list(palette) + [v for v in r["variants"] if v not in palette]
    from hkd_core.figures import plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col", sharey="row")
    for v, row in r["variants"].items():
        c = row.get("curve") or []
        style = "-o" if v in solid else "--s"
        for i, (key, scale) in enumerate((("kid", 1e3), ("fid", 1.0))):
            for j, x in enumerate(("kimg", "train_s")):
                pts = [(p[x], p[key] * scale) for p in c if p.get(x) is not None and p.get(key) is not None]
                if pts:
                    axes[i][j].plot(
                        *zip(*pts), style, ms=3, color=f"C{names.index(v) % 10}", label=row["label"]
                    )
    for i, (key, scale) in enumerate((("kid", 1e3), ("fid", 1.0))):
        ref = curve_reference(r, key)
        for ax in axes[i] if ref else ():
            ax.axhline(ref[0] * scale, color="gray", ls=":", label=ref[1])
    n = r.get("curve_n", "?")
    axes[0][0].set_ylabel(f"KID x1e3 at N = {n} (NFE 1)")
    axes[1][0].set_ylabel(f"FID at N = {n} (NFE 1)")
    axes[1][0].set_xlabel("kimg (trajectories seen)")
    axes[1][1].set_xlabel("training seconds")
    handles: dict = {}
    for ax in (axes[0][0], axes[1][0]):
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="upper center",
            bbox_to_anchor=(0.5, 0.02),
            ncol=2,
            fontsize=7,
            frameon=False,
        )
    fig.suptitle(title(r), fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

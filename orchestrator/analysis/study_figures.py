"""The quality study's figures: every row's KID (with its std over subsets) beside its FID, and the curves of
both against kimg and against training seconds. KID leads: it is unbiased at any N, while FID at N = 1000 carries a
floor of about 22.6 that squeezes every difference (docs/results/issue23)."""

from __future__ import annotations

from pathlib import Path


def bars(r: dict, path: Path) -> Path:
    """One bar per model and per teacher NFE: KID x1e3 with its std (left), FID (right), the floor dotted."""
    from hkd_core.figures import plt

    rows = [(row["label"], row) for row in r["variants"].values()]
    rows += [(f"teacher NFE {k}", r["teacher"][k]) for k in sorted(r["teacher"])]
    colors = ["tab:blue"] * len(r["variants"]) + ["tab:gray"] * len(r["teacher"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.2), sharey=True)
    ys = range(len(rows))
    kid = [(row.get("kid") or 0) * 1e3 for _, row in rows]
    std = [(row.get("kid_std") or 0) * 1e3 for _, row in rows]
    fid = [row["fid"] for _, row in rows]
    axes[0].barh(ys, kid, xerr=std, color=colors, error_kw={"lw": 0.8, "capsize": 2})
    axes[1].barh(ys, fid, color=colors)
    for ax, vals, fmt in ((axes[0], kid, "{:.1f}"), (axes[1], fid, "{:.1f}")):
        for i, v in enumerate(vals):
            ax.text(v, i, " " + fmt.format(v), va="center", fontsize=7)
    floor = r.get("floor")
    if floor:
        axes[1].axvline(floor["fid"], color="k", ls=":", lw=1, label=f"floor at N = {floor['n']}")
        axes[1].legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(list(ys), [name for name, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    n = next(iter(r["variants"].values()))["n"] if r["variants"] else "?"
    axes[0].set_xlabel(f"KID x1e3 at N = {n}, ± std over subsets (lower is better)")
    axes[1].set_xlabel(f"FID at N = {n} (lower is better)")
    fig.suptitle(r["study"], fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def curves(r: dict, path: Path, solid: tuple[str, ...] = ()) -> Path:
    """KID (top) and FID (bottom) of every checkpoint against kimg (left) and training seconds (right), one line
    per variant (``solid``: the ablation rows; the others dashed), the teacher's fullest NFE as a dotted line."""
    from hkd_core.figures import plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col", sharey="row")
    for v, row in r["variants"].items():
        c = row.get("curve") or []
        style = "-o" if v in solid else "--s"
        for i, (key, scale) in enumerate((("kid", 1e3), ("fid", 1.0))):
            for j, x in enumerate(("kimg", "train_s")):
                pts = [(p[x], p[key] * scale) for p in c if p.get(x) is not None and p.get(key) is not None]
                if pts:
                    axes[i][j].plot(*zip(*pts), style, ms=3, label=row["label"])
    full = max(r["teacher"]) if r["teacher"] else None
    for i, (key, scale) in enumerate((("kid", 1e3), ("fid", 1.0))):
        t = r["teacher"].get(full, {}).get(key) if full is not None else None
        for ax in axes[i]:
            if t is not None:
                ax.axhline(
                    t * scale,
                    color="gray",
                    ls=":",
                    label=f"teacher, {full} NFE (N = {r['teacher'][full].get('n', '?')})",
                )
    n = r.get("curve_n", "?")
    axes[0][0].set_ylabel(f"KID x1e3 at N = {n} (NFE 1)")
    axes[1][0].set_ylabel(f"FID at N = {n} (NFE 1)")
    axes[1][0].set_xlabel("kimg (trajectories seen)")
    axes[1][1].set_xlabel("training seconds")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(r["study"], fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

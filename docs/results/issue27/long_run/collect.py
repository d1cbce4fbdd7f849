"""The CIFAR-10 long run's figures and JSON, from its MLflow runs (the local stack, or any tracking URI).

    python docs/results/issue27/long_run/collect.py http://127.0.0.1:5000 docs/results/issue27/long_run

Reads ``headline.json`` in the folder (written by ``hkd pipeline --headline``: the pipeline and evaluate run
ids). Writes ``long_run.json`` (the headline; the FID/KID curve at N = eval.curve_n that the distill stage scored
at each checkpoint, with the images seen and training seconds of each point; the held-out and training
trajectories' error and the loss against kimg), ``curves.png`` (the curve against kimg and seconds beside the two
errors) and copies the evaluate stage's figures: the samples beside the teacher's on the same noise, the spectrum
and the band figures.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

SERIES = ("train/loss", "train/holdout_mse", "train/train_mse", "train/train_s", "curve/fid", "curve/kid")
FIGURES = (
    "figures/samples_vs_teacher.png",
    "figures/band_trajectory.png",
    "figures/band_masking.png",
    "spectra/spectrum.png",
    "spectra/spectrum_gauges.png",
)


def history(c, run_id: str, key: str) -> dict[int, float]:
    """step (images seen) -> value; a step logged twice (a resumed attempt redoes the steps after its
    checkpoint) keeps its last value."""
    return {m.step: m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def main(uri: str, folder: str) -> None:
    c = MlflowClient(uri)
    folder = Path(folder)
    head = json.loads((folder / "headline.json").read_text())
    ev = c.get_run(head["evaluate_run_id"])
    (distill,) = c.search_runs(
        [ev.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{head['run_id']}' and tags.`hkd.stage` = 'distill'",
    )
    rid = distill.info.run_id
    s = {k: history(c, rid, k) for k in SERIES + ("curve/kid_std",)}
    secs = sorted(s["train/train_s"].items())

    def seconds_at(step: int) -> float | None:
        before = [v for k, v in secs if k <= step]
        return before[-1] if before else None

    curve = [
        {
            "kimg": step / 1000,
            "train_s": seconds_at(step),
            "fid": s["curve/fid"][step],
            "kid": s["curve/kid"][step],
            "kid_std": s["curve/kid_std"].get(step),
        }
        for step in sorted(s["curve/fid"])
    ]
    n_curve = distill.data.tags.get("hkd.curve_n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in FIGURES:
            try:
                p = c.download_artifacts(head["evaluate_run_id"], name, tmp)
                shutil.copy(p, folder / Path(name).name)
            except Exception as e:  # noqa: BLE001 - a missing figure does not stop the numbers
                print(f"collect: no {name} ({e})")
    errors = {
        k: sorted((st / 1000, v) for st, v in s[k].items()) for k in ("train/holdout_mse", "train/train_mse")
    }
    loss = sorted((st / 1000, v) for st, v in s["train/loss"].items())
    (folder / "long_run.json").write_text(
        json.dumps(
            {
                "headline": head,
                "distill_run_id": rid,
                "curve_n": int(n_curve) if n_curve else None,
                "curve": curve,
                "errors_by_kimg": errors,
                "loss_by_kimg": loss,
            },
            indent=0,
        )
        + "\n"
    )
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    fig.subplots_adjust(wspace=0.38, top=0.8)
    ax = axes[0]
    ks = [p["kimg"] for p in curve]
    ax.errorbar(
        ks,
        [p["kid"] * 1e3 for p in curve],
        yerr=[(p["kid_std"] or 0) * 1e3 for p in curve],
        marker="o",
        label=f"KID x1e3 (N = {n_curve})",
    )
    if head.get("teacher_kid"):
        ax.axhline(
            head["teacher_kid"] * 1e3,
            color="k",
            lw=0.8,
            ls=":",
            label=f"teacher at {head.get('teacher_nfe', 35)} NFE, KID x1e3 at N = {head['n']}",
        )
    ax.axhline(
        head["kid"] * 1e3, color="C0", lw=0.8, ls="--", label=f"HKD at the end, KID x1e3 at N = {head['n']}"
    )
    ax2 = ax.twinx()
    ax2.plot(ks, [p["fid"] for p in curve], "s--", color="C1", label=f"FID@{n_curve}")
    ax2.set_ylabel(f"FID@{n_curve}")
    ax.set_xlabel("kimg (training seconds on the top axis)")
    ax.set_ylabel("KID x1e3")
    top = ax.secondary_xaxis("top")
    top.set_xticks(ks[::2], [f"{p['train_s']:.0f}" if p["train_s"] else "" for p in curve][::2], fontsize=7)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    ax.set_title("one-step quality at each checkpoint", fontsize=9, pad=22)
    for k, label in (
        ("train/holdout_mse", "held-out trajectories"),
        ("train/train_mse", "training trajectories"),
    ):
        if errors[k]:
            axes[1].plot(*zip(*errors[k]), label=label)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("kimg")
    axes[1].set_ylabel("EMA model's MSE against the teacher")
    axes[1].legend(fontsize=7)
    axes[1].set_title("does it memorise the trajectories?", fontsize=9, pad=22)
    fig.suptitle(
        f"CIFAR-10 long run: {head.get('kimg', 0):.0f} kimg, {head.get('train_s', 0) / 3600:.2f} h of training, "
        f"N = {head['n']}: KID ratio {head.get('kid_ratio', float('nan')):.2f}, "
        f"FID ratio {head.get('fid_ratio', float('nan')):.2f}"
    )
    fig.savefig(folder / "curves.png", dpi=110, bbox_inches="tight")
    print(f"collect: {folder / 'long_run.json'}, curves.png ({len(curve)} curve points, distill run {rid})")


if __name__ == "__main__":
    main(*sys.argv[1:3])

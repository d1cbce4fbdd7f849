"""The long run's figures and JSON, from its MLflow runs and its scored checkpoints.

    python docs/results/issue23/long_run/collect.py http://127.0.0.1:15000 docs/results/issue23/long_run

Reads ``headline.json`` in the folder (written by ``hkd pipeline --headline``: the pipeline and evaluate run ids)
and ``checkpoints.json`` if present (scripts/score_checkpoints.py: FID/KID at N = 1000 per checkpoint); writes
``long_run.json`` (the headline, the training curves against kimg and training seconds, the checkpoint scores),
``curves.png`` and ``samples_vs_teacher.png`` (the evaluate stage's: the model beside the teacher on the same
evaluation noise).
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

CURVES = ("train/loss", "train/holdout_mse", "train/train_mse", "train/lr", "train/train_s")


def history(c, run_id, key):
    return sorted((m.step / 1000, m.value) for m in c.get_metric_history(run_id, key))


def main(uri: str, folder: str) -> None:
    c = MlflowClient(uri)
    folder = Path(folder)
    head = json.loads((folder / "headline.json").read_text())
    ev = c.get_run(head["evaluate_run_id"])
    distill = c.search_runs(
        [ev.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{head['run_id']}' and tags.`hkd.stage` = 'distill'",
    )
    distill_id = distill[0].info.run_id if distill else None
    curves = {k: history(c, distill_id, k) for k in CURVES} if distill_id else {}
    ckpts = (
        json.loads((folder / "checkpoints.json").read_text())["points"]
        if (folder / "checkpoints.json").exists()
        else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            p = c.download_artifacts(head["evaluate_run_id"], "figures/samples_vs_teacher.png", tmp)
            shutil.copy(p, folder / "samples_vs_teacher.png")
        except Exception as e:  # noqa: BLE001 - the figure is optional for the numbers
            print(f"collect: no samples_vs_teacher.png ({e})")
    (folder / "long_run.json").write_text(
        json.dumps(
            {"headline": head, "distill_run_id": distill_id, "curves": curves, "checkpoints": ckpts}, indent=0
        )
        + "\n"
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k, label in (
        ("train/holdout_mse", "held-out trajectories"),
        ("train/train_mse", "training trajectories"),
    ):
        if curves.get(k):
            axes[0].plot(*zip(*curves[k]), label=label)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("kimg")
    axes[0].set_ylabel("EMA model's MSE against the teacher")
    axes[0].legend(fontsize=7)
    if curves.get("train/loss"):
        axes[1].plot(*zip(*curves["train/loss"]), color="gray", lw=0.8, label="training loss")
        axes[1].set_xlabel("kimg")
        axes[1].set_yscale("log")
        axes[1].legend(fontsize=7)
    if ckpts:
        ax = axes[2]
        ax.errorbar(
            [p["kimg"] for p in ckpts],
            [p["kid"] * 1e3 for p in ckpts],
            yerr=[p["kid_std"] * 1e3 for p in ckpts],
            marker="o",
            label="KID x1e3 (N = 1000)",
        )
        ax2 = ax.twinx()
        ax2.plot([p["kimg"] for p in ckpts], [p["fid"] for p in ckpts], "s--", color="C1", label="FID@1000")
        ax.set_xlabel("kimg (training seconds on the top axis)")
        ax.set_ylabel("KID x1e3")
        ax2.set_ylabel("FID@1000")
        top = ax.secondary_xaxis("top")
        top.set_xticks(
            [p["kimg"] for p in ckpts][::2], [f"{p['train_s']:.0f}" for p in ckpts][::2], fontsize=6
        )
        t = head.get("teacher_kid")
        if t:
            ax.axhline(t * 1e3, color="k", lw=0.7, ls=":", label="teacher at 35 NFE (N = 10,000)")
        ax.legend(fontsize=7, loc="upper right")
    axes[2].set_title("checkpoints scored after the fact", fontsize=8)
    fig.suptitle(
        f"long run: {head.get('kimg', 0):.0f} kimg, {head.get('train_s', 0) / 3600:.2f} h of training"
    )
    fig.savefig(folder / "curves.png", dpi=110, bbox_inches="tight")
    print(
        f"collect: {folder / 'long_run.json'}, curves.png ({len(ckpts)} checkpoints, distill run {distill_id})"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Fill what levers.py left out and draw the curves, from the MLflow store of the runs (a server URI or a copy of
its SQLite file): the teacher's scores at its best NFE for rows whose trajectories used another NFE (levers.py
before it took max(eval.teacher_nfe)), and the EMA model's held-out and training-trajectory MSE against kimg.

    python docs/results/issue23/collect.py sqlite:////tmp/mlflow_copy.db docs/results/issue23
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


def main(uri: str, folder: str) -> None:
    c = MlflowClient(uri)
    folder = Path(folder)
    path = folder / "levers.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    for r in rows:
        if r.get("teacher_kid") is None:
            m = c.get_run(r["run_id"]).data.metrics
            r.update(
                teacher_nfe=35,
                teacher_fid=m["eval/teacher_fid_nfe35"],
                teacher_kid=m["eval/teacher_kid_nfe35"],
            )
            r.update(kid_ratio=r["kid"] / r["teacher_kid"], fid_ratio=r["fid"] / r["teacher_fid"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        pts = {
            k: sorted((m.step / 1000, m.value) for m in c.get_metric_history(r["distill_run_id"], k))
            for k in ("train/holdout_mse", "train/train_mse")
        }
        curves[f"{r['name']}/{r['budget']}"] = pts
        for ax, k in zip(axes, pts):
            if pts[k]:
                ax.plot(*zip(*pts[k]), label=r["label"])
    for ax, t in zip(axes, ("held-out trajectories (unseen noise)", "as many training trajectories")):
        ax.set_title(f"EMA model's MSE against the teacher: {t}", fontsize=8)
        ax.set_xlabel("kimg")
        ax.set_yscale("log")
    axes[0].set_ylabel("MSE per pixel")
    axes[0].legend(fontsize=6)
    fig.savefig(folder / "overfitting.png", dpi=110, bbox_inches="tight")
    (folder / "curves.json").write_text(json.dumps(curves, indent=0) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])

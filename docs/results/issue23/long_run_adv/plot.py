"""curves.png: the long run with and without the adversarial term (train.adversarial_weight=0.1, beyond the
paper): the EMA model's error on the held-out and on the training trajectories, and the training loss, against
kimg, from the committed run records (long_run/long_run.json, long_run_adv/distill.json and, for the second
seed, long_run_adv_seed1/long_run.json).

    python docs/results/issue23/long_run_adv/plot.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {
    "without the term": json.loads((HERE.parent / "long_run" / "long_run.json").read_text())["curves"],
    "adversarial 0.1 (beyond the paper), seed 0": json.loads((HERE / "distill.json").read_text())["curves"],
}
SEED1 = HERE.parent / "long_run_adv_seed1" / "long_run.json"
if SEED1.exists():
    RUNS["adversarial 0.1, seed 1"] = json.loads(SEED1.read_text())["curves"]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
for ax, key, title in zip(
    axes,
    ("train/holdout_mse", "train/train_mse", "train/loss"),
    ("held-out trajectories: error", "training trajectories: error", "training loss (with the term in it)"),
):
    for (label, curves), (style, color) in zip(RUNS.items(), (("-", "C0"), ("--", "C1"), (":", "C1"))):
        pts = curves[key]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("kimg")
    ax.set_title(title, fontsize=10)
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(HERE / "curves.png", dpi=110)
print(HERE / "curves.png")

"""The editing figures (orchestrator/analysis/editing.py draws them): the edit grid of a band against its
controls, and the trade-off between the original's structure kept and the reference's detail arrived."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .figures import BAND_NAMES, plot_rows, plt, save_figure


def plot_edit_grid(sweep, path: str | os.PathLike, max_samples: int = 3) -> Path:
    """``editing.EditSweep``: per sample a row for the band edit, one for its control (a random mode set of the
    band's size) and one for the all-bands baseline; columns original, reference, the reference's state at
    sigma(tau_mid) that the edit encodes, then one per ratio r."""
    b = min(max_samples, sweep.original.shape[0])
    name = BAND_NAMES.get(sweep.n_bands, [str(i) for i in range(sweep.n_bands)])[sweep.band]
    rows, labels = [], []
    for i in range(b):
        for what, imgs in (
            (f"band {name}", sweep.band_edits),
            ("random set", sweep.random_edits),
            ("all bands", sweep.all_edits),
        ):
            rows.append(
                torch.cat(
                    [
                        sweep.original[i : i + 1],
                        sweep.reference[i : i + 1],
                        sweep.ref_state[i : i + 1].clamp(-1, 1),
                        imgs[:, i],
                    ]
                )
            )
            labels.append(f"#{i} {what}")
    cols = ["original", "reference", "its state"] + [f"r={r:g}" for r in sweep.ratios]
    shown = (
        f"{b} of {sweep.original.shape[0]} samples shown" if b < sweep.original.shape[0] else f"{b} samples"
    )
    return plot_rows(
        torch.stack(rows),
        path,
        labels,
        cols,
        title=f"frequency-aware editing at tau_mid={sweep.tau_mid} (mask: {int(sweep.mask.sum())} px; "
        f"{shown}, the scores are over all)",
    )


def plot_edit_tradeoff(sweep, path: str | os.PathLike) -> Path:
    """Structure kept against detail arrived, one line per method, a point per ratio r."""
    fig, ax = plt.subplots(figsize=(4.8, 4))
    for k, label in (
        ("band", f"band {sweep.band}"),
        ("random", f"random set (mean of {sweep.controls})"),
        ("all", "all bands"),
    ):
        x, y = sweep.scores[k]["detail_arrived"], sweep.scores[k]["structure_kept"]
        ax.plot(x, y, marker="o", label=label)
        for r, xi, yi in zip(sweep.ratios, x, y):
            ax.annotate(f"{r:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("reference detail arrived (in the mask)")
    ax.set_ylabel("original structure kept (coarse)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)

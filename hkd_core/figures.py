"""PNG figures: sample grids, Koopman spectra, band masking, trajectory strips (matplotlib, no display)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .data import to_uint8  # noqa: E402

BAND_NAMES = {1: ["all"], 2: ["low", "high"], 3: ["low", "mid", "high"]}


def _hwc(img: torch.Tensor) -> np.ndarray:
    a = to_uint8(img.detach().cpu()).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 array (rows of ``nrow``)."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad) + ((3,) if c == 3 else ()), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = (
            _hwc(images[i])
        )
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, nrow)).save(path)
    return path


def save_side_by_side(
    left: torch.Tensor, right: torch.Tensor, path: str | os.PathLike, titles: tuple[str, str], nrow: int = 8
) -> Path:
    """Two image grids side by side under their titles: e.g. a one-step student and its teacher on the same noise."""
    fig, axes = plt.subplots(1, 2, figsize=(2 * 0.8 * nrow + 0.4, 0.8 * -(-len(left) // nrow) + 0.6))
    for ax, imgs, title in zip(axes, (left, right), titles):
        g = image_grid(imgs, nrow)
        ax.imshow(g, cmap="gray" if g.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as a PNG (its folder made) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_spectrum(spectrum: list[torch.Tensor], path: str | os.PathLike, title: str = "") -> Path:
    """Per level: eigenvalues alpha +- i beta in the complex plane, and histograms of alpha and beta."""
    n = len(spectrum)
    fig, axes = plt.subplots(n, 3, figsize=(11, 3.2 * n), squeeze=False)
    for l, ev in enumerate(spectrum):
        a, b = ev.real.flatten().numpy(), ev.imag.flatten().numpy()
        ax = axes[l, 0]
        ax.scatter(np.concatenate([a, a]), np.concatenate([b, -b]), s=3, alpha=0.4)
        ax.axvline(0, color="k", lw=0.6)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("alpha (decay rate)")
        ax.set_ylabel("beta (frequency)")
        ax.set_title(f"level {l + 1}: {a.size} modes, {np.mean(a > 0):.0%} growing")
        axes[l, 1].hist(a, bins=50, color="tab:blue")
        axes[l, 1].set_xlabel("alpha")
        axes[l, 2].hist(b, bins=50, color="tab:orange")
        axes[l, 2].set_xlabel("beta")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_spectra_overlay(
    spectra: dict[str, list[torch.Tensor]], path: str | os.PathLike, max_points: int = 3000
) -> Path:
    """Several models' spectra over each other: per level (a column) the alpha histogram (density, one step line
    per model, the same bins), the beta histogram, and the eigenvalues in the complex plane (a subsample)."""
    n = max(len(s) for s in spectra.values())
    fig, axes = plt.subplots(3, n, figsize=(4.2 * n, 9.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for l in range(n):
        present = {k: s[l] for k, s in spectra.items() if l < len(s)}
        for row, part in ((0, "real"), (1, "imag")):
            vals = {k: getattr(ev, part).flatten().numpy() for k, ev in present.items()}
            lo_, hi_ = min(v.min() for v in vals.values()), max(v.max() for v in vals.values())
            bins = np.linspace(lo_, hi_ + 1e-9, 60)
            for i, (k, v) in enumerate(vals.items()):
                axes[row, l].hist(
                    v,
                    bins=bins,
                    density=True,
                    histtype="step",
                    lw=1.4,
                    color=colors[i % len(colors)],
                    label=k,
                )
            axes[row, l].set_xlabel("alpha (decay rate)" if part == "real" else "beta (frequency)")
            axes[row, l].set_title(f"level {l + 1}")
        ax = axes[2, l]
        rng = np.random.default_rng(0)
        for i, (k, ev) in enumerate(present.items()):
            a, b = ev.real.flatten().numpy(), ev.imag.flatten().numpy()
            pick = rng.permutation(a.size)[:max_points]
            ax.scatter(a[pick], b[pick], s=2, alpha=0.35, color=colors[i % len(colors)], label=k)
        ax.axvline(0, color="k", lw=0.6)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Koopman spectra compared: alpha and beta densities per level, eigenvalues (a subsample)")
    return save_figure(fig, path)


def plot_alpha_agreement(
    spectra: dict[str, list[torch.Tensor]],
    path: str | os.PathLike,
    method: str = "hungarian",
    max_points: int = 4000,
) -> Path:
    """Per level (a column) each model's alpha against the first model's, mode for mode after matching the modes
    within each position (hkd_core.gauge.match_modes), with the diagonal: a reproducible spectrum lies on it; an
    offset that survived training lies beside it; a scatter means the modes hold other rates."""
    from .gauge import match_modes, spectrum_agreement

    names = list(spectra)
    first = spectra[names[0]]
    n = len(first)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rng = np.random.default_rng(0)
    for l in range(n):
        ax = axes[0, l]
        for i, name in enumerate(names[1:], 1):
            other = spectra[name]
            if l >= len(other) or other[l].shape != first[l].shape:
                continue
            mb = torch.gather(other[l], 0, match_modes(first[l], other[l], method))
            a, b = first[l].real.flatten().numpy(), mb.real.flatten().numpy()
            pick = rng.permutation(a.size)[:max_points]
            agree = spectrum_agreement([first[l]], [other[l]], method)[0]
            ax.scatter(
                a[pick],
                b[pick],
                s=3,
                alpha=0.4,
                color=colors[(i - 1) % len(colors)],
                label=f"{name}: r = {agree['alpha_corr']:.2f}, mean diff {agree['alpha_mean_diff']:+.2f}",
            )
        lo_, hi_ = ax.get_xlim()
        ax.plot([lo_, hi_], [lo_, hi_], color="k", lw=0.7)
        ax.set_xlabel(f"alpha, {names[0]}")
        ax.set_ylabel("alpha, matched mode")
        ax.set_title(f"level {l + 1}")
        ax.legend(fontsize=6)
    fig.suptitle(f"alpha per (mode, position) against the first model, modes matched per position ({method})")
    return save_figure(fig, path)


def plot_alpha_maps(spectrum: list[torch.Tensor], path: str | os.PathLike) -> Path:
    """Per level: the mean decay rate alpha over modes at each position (a map for per-position operators)."""
    n = len(spectrum)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3), squeeze=False)
    for l, ev in enumerate(spectrum):
        ax = axes[0, l]
        if ev.ndim == 3:
            im = ax.imshow(ev.real.mean(0).numpy(), cmap="coolwarm")
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"level {l + 1}: mean alpha")
        ax.axis("off")
    return save_figure(fig, path)


def plot_rows(
    rows: torch.Tensor,
    path: str | os.PathLike,
    row_labels: list[str],
    col_labels: list[str] | None = None,
    title: str = "",
) -> Path:
    """rows: (R, K, C, H, W); one image per cell, labelled rows (and columns)."""
    r, k = rows.shape[:2]
    fig, axes = plt.subplots(r, k, figsize=(1.2 * k + 0.8, 1.2 * r + 0.3), squeeze=False)
    for i in range(r):
        for j in range(k):
            ax = axes[i, j]
            img = _hwc(rows[i, j])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
            if i == 0 and col_labels:
                ax.set_title(col_labels[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_band_masking(
    images: torch.Tensor, path: str | os.PathLike, full: torch.Tensor | None = None
) -> Path:
    """images: (n_bands, B, C, H, W) from ``spectra.band_masking``; the full sample as the last row if given."""
    n = images.shape[0]
    labels = [f"band {b}" for b in BAND_NAMES.get(n, [str(i) for i in range(n)])]
    if full is not None:
        images = torch.cat([images, full[None]])
        labels.append("all bands")
    return plot_rows(images, path, labels, title="band masking: keep one band of modes (sorted by alpha)")


def plot_trajectory_strip(previews: torch.Tensor, taus, path: str | os.PathLike) -> Path:
    """previews: (T, B, C, H, W) from ``HKD.trajectory``; one row per sample, one column per tau."""
    cols = [f"tau={float(t):.2f}" for t in taus]
    return plot_rows(
        previews.transpose(0, 1),
        path,
        [f"sample {i}" for i in range(previews.shape[1])],
        cols,
        title="decoded latents z_tau along the Koopman trajectory",
    )


def plot_curves(
    curves: dict[str, tuple[list[float], list[float]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_band_masking_levels(
    per_level: list[torch.Tensor], path: str | os.PathLike, full: torch.Tensor
) -> Path:
    """per_level[l]: (n_bands, B, C, H, W) from ``spectra.band_masking(level=l + 1)``: one row per (level, band)
    with the other levels left whole, for the first sample of each batch, and the full sample last."""
    rows, labels = [], []
    for l, imgs in enumerate(per_level):
        names = BAND_NAMES.get(imgs.shape[0], [str(i) for i in range(imgs.shape[0])])
        for k in range(imgs.shape[0]):
            rows.append(imgs[k])
            labels.append(f"L{l + 1} {names[k]}")
    rows.append(full)
    labels.append("all bands")
    return plot_rows(
        torch.stack(rows),
        path,
        labels,
        title="band masking per level: keep one band at one level, the other levels whole",
    )


def plot_band_trajectory(images: torch.Tensor, taus, path: str | os.PathLike) -> Path:
    """images: (T, n_bands + 1, C, H, W) for one sample (``spectra.band_trajectory``): a row per band (and
    all bands), a column per tau: how each band's contribution builds up along the trajectory."""
    n = images.shape[1] - 1
    labels = [f"band {b}" for b in BAND_NAMES.get(n, [str(i) for i in range(n)])] + ["all bands"]
    return plot_rows(
        images.transpose(0, 1),
        path,
        labels,
        [f"tau={float(t):.2f}" for t in taus],
        title="each band alone along tau (decoded z_tau keeping one band)",
    )


def plot_band_energy(energy: torch.Tensor, taus, path: str | os.PathLike) -> Path:
    """energy: (T, levels, n_bands) from ``editing.band_energy``; one panel per level, a line per band."""
    t, levels, n = energy.shape
    names = BAND_NAMES.get(n, [str(i) for i in range(n)])
    fig, axes = plt.subplots(1, levels, figsize=(3.6 * levels, 3), squeeze=False)
    for l in range(levels):
        ax = axes[0, l]
        for k in range(n):
            ax.plot(
                list(map(float, taus)), energy[:, l, k].numpy(), marker="o", ms=3, label=f"band {names[k]}"
            )
        ax.set_yscale("log")
        ax.set_xlabel("tau")
        ax.set_title(f"level {l + 1}: mean |z|^2 per band", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)


@torch.no_grad()
def write_figures(model, folder: str | os.PathLike, n: int = 8, seed: int = 7) -> list[Path]:
    """Every figure of a trained one-step model: samples; for Koopman models also the spectrum (complex plane,
    alpha and beta histograms), decay-rate maps, band masking (all levels, and per level), a trajectory strip,
    each band along tau (images), and the energy of each band along tau (curves)."""
    from .editing import band_energy
    from .models import HKD
    from .spectra import band_masking, band_trajectory

    folder = Path(folder)
    noise = model.noise(max(n, 64), torch.Generator().manual_seed(seed))
    paths = [save_image_grid(model.sample(x_T=noise), folder / "samples.png")]  # 8x8: enough to judge by eye
    x_T = noise[:n]
    spec = model.spectrum()
    if spec:
        paths.append(
            plot_spectrum(spec, folder / "spectrum.png", f"{getattr(model, 'variant', '')} eigenvalues")
        )
    if isinstance(model, HKD):
        paths.append(plot_alpha_maps(spec, folder / "alpha_maps.png"))
        k = min(3, min(ev.shape[0] for ev in spec))
        full = model.sample(x_T=x_T[:6])
        paths.append(
            plot_band_masking(band_masking(model, x_T[:6], k), folder / "band_masking.png", full=full)
        )
        per_level = [band_masking(model, x_T[:6], k, level=l + 1) for l in range(len(spec))]
        paths.append(plot_band_masking_levels(per_level, folder / "band_masking_levels.png", full))
        taus = torch.linspace(0, 1, 6)
        paths.append(
            plot_trajectory_strip(
                model.trajectory(x_T[:4], taus)["previews"], taus.tolist(), folder / "trajectory.png"
            )
        )
        bt = band_trajectory(model, x_T[:1], taus.tolist(), k)[:, :, 0]
        paths.append(plot_band_trajectory(bt, taus.tolist(), folder / "band_trajectory.png"))
        fine = torch.linspace(0, 1, 11).tolist()
        paths.append(plot_band_energy(band_energy(model, x_T, fine, k), fine, folder / "band_energy.png"))
    return paths

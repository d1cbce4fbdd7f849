"""Frequency-aware editing as an experiment (DESIGN 1.3): a sweep of blend ratios r, the band edit beside
its control (random mode sets of the band's size) and the all-bands baseline, and two numbers per edit.

``spectra.edit`` blends one band of a reference's latent into a sample's at tau_mid inside a spatial mask;
the reference's latent is the encoding of its own state at sigma(tau_mid). Here that is run for several r,
for the chosen band, for random mode sets of the same size and for all bands at once, and each result is
scored:

* ``structure_kept``: how much of the original's coarse structure survives, over the whole image:
  ``1 - |C(edit) - C(orig)|^2 / |C(ref) - C(orig)|^2`` with C an average pool to 1/``factor`` of the size.
  1 = the coarse image is untouched; 0 = it moved as far as the reference's.
* ``detail_arrived``: how much of the reference's detail arrives inside the mask:
  ``1 - |D(edit) - D(ref)|^2 / |D(orig) - D(ref)|^2`` over the mask, with D = x - upsample(C(x)).
  0 = the original's detail; 1 = the reference's.

At r = 0 both edits are the original: structure_kept = 1 and detail_arrived = 0 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .models import HKD
from .spectra import band_masks, band_modes, edit, random_modes, reference_state

BAND_NAMES = {1: ["all"], 2: ["low", "high"], 3: ["low", "mid", "high"]}
MASKS = ("lower", "upper", "left", "right", "center", "all")


def resolve_band(band: int | str, n_bands: int) -> int:
    """A band index (0 = the fastest-decaying modes) or its name (low/mid/high for 3 bands, low/high for 2)."""
    names = BAND_NAMES.get(n_bands, [])
    if isinstance(band, str) and not band.lstrip("-").isdigit():
        if band not in names:
            raise ValueError(
                f"band {band!r}: with {n_bands} bands use an index 0..{n_bands - 1}"
                + (f" or one of {names}" if names else "")
            )
        return names.index(band)
    b = int(band)
    if not 0 <= b < n_bands:
        raise ValueError(f"band {b} out of range: {n_bands} bands are numbered 0..{n_bands - 1}")
    return b


def named_mask(name: str, size: int) -> torch.Tensor:
    """A (size, size) 0/1 mask: a half of the image, its central square, or all of it."""
    m = torch.zeros(size, size)
    h = size // 2
    q = size // 4
    if name == "lower":
        m[h:] = 1
    elif name == "upper":
        m[:h] = 1
    elif name == "left":
        m[:, :h] = 1
    elif name == "right":
        m[:, h:] = 1
    elif name == "center":
        m[q : size - q, q : size - q] = 1
    elif name == "all":
        m[:] = 1
    else:
        raise ValueError(f"mask {name!r}: use one of {', '.join(MASKS)}")
    return m


def _coarse(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(x, factor)


def _detail(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x - F.interpolate(_coarse(x, factor), scale_factor=factor, mode="nearest")


def bootstrap_interval(
    values: torch.Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (one per sample): the samples are drawn with
    replacement ``resamples`` times (a fixed seed, so a table is reproducible)."""
    v = values.double().flatten()
    if v.numel() < 2:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    means = v[torch.randint(0, v.numel(), (resamples, v.numel()), generator=g)].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def edit_scores(
    edited: torch.Tensor,
    original: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    factor: int = 4,
    per_sample: bool = False,
) -> dict:
    """``structure_kept`` and ``detail_arrived`` (see the module's docstring), averaged over the batch (floats),
    or with ``per_sample`` one value per sample ((B,) tensors)."""

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num / den.clamp_min(1e-12)

    c_e, c_o, c_r = (_coarse(x.double(), factor) for x in (edited, original, reference))
    kept = 1 - ratio((c_e - c_o).pow(2).flatten(1).sum(1), (c_r - c_o).pow(2).flatten(1).sum(1))
    w = mask.double().to(edited.device)[None, None]
    d_e, d_o, d_r = (_detail(x.double(), factor) for x in (edited, original, reference))
    arrived = 1 - ratio(
        ((d_e - d_r).pow(2) * w).flatten(1).sum(1), ((d_o - d_r).pow(2) * w).flatten(1).sum(1)
    )
    if per_sample:
        return {"structure_kept": kept, "detail_arrived": arrived}
    return {"structure_kept": kept.mean().item(), "detail_arrived": arrived.mean().item()}


KINDS = ("band", "random", "all")  # the band, random mode sets of its size (the control), every mode
METRICS = ("structure_kept", "detail_arrived")


@dataclass
class EditSweep:
    ratios: list[float]
    band: int
    n_bands: int
    tau_mid: float
    original: torch.Tensor  # (B, C, H, W): the unedited samples
    reference: torch.Tensor  # (B, C, H, W): the reference images
    ref_state: torch.Tensor  # (B, C, H, W): their states at sigma(tau_mid), which the edit encodes
    mask: torch.Tensor  # (H, W)
    band_edits: torch.Tensor  # (R, B, C, H, W)
    random_edits: torch.Tensor  # (R, B, C, H, W): the first random mode set (the scores average all draws)
    all_edits: torch.Tensor  # (R, B, C, H, W): every mode, the baseline
    controls: int = 1  # random mode sets drawn
    scores: dict = field(default_factory=dict)  # {kind: {"structure_kept": [R], "detail_arrived": [R]}}
    per_sample: dict = field(default_factory=dict)  # {kind: {metric: (R, B)}}: what the intervals resample

    def table(self) -> list[dict]:
        """Per ratio: each kind's mean score with its bootstrap 95 % interval over the samples, and the band's
        paired difference from its random control (band - random, per sample) with its interval: the band is
        better than a random set of its size only where that interval excludes 0."""
        rows = []
        for i, r in enumerate(self.ratios):
            row = {"r": r}
            for m in METRICS:
                for k in KINDS:
                    row[f"{k}_{m}"] = self.scores[k][m][i]
                    if self.per_sample:
                        row[f"{k}_{m}_ci"] = list(bootstrap_interval(self.per_sample[k][m][i]))
                if self.per_sample:
                    diff = self.per_sample["band"][m][i] - self.per_sample["random"][m][i]
                    row[f"band_minus_random_{m}"] = diff.mean().item()
                    row[f"band_minus_random_{m}_ci"] = list(bootstrap_interval(diff))
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        name = BAND_NAMES.get(self.n_bands, [str(i) for i in range(self.n_bands)])[self.band]
        ci = " [95 % interval]" if self.per_sample else ""
        head = (
            f"Frequency-aware editing: band {self.band} ({name}) of {self.n_bands}, tau_mid = {self.tau_mid}, "
            f"{self.original.shape[0]} samples; the control: random mode sets of the band's size (mean of "
            f"{self.controls}); means{ci} over the samples (bootstrap)\n\n"
            "| r | band: structure kept | band: detail arrived | random: structure kept | random: detail arrived "
            "| all bands: structure kept | all bands: detail arrived |"
            + (" band - random: structure kept | band - random: detail arrived |" if self.per_sample else "")
            + "\n|---|---|---|---|---|---|---|"
            + ("---|---|" if self.per_sample else "")
            + "\n"
        )

        def cell(t, key):
            c = t.get(f"{key}_ci")
            return f"{t[key]:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")

        return head + "".join(
            f"| {t['r']:g} | "
            + " | ".join(cell(t, f"{k}_{m}") for k in KINDS for m in METRICS)
            + ("".join(f" | {cell(t, f'band_minus_random_{m}')}" for m in METRICS) if self.per_sample else "")
            + " |\n"
            for t in self.table()
        )


@torch.no_grad()
def edit_sweep(
    model: HKD,
    x_T: torch.Tensor,
    references: torch.Tensor,
    mask: torch.Tensor,
    ratios: list[float],
    band: int | str = "high",
    tau_mid: float = 0.5,
    n_bands: int = 3,
    factor: int = 4,
    controls: int = 4,
    generator: torch.Generator | None = None,
    order: str = "alpha",
) -> EditSweep:
    """Edit every sample of ``x_T`` with the matching reference image of ``references`` (a data set image, a
    file or a generated sample, in [-1, 1]), at each ratio: the band, ``controls`` random mode sets of the same
    size per level and position (scores averaged), and every mode. The reference enters through its own state
    at sigma(tau_mid) (``spectra.reference_state``, noise from ``generator``). Bands sort modes by ``order``
    (``spectra.band_key``: alpha, or speed |alpha|)."""
    if not isinstance(model, HKD):
        raise TypeError(
            f"editing needs a Koopman model with levels (variant hkd or one_level), got {type(model).__name__}"
        )
    if x_T.shape != references.shape:
        raise ValueError(
            f"samples {tuple(x_T.shape)} and references {tuple(references.shape)} differ in shape"
        )
    if not 0.0 <= tau_mid <= 1.0:
        raise ValueError(f"tau_mid={tau_mid} must lie in [0, 1]")
    if mask.shape != x_T.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} must match the image size {tuple(x_T.shape[-2:])}")
    if controls < 1:
        raise ValueError(f"controls={controls}: draw at least one random mode set")
    modes = min(ev.shape[0] for ev in model.spectrum())
    if n_bands > modes:
        raise ValueError(
            f"{n_bands} bands need at least {n_bands} mode pairs per position; the smallest level has {modes}"
        )
    b = resolve_band(band, n_bands)
    original = model.sample(x_T=x_T)
    ref_state = reference_state(references, tau_mid, generator)
    chosen = band_modes(model.spectrum(), b, n_bands, order)
    draws = [random_modes(chosen, generator) for _ in range(controls)]
    out = {k: [] for k in KINDS}
    scores = {k: {m: [] for m in METRICS} for k in KINDS}
    samples = {k: {m: [] for m in METRICS} for k in KINDS}
    for r in ratios:
        for k, sets in (("band", [chosen]), ("random", draws), ("all", [None])):
            imgs = [edit(model, x_T, ref_state, mask, float(r), m, tau_mid) for m in sets]
            out[k].append(imgs[0])
            per = [edit_scores(img, original, references, mask, factor, per_sample=True) for img in imgs]
            for m in METRICS:
                v = torch.stack([p[m] for p in per]).mean(0)  # per sample, the draws averaged
                samples[k][m].append(v)
                scores[k][m].append(v.mean().item())
    per_sample = {k: {m: torch.stack(v) for m, v in d.items()} for k, d in samples.items()}
    return EditSweep(
        [float(r) for r in ratios],
        b,
        n_bands,
        tau_mid,
        original,
        references,
        ref_state,
        mask,
        torch.stack(out["band"]),
        torch.stack(out["random"]),
        torch.stack(out["all"]),
        controls,
        scores,
        per_sample,
    )


@torch.no_grad()
def band_energy(model: HKD, x_T: torch.Tensor, taus: list[float], n_bands: int = 3) -> torch.Tensor:
    """(len(taus), levels, n_bands): the mean squared latent in each band along the trajectory, which shows
    each band's decay (alpha) and so its cumulative effect on the image over tau."""
    z0 = model.encode(x_T, model.sigma_max)
    masks = band_masks(model.spectrum(), n_bands)
    rows = []
    for t in taus:
        zt = model.evolve(z0, t)
        per_level = []
        for z, m in zip(zt, masks):
            energies = []
            for k in range(n_bands):
                w = m[k].repeat_interleave(2, 0).to(z).expand_as(z[0])
                energies.append((z.pow(2) * w).sum() / (w.sum() * z.shape[0]).clamp_min(1))
            per_level.append(torch.stack(energies))
        rows.append(torch.stack(per_level))
    return torch.stack(rows)

"""Seeds -> samples -> Inception features -> FID/KID: the one evaluation path, as units a driver spreads out.

Sample i of an evaluation starts from the noise of seed ``eval.seed * SEED_STRIDE + i`` (scaled to
sigma_max), whoever draws it: the evaluate stage's Ray tasks, a sweep trial's final score and the
in-loop proxy a scheduler decides on all use ``eval_seeds``. A chunk of seeds becomes a ``chunk_result``
(float64 sums and the float32 features); the driver merges the chunks exactly (``merge_chunks``) and
scores them (``score``) against reference statistics of a fixed subset of real images
(``reference_images``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from . import metric_names as M
from .config import DataConfig, EvalConfig
from .data import DATASETS, load_images
from .edm import SIGMA_MAX
from .fid import FeatureStats, InceptionFeatures, Reference, fid_from_stats, kid_from_features
from .generate import noise_for_seeds
from .sampler import sample_nfe

SEED_STRIDE = 1_000_000  # eval.seed k owns seeds [k * 1e6, (k + 1) * 1e6)
REFERENCE_SEED = 12345  # the seeded subset of real images behind the reference statistics

Generate = Callable[[torch.Tensor], torch.Tensor]  # x_T (scaled to sigma_max) -> images in [-1, 1]


def image_shape(data: DataConfig) -> tuple[int, int, int]:
    return (DATASETS[data.name].channels, data.resolution, data.resolution)


def eval_seeds(e: EvalConfig, n: int | None = None) -> list[int]:
    """The noise seeds of an evaluation: the first ``n`` (default eval.n)."""
    base = e.seed * SEED_STRIDE
    return list(range(base, base + (e.n if n is None else n)))


def noise(seeds, shape: tuple[int, ...]) -> torch.Tensor:
    """x_T = sigma_max * n_seed for each seed."""
    return noise_for_seeds(torch.as_tensor(list(seeds)), shape) * SIGMA_MAX


def model_generator(model) -> Generate:
    """A one-step model: NFE 1."""
    return lambda x_T: model.sample(x_T=x_T)


def teacher_generator(teacher, nfe: int) -> Generate:
    """The teacher's deterministic sampler at ``nfe`` denoiser evaluations (Heun, or Euler at NFE 1)."""
    return lambda x_T: sample_nfe(teacher.denoise, x_T, nfe).x0.clamp(-1, 1)


@torch.no_grad()
def chunk_features(
    generate: Generate,
    seeds: list[int],
    shape: tuple[int, ...],
    features: InceptionFeatures,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Inception features of the samples drawn from ``seeds``, batch by batch."""
    out = [
        features(generate(noise(seeds[i : i + batch_size], shape).to(device)))
        for i in range(0, len(seeds), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, 2048)


def chunk_result(feats: torch.Tensor) -> dict:
    """What a chunk hands to the driver: its float64 sums (merged exactly) and its features (KID needs them)."""
    return {**FeatureStats.of(feats).to_dict(), "features": feats.numpy()}


def merge_chunks(results: list[dict]) -> tuple[FeatureStats, torch.Tensor]:
    """The chunks' statistics merged exactly, and their features concatenated in chunk order."""
    stats = FeatureStats.merge_all([FeatureStats.from_dict(r) for r in results])
    return stats, torch.from_numpy(np.concatenate([r["features"] for r in results]))


def score(stats: FeatureStats, feats: torch.Tensor, ref: Reference, kid_subset_size: int) -> dict[str, float]:
    """FID from the merged statistics, KID (mean and std over 100 subsets) from the features. A subset is at
    most half the samples: subsets as large as the set would all be the set, and the std would read 0."""
    kid, kid_std = kid_from_features(feats, ref.features, max(2, min(kid_subset_size, feats.shape[0] // 2)))
    return {"fid": fid_from_stats(stats, ref.stats, feats, ref.features), "kid": kid, "kid_std": kid_std}


def score_in_process(
    generate: Generate,
    seeds: list[int],
    shape: tuple[int, ...],
    features: InceptionFeatures,
    ref: Reference,
    kid_subset_size: int,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """FID and KID of the samples drawn from ``seeds``, in this process: the chain that Ray tasks split into chunks
    (chunk_features -> chunk_result -> merge_chunks -> score) as one chunk, so that a number scored here equals
    the evaluate stage's on the same seeds. For the in-loop proxy, a sweep trial's final score and benchmarks."""
    f = chunk_features(generate, seeds, shape, features, batch_size, device)
    return score(*merge_chunks([chunk_result(f)]), ref, kid_subset_size)


def model_metrics(s: dict[str, float], n: int) -> dict[str, float]:
    """The model's scores under their metric names (NFE 1)."""
    return {M.FID: s["fid"], M.KID: s["kid"], M.KID_STD: s["kid_std"], M.EVAL_N: n, M.FID_NFE1: s["fid"]}


def teacher_metrics(s: dict[str, float], nfe: int) -> dict[str, float]:
    out = {M.teacher_fid(nfe): s["fid"], M.teacher_kid(nfe): s["kid"]}
    if s.get("kid_std") is not None:
        out[M.teacher_kid_std(nfe)] = s["kid_std"]
    return out


def headline(metrics: dict[str, float], teacher_nfe: int) -> dict:
    """The numbers that say how far the one-step model is from its teacher, led by the one that cannot flatter:
    KID is unbiased in N, so its ratio (model at NFE 1 over the teacher at ``teacher_nfe``) means the same at
    every N; FID carries a floor (real images against the reference score it at this N), which squeezes the
    FID ratio towards 1 at small N, so the floor comes along. Ratios are None where the teacher was not scored."""
    t_fid, t_kid = metrics.get(M.teacher_fid(teacher_nfe)), metrics.get(M.teacher_kid(teacher_nfe))
    return {
        "n": int(metrics[M.EVAL_N]),
        "fid": metrics[M.FID],
        "kid": metrics[M.KID],
        "kid_std": metrics.get(M.KID_STD),
        "teacher_nfe": teacher_nfe,
        "teacher_fid": t_fid,
        "teacher_kid": t_kid,
        "teacher_kid_std": metrics.get(M.teacher_kid_std(teacher_nfe)),
        # a teacher KID within its std of 0 (small N) makes no ratio: None rather than a number with no meaning
        "kid_ratio": metrics[M.KID] / t_kid
        if t_kid and t_kid > (metrics.get(M.teacher_kid_std(teacher_nfe)) or 0)
        else None,
        "fid_ratio": metrics[M.FID] / t_fid if t_fid else None,
        "floor_fid": metrics.get(M.NOISE_FLOOR_FID),
        "floor_kid": metrics.get(M.NOISE_FLOOR_KID),
    }


def reference_identity(data: DataConfig, split: str, n: int, inception_sha256: str) -> dict:
    """What a score is measured against: the reference images (data set, split, N, resolution, the subset's seed and
    the sha256 of the images themselves, so another copy of the data set or another padding is another reference)
    and the Inception weights' sha256. Scores recorded elsewhere (a shipped teacher's record, the teacher-score
    cache) are reused only under an equal identity."""
    import hashlib

    images = reference_images(data, split, n)
    return {
        "dataset": data.name,
        "split": split,
        "n": n,
        "resolution": data.resolution,
        "subset_seed": REFERENCE_SEED,
        "images_sha256": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest(),
        "inception_sha256": inception_sha256,
    }


def reference_images(data: DataConfig, split: str, n: int) -> torch.Tensor:
    """The fixed, seeded subset of N real images that reference statistics are computed from."""
    images, _ = load_images(
        data.name, split, resolution=data.resolution, limit=n, root=data.root, seed=REFERENCE_SEED
    )
    if images.shape[0] < n:
        raise ValueError(f"eval.n={n}: {data.name}/{split} has only {images.shape[0]} images; lower eval.n")
    return images


@torch.no_grad()
def holdout_error(model, states: torch.Tensor, batch_size: int = 100) -> float:
    """Mean squared error of model(x_T) against the teacher's x_0 on held-out trajectories (N, S+1, C, H, W)."""
    errs = []
    dev = next(model.parameters()).device
    for i in range(0, states.shape[0], batch_size):
        s = states[i : i + batch_size].float().to(dev)
        errs.append((model.sample(x_T=s[:, 0]) - s[:, -1]).square().flatten(1).mean(1))
    return torch.cat(errs).mean().item()


@torch.no_grad()
def nearest(x: torch.Tensor, images: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and RMS distance (per pixel) of each x's nearest image, by L2, streamed over ``images``."""
    xf = x.flatten(1).double()
    best_d = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    best_i = torch.zeros(x.shape[0], dtype=torch.long)
    for i in range(0, images.shape[0], chunk):
        y = images[i : i + chunk].flatten(1).double()
        d = (xf.square().sum(1, keepdim=True) - 2 * xf @ y.T + y.square().sum(1)[None]).clamp(min=0)
        m, j = d.min(1)
        better = m < best_d
        best_d[better], best_i[better] = m[better], j[better] + i
    return best_i, (best_d / xf.shape[1]).sqrt().float()


@torch.no_grad()
def endpoint_sensitivity(
    denoise,
    x_T: torch.Tensor,
    images: torch.Tensor,
    rel: float = 0.05,
    nfe: int = 35,
    seed: int = 0,
    jump_rms: float = 0.2,
) -> dict[str, float]:
    """How the teacher's noise-to-image map reacts to a small nudge of x_T: x_T' = x_T + rel * sigma_max * e
    (a change of ``rel`` of x_T's norm), both sampled with ``nfe`` Heun evaluations.

    Returns the endpoints' RMS (per pixel, [-1, 1] units) change: its mean, median and 90th percentile; the
    *jump rate*, the fraction that move by more than ``jump_rms`` (a visibly different image; two different
    Fashion-MNIST images are ~0.5 apart); the fraction whose nearest image in ``images`` changes; and the
    endpoints' mean RMS distance to their nearest image (0 for a lookup table that returns training images)."""
    g = torch.Generator().manual_seed(seed)
    nudged = x_T + rel * SIGMA_MAX * torch.randn(x_T.shape, generator=g)
    a = sample_nfe(denoise, x_T, nfe).x0.clamp(-1, 1)
    b = sample_nfe(denoise, nudged, nfe).x0.clamp(-1, 1)
    ia, da = nearest(a, images)
    ib, _ = nearest(b, images)
    change = (a - b).square().flatten(1).mean(1).sqrt()
    return {
        "endpoint_rms_change": change.mean().item(),
        "median_change": change.median().item(),
        "p90_change": change.quantile(0.9).item(),
        "jump_rate": (change > jump_rms).float().mean().item(),
        "jump_rms": jump_rms,
        "nn_change_rate": (ia != ib).float().mean().item(),
        "nn_rms": da.mean().item(),
        "n": x_T.shape[0],
        "rel": rel,
        "nfe": nfe,
    }

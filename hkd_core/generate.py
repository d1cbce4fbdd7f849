"""Teacher trajectories, shard by shard: the unit of work the orchestrator spreads over workers.

Trajectory i starts from x_T = sigma_max * n_i with n_i drawn from a generator seeded by ``seed + i``, so
any shard can be (re)generated alone and the whole set does not depend on how it was split. Held-out
trajectories (the error against the teacher) use seeds ``seed + HOLDOUT_SEED_OFFSET + i``, which no
training trajectory can have.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from .edm import SIGMA_MAX, SIGMA_MIN
from .sampler import SAMPLERS, karras_sigmas
from .teachers import Teacher
from .trajectories import (
    BlobStore,
    Manifest,
    ShardError,
    ShardInfo,
    read_shard,
    shard_info,
    shard_key,
    write_manifest,
    write_shard,
)

log = logging.getLogger(__name__)
HOLDOUT_SEED_OFFSET = 10**9


def splits(num: int, holdout: int, seed: int) -> list[tuple[str, int, int]]:
    """(split name, trajectories, seed base) of the training and held-out sets; empty sets left out."""
    return [
        (name, n, s)
        for name, n, s in (("train", num, seed), ("holdout", holdout, seed + HOLDOUT_SEED_OFFSET))
        if n > 0
    ]


def noise_for_seeds(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise, one independent generator per seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sampler_spec(
    sampler: str = "heun",
    steps: int = 18,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = 7.0,
) -> dict:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler is {sampler!r}; allowed: {sorted(SAMPLERS)}")
    return {"name": sampler, "steps": steps, "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho}


def shard_plan(num_trajectories: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard index, first trajectory index, count) for every shard."""
    return [
        (i, first, min(shard_size, num_trajectories - first))
        for i, first in enumerate(range(0, num_trajectories, shard_size))
    ]


def sampler_nfe(spec: dict) -> int:
    """Denoiser evaluations per trajectory: Heun's last step is Euler."""
    return 2 * spec["steps"] - 1 if spec["name"] == "heun" else spec["steps"]


def build_manifest(
    shape: tuple[int, ...], spec: dict, teacher: dict, shard_size: int, shards: list[ShardInfo]
) -> Manifest:
    """The manifest of a complete set of shards (in index order)."""
    sigmas = karras_sigmas(spec["steps"], spec["sigma_min"], spec["sigma_max"], spec["rho"])
    return Manifest(
        shape=list(shape),
        sigmas=sigmas.tolist(),
        nfe=sampler_nfe(spec),
        teacher=teacher,
        sampler=spec,
        shard_size=shard_size,
        shards=sorted(shards, key=lambda s: s.first_index),
    )


@torch.no_grad()
def generate_shard(
    store: BlobStore,
    teacher: Teacher,
    index: int,
    first: int,
    count: int,
    shape: tuple[int, ...],
    sampler: dict,
    seed: int = 0,
    batch_size: int = 256,
    device="cpu",
) -> ShardInfo:
    """Sample trajectories first .. first+count-1 and write them as shard ``index``."""
    sigmas = karras_sigmas(sampler["steps"], sampler["sigma_min"], sampler["sigma_max"], sampler["rho"])
    fn = SAMPLERS[sampler["name"]]
    seeds = torch.arange(first, first + count, dtype=torch.long) + seed
    parts, nfe = [], 0
    for i in range(0, count, batch_size):
        x_T = noise_for_seeds(seeds[i : i + batch_size], shape).to(device) * sampler["sigma_max"]
        traj = fn(teacher.denoise, x_T, sigmas)
        parts.append(traj.states.cpu().transpose(0, 1))
        nfe = traj.nfe
    meta = {"teacher": teacher.identity, "sampler": sampler, "nfe": nfe}
    return write_shard(store, index, first, torch.cat(parts), sigmas, seeds, meta)


def existing_shard(store: BlobStore, index: int, first: int, count: int, seed: int) -> ShardInfo | None:
    """A shard already written by an earlier (interrupted) run, if it is whole and holds the same seeds."""
    key = shard_key(index)
    if not store.exists(key):
        return None
    data = store.get(key)
    info = shard_info(key, count, data, first)
    try:
        shard = read_shard(store, info)
    except ShardError:
        return None
    expected = torch.arange(first, first + count) + seed
    return info if torch.equal(shard["seeds"], expected) else None


def generate_trajectories(
    store: BlobStore,
    teacher: Teacher,
    num_trajectories: int,
    shape: tuple[int, ...],
    *,
    sampler: str = "heun",
    steps: int = 18,
    shard_size: int = 256,
    seed: int = 0,
    batch_size: int = 256,
    device="cpu",
    progress: bool = True,
) -> Manifest:
    """Every shard in order (reusing whole shards an interrupted run left), then the manifest."""
    spec = sampler_spec(sampler, steps)
    infos = []
    plan = shard_plan(num_trajectories, shard_size)
    for index, first, count in tqdm(plan, desc="trajectories", unit="shard", disable=not progress):
        info = existing_shard(store, index, first, count, seed)
        if info is None:
            info = generate_shard(store, teacher, index, first, count, shape, spec, seed, batch_size, device)
        infos.append(info)
    manifest = build_manifest(shape, spec, teacher.identity, shard_size, infos)
    write_manifest(store, manifest)
    return manifest

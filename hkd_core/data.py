"""Image data sets (MNIST, Fashion-MNIST, CIFAR-10 as JPEG q75), found locally first.

Look-up order for the image sets: an explicit ``root`` (or ``$HKD_DATA_DIR``), the ``shared/data``
folder beside the project checkout, the Debian package path (Fashion-MNIST only), and, only when
``allow_download=True`` (or ``$HKD_ALLOW_DOWNLOAD=1``), the official online mirrors. Every local file is
verified against its published checksum before use.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: sha256 of the files described in shared/data/README.md.
SHA256 = {
    "mnist.npz": "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64",
    "fashion_mnist.npz": "5b6d2c4c694a91887af8ab7d039c04f80af3c29378d731c93a538d2e831aa469",
    "cifar10_jpeg_files.tar.gz": "f7d59730c39bfca9471e346976c47e8b75c45eebbebfc33b0fd6c5375a75d551",
}

#: md5 of the official gzipped IDX files (what the original mirrors serve).
_IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
#: md5 of the decompressed IDX files (what the Debian package dataset-fashion-mnist holds, recompressed).
_IDX_RAW_MD5 = {
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    }
}
_MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    file: str  # file name in a data folder
    channels: int
    resolution: int  # native side length in pixels


DATASETS = {
    "mnist": DatasetInfo("mnist", "mnist.npz", 1, 28),
    "fashion_mnist": DatasetInfo("fashion_mnist", "fashion_mnist.npz", 1, 28),
    "cifar10_jpeg": DatasetInfo("cifar10_jpeg", "cifar10_jpeg_files.tar.gz", 3, 32),
}


class DataError(RuntimeError):
    """A data file is missing or does not match its checksum."""


def default_search_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for data files, in order."""
    dirs = []
    for d in (root, os.environ.get("HKD_DATA_DIR")):
        if d:
            dirs.append(Path(d).expanduser())
    # shared/data beside the checkout (the project root's parent), and inside it.
    project_root = Path(__file__).resolve().parents[1]
    dirs += [project_root.parent / "shared" / "data", project_root / "shared" / "data"]
    return dirs


def cache_dir() -> Path:
    """Per-user cache for decoded data, reference statistics and network weights."""
    d = Path(os.environ.get("HKD_CACHE", Path.home() / ".cache" / "hkd")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, expected: str, algo: str = "sha256") -> None:
    got = file_digest(path, algo)
    if got != expected:
        raise DataError(
            f"{path}: {algo} is {got}, expected {expected}. The file is corrupt or a different "
            f"version; delete it and restore the original (see shared/data/README.md)."
        )


def find_data_file(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """First verified copy of a data set's file in the search folders, or None if there is none."""
    info = _info(name)
    for d in default_search_dirs(root):
        p = d / info.file
        if p.is_file():
            verify_file(p, SHA256[info.file])
            return p
    return None


def has_local_copy(name: str, root: str | os.PathLike | None = None) -> bool:
    """Is the data set loadable from this machine's disk (a verified file in the search folders, or Debian's
    Fashion-MNIST package), without any download?"""
    if find_data_file(name, root) is not None:
        return True
    return name == "fashion_mnist" and (_DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file()


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def _read_idx(raw: bytes) -> np.ndarray:
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_idx_dir(
    folder: Path, md5: dict[str, str], split: str, raw: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """IDX .gz files from a folder; ``raw`` checks the decompressed bytes' md5 (Debian recompresses them)."""
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        p = folder / f"{prefix}-{kind}-ubyte.gz"
        if not raw:
            verify_file(p, md5[p.name], "md5")
        content = gzip.decompress(p.read_bytes())
        if raw:
            got = hashlib.md5(content).hexdigest()
            if got != md5[p.name[:-3]]:
                raise DataError(
                    f"{p}: md5 of its decompressed content is {got}, expected {md5[p.name[:-3]]}; "
                    f"reinstall the package (apt-get install --reinstall dataset-fashion-mnist)"
                )
        arrays.append(_read_idx(content))
    return arrays[0], arrays[1]


def _download_idx(name: str) -> Path:
    dest = cache_dir() / "downloads" / name
    dest.mkdir(parents=True, exist_ok=True)
    for fname, md5 in _IDX_MD5[name].items():
        p = dest / fname
        if p.is_file() and file_digest(p, "md5") == md5:
            continue
        url = _MIRRORS[name] + fname
        log.info("downloading %s", url)
        tmp = p.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            f.write(r.read())
        verify_file(tmp, md5, "md5")
        os.replace(tmp, p)
    return dest


def _load_cifar_jpeg(tar_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode the JPEG tarball once and cache the uint8 arrays (about 184 MB) per machine."""
    from PIL import Image

    cache = cache_dir() / f"cifar10_jpeg_{SHA256[tar_path.name][:12]}.npz"
    if not cache.is_file():
        log.info("decoding %s (once; cached at %s)", tar_path, cache)
        out = {s: ([], []) for s in ("train", "test")}
        with tarfile.open(tar_path, "r:gz") as tf:
            members = sorted(
                (m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name
            )
            for m in members:
                parts = Path(m.name).parts
                s, cls = parts[-3], parts[-2]
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                out[s][0].append(np.asarray(img, dtype=np.uint8))
                out[s][1].append(CIFAR10_CLASSES.index(cls))
        arrays = {}
        for s, (xs, ys) in out.items():
            arrays[f"x_{s}"] = np.stack(xs)
            arrays[f"y_{s}"] = np.asarray(ys, dtype=np.uint8)
        tmp = cache.with_name(cache.name + ".part.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
    with np.load(cache) as z:
        return z[f"x_{split}"], z[f"y_{split}"]


def load_uint8(
    name: str, split: str = "train", root: str | os.PathLike | None = None, allow_download: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw images (N, H, W) or (N, H, W, 3) as uint8 and labels (N,), from the first source found."""
    info = _info(name)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    path = find_data_file(name, root)
    if path is not None:
        if name == "cifar10_jpeg":
            return _load_cifar_jpeg(path, split)
        with np.load(path) as z:
            return z[f"x_{split}"], z[f"y_{split}"]
    if name == "fashion_mnist" and (_DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        return _load_idx_dir(_DEBIAN_FASHION, _IDX_RAW_MD5["fashion_mnist"], split, raw=True)
    if allow_download is None:
        allow_download = os.environ.get("HKD_ALLOW_DOWNLOAD", "0") == "1"
    if allow_download and name in _MIRRORS:
        return _load_idx_dir(_download_idx(name), _IDX_MD5[name], split)
    searched = ", ".join(str(d / info.file) for d in default_search_dirs(root))
    hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
    raise DataError(
        f"data set {name!r} not found. Looked for {searched}"
        f"{' and ' + str(_DEBIAN_FASHION) if name == 'fashion_mnist' else ''}. "
        f"Put {info.file} (sha256 {SHA256[info.file]}) in one of those folders or in $HKD_DATA_DIR{hint}"
        f"{'; or allow the online download (HKD_ALLOW_DOWNLOAD=1)' if name in _MIRRORS else ''}."
    )


def to_model_range(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N,H,W) or (N,H,W,C) -> float32 (N,C,H,W) in [-1, 1]."""
    t = torch.as_tensor(np.asarray(x))
    if t.ndim == 3:
        t = t[:, None]
    else:
        t = t.permute(0, 3, 1, 2)
    return t.float().div(127.5).sub(1.0).contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8, same layout."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_images(
    name: str,
    split: str = "train",
    *,
    resolution: int | None = None,
    limit: int | None = None,
    root: str | os.PathLike | None = None,
    allow_download: bool | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, C, H, W) in [-1, 1] with labels.

    ``resolution``: zero-pad (in pixel space, i.e. with -1 = black) 28 -> 32, or leave as is with None.
    ``limit``: keep a fixed random subset of that size (seeded), for quick runs.
    """
    x, y = load_uint8(name, split, root, allow_download)
    if limit is not None and limit < len(x):
        idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:limit])
        x, y = x[idx], y[idx]
    t = to_model_range(x)
    native = t.shape[-1]
    if resolution is not None and resolution != native:
        if resolution < native or (resolution - native) % 2:
            raise DataError(
                f"resolution={resolution} cannot be reached from {name}'s {native}px by symmetric "
                f"zero-padding; use {native} or {native} + an even number"
            )
        p = (resolution - native) // 2
        t = F.pad(t, (p, p, p, p), value=-1.0)
    return t, torch.as_tensor(np.asarray(y)).long()

"""Files written whole or not at all, and a folder as a blob store, with nothing heavier than the standard library:
what a process that only moves bytes needs (an S3 client's process, a sweep trial's) imports this, not torch.
``hkd_core.checkpoint`` and ``hkd_core.trajectories`` build on it."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


class ShardError(RuntimeError):
    """A shard or manifest is missing, truncated or altered."""


class LocalStore:
    """A folder as a BlobStore; writes go to a temporary file that is then renamed into place."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def put(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.root / key, data)

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise ShardError(f"{self.uri(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def size(self, key: str) -> int:
        return (self.root / key).stat().st_size

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def md5(self, key: str) -> str:
        h = hashlib.md5()
        with open(self.root / key, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

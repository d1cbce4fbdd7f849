"""Checkpoints written whole or not at all, with a small JSON pointer to the newest one.

A checkpoint is one ``torch.save`` file written to a temporary name and renamed into place; only then is
``latest.json`` (itself written atomically) moved to point at it. A crash at any moment leaves the previous
checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .blobstore import atomic_write, atomic_write_bytes  # noqa: F401 - atomic_write_bytes: its callers import it from here

LATEST = "latest.json"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(directory: str | os.PathLike, state: dict, kimg: float, keep: int = 2) -> Path:
    """Write ``state`` as ckpt-<kimg>.pt, point latest.json at it, keep the newest ``keep`` files."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"ckpt-{kimg:010.3f}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write_bytes(d / LATEST, json.dumps({"file": path.name, "kimg": kimg}).encode())
    ckpts = sorted(d.glob("ckpt-*.pt"))
    for old in ckpts[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The file latest.json points to, or None if the folder holds no checkpoint yet."""
    d = Path(directory)
    pointer = d / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["file"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{pointer} is unreadable ({e}); delete it to start over") from None
    path = d / name
    if not path.is_file():
        raise CheckpointError(f"{pointer} points to {path}, which does not exist")
    return path


def load_checkpoint(path_or_dir: str | os.PathLike, map_location="cpu") -> dict | None:
    """Load a checkpoint file, or the latest one in a folder (None if the folder has none)."""
    p = Path(path_or_dir)
    if p.is_dir():
        p = latest_checkpoint(p)
        if p is None:
            return None
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {p} is unreadable ({type(e).__name__}: {e})") from None


def load_model_state(model: torch.nn.Module, state_dict: dict, where: str) -> None:
    """load_state_dict with an error that names the checkpoint and the mismatching tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own.keys() & state_dict.keys()
        if own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            filter(
                None,
                [
                    f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
                    f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
                    if unexpected
                    else "",
                    f"shape {shapes[:3]}" if shapes else "",
                ],
            )
        )
        raise CheckpointError(
            f"checkpoint {where} was written for a different architecture ({detail}); "
            f"use the model config it was trained with, or a fresh checkpoint folder"
        )
    model.load_state_dict(state_dict)

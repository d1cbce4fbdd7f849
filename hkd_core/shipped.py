"""Teachers shipped with the project: EMA weights beside a record of how they were made and how they score.

A shipped teacher is a folder under ``hkd_core/shipped/`` holding ``teacher.pt`` (the EMA state dict),
``record.json`` (the data and teacher config it was trained with, its content hash, the weights' sha256,
kimg, wall-clock, FID/KID with their N) and ``samples.png``. A teacher stage whose (data, teacher) config
is a record's adopts those weights instead of training (``find_shipped``); the weights are checked against
the record's sha256 and loaded strictly into the configured network first, so a wrong or corrupt file is
refused with its path, never used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write, atomic_write_bytes, load_model_state
from .config import ConfigError, DataConfig, TeacherConfig, config_hash
from .config_checks import from_dict
from .data import file_digest as file_sha256

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
RECORD, WEIGHTS = "record.json", "teacher.pt"


class ShippedTeacherError(RuntimeError):
    """A shipped teacher's record or weights are unreadable, altered, or of another architecture."""


def teacher_hash(data: DataConfig, teacher: TeacherConfig) -> str:
    """The teacher stage's identity (hkd_core.config.stage_hashes['teacher'])."""
    return config_hash(data, teacher)


@dataclass
class ShippedTeacher:
    folder: Path
    record: dict
    data: DataConfig
    teacher: TeacherConfig

    @property
    def weights_path(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def hash(self) -> str:
        return teacher_hash(self.data, self.teacher)

    def load(self, img_channels: int) -> dict:
        """The EMA state dict, after checking its sha256 against the record and loading it into the network
        the record's config builds (strict: every tensor, every shape)."""
        from .teachers import teacher_denoiser

        path = self.weights_path
        if not path.is_file():
            raise ShippedTeacherError(
                f"shipped teacher {path} is missing; restore it from git "
                f"(git checkout -- {path.name}) or delete {self.folder}"
            )
        got, want = file_sha256(path), self.record.get("weights_sha256")
        if got != want:
            raise ShippedTeacherError(
                f"shipped teacher {path} has sha256 {got[:16]}..., its record says "
                f"{str(want)[:16]}...: altered or truncated; restore it from git"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a file torch cannot read
            raise ShippedTeacherError(
                f"shipped teacher {path} is unreadable ({type(e).__name__}: {e})"
            ) from None
        net = teacher_denoiser(self.teacher, img_channels, self.data.resolution)
        try:
            load_model_state(net, state, str(path))
        except CheckpointError as e:
            raise ShippedTeacherError(
                f"{e}; the record {self.folder / RECORD} does not describe these weights"
            ) from e
        return state


def read_shipped(folder: Path) -> ShippedTeacher:
    """A shipped teacher's folder, its record parsed through today's config schema (keys added to the
    schema since take their defaults)."""
    path = folder / RECORD
    try:
        rec = json.loads(path.read_text())
        cfg = rec["config"]
        return ShippedTeacher(
            folder,
            rec,
            from_dict(DataConfig, cfg["data"], "data."),
            from_dict(TeacherConfig, cfg["teacher"], "teacher."),
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise ShippedTeacherError(
            f"shipped teacher record {path} is unreadable ({type(e).__name__}: {e}); "
            f"restore it from git or delete {folder}"
        ) from None


SAME_EVAL = ("n", "seed", "split", "reference")


def same_eval(record: dict | None, new: dict) -> dict | None:
    """The record's evaluation measured exactly as ``new`` (the same N, seeds, split and reference identity:
    the reference images' and the Inception weights' sha256 among it), or None. The one rule by which a recorded
    score is reused (the evaluate stage) or kept (``hkd ship-teacher``)."""
    for ev in (record or {}).get("evals") or []:
        if all(ev.get(k) == new.get(k) for k in SAME_EVAL):
            return ev
    return None


def shipped_dirs() -> list[Path]:
    """Where shipped teachers are looked for: $HKD_SHIPPED_TEACHERS (folders separated by ':'), then the
    package's own."""
    extra = [Path(p).expanduser() for p in os.environ.get("HKD_SHIPPED_TEACHERS", "").split(":") if p]
    return extra + [SHIPPED_DIR]


def find_shipped(
    data: DataConfig, teacher: TeacherConfig, dirs: list[Path] | None = None
) -> ShippedTeacher | None:
    """The shipped teacher trained with exactly this data and teacher config, if there is one."""
    want = teacher_hash(data, teacher)
    for root in dirs if dirs is not None else shipped_dirs():
        for rec in sorted(Path(root).glob(f"*/{RECORD}")) if Path(root).is_dir() else []:
            shipped = read_shipped(rec.parent)
            if shipped.hash == want:
                return shipped
    return None


def write_shipped(
    folder: Path, data: DataConfig, teacher: TeacherConfig, ema_state: dict, **facts
) -> ShippedTeacher:
    """Ship a trained teacher: its weights and a record (config, content hash, sha256, and ``facts``: kimg,
    train_s, FID/KID with N, the command that made it, ...). Each file is written whole or not at all.

    A teacher trained in segments (``teacher.resume_from``, one run per session or machine) is recorded under
    its config without ``resume_from``: resuming itself changes nothing in the weights (bit-equal to one
    uninterrupted run on as many workers, tests/hkd_core/test_teacher_resume.py), so the config that adopts it
    is the one that would have trained it in one go. The last segment's ``resume_from`` stays in the record as
    ``resumed_from``."""
    folder = Path(folder)
    if teacher.resume_from:
        facts = {"resumed_from": teacher.resume_from, **facts}
        teacher = dataclasses.replace(teacher, resume_from=None)
    atomic_write(
        folder / WEIGHTS,
        lambda f: torch.save({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, f),
    )
    record = {
        "config": {"data": dataclasses.asdict(data), "teacher": dataclasses.asdict(teacher)},
        "teacher_hash": teacher_hash(data, teacher),
        "weights_sha256": file_sha256(folder / WEIGHTS),
        **facts,
    }
    atomic_write_bytes(folder / RECORD, json.dumps(record, indent=1, sort_keys=True, default=float).encode())
    return read_shipped(folder)

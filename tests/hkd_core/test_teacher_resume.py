"""teacher.resume_from: a teacher's training continued from one of its training checkpoints is the run that was
never stopped (weights, EMA and optimiser state, the data order and noise of each step, the lr schedule by
kimg), and the driver's check of the file refuses what cannot be continued, naming the key."""

import pytest
import torch

from hkd_core.checkpoint import CheckpointError, latest_checkpoint
from hkd_core.config import TeacherConfig
from hkd_core.teachers import resumable_teacher_checkpoint, teacher_denoiser
from hkd_core.train import train_teacher

TEACHER = TeacherConfig(
    kind="edm", channels=8, channel_mult=[1, 2], blocks=1, attn_resolutions=[], sigma_data=0.5
)
KW = dict(
    batch_size=16,
    lr=3e-3,
    lr_rampup_kimg=0.064,  # the ramp-up spans the cut: the lr at each step must come back from the kimg
    log_every_kimg=0.032,
    checkpoint_every_kimg=0.032,
    ema_halflife_kimg=0.02,
    progress=False,
)


def _net(seed: int = 0):
    torch.manual_seed(seed)
    return teacher_denoiser(TEACHER, 1, 8)


def test_a_resumed_teacher_continues_bit_for_bit(toy_images, tmp_path):
    whole = train_teacher(_net(), toy_images, total_kimg=0.128, checkpoint_dir=tmp_path / "whole", **KW)
    train_teacher(_net(), toy_images, total_kimg=0.064, checkpoint_dir=tmp_path / "first", **KW)
    ckpt = latest_checkpoint(tmp_path / "first")
    assert resumable_teacher_checkpoint(ckpt.read_bytes(), TEACHER, 1, 8, str(ckpt)) == pytest.approx(0.064)
    # another initialisation: everything that matters must come from the checkpoint
    rest = train_teacher(
        _net(seed=1), toy_images, total_kimg=0.128, checkpoint_dir=tmp_path / "rest", resume=str(ckpt), **KW
    )
    assert rest["steps"] == whole["steps"] == 8 and rest["kimg"] == pytest.approx(whole["kimg"])
    for name, value in whole["ema"].state_dict().items():
        assert torch.equal(rest["ema"].state_dict()[name], value), name
    # the optimiser's moments are part of it: restarting them at the checkpoint gives other weights
    fresh_opt = torch.load(ckpt, weights_only=False)
    fresh_opt["optimizer"]["state"] = {}
    torch.save(fresh_opt, tmp_path / "no-opt.pt")
    other = train_teacher(
        _net(),
        toy_images,
        total_kimg=0.128,
        checkpoint_dir=tmp_path / "other",
        resume=str(tmp_path / "no-opt.pt"),
        **KW,
    )
    assert any(not torch.equal(other["ema"].state_dict()[k], v) for k, v in whole["ema"].state_dict().items())


def test_what_cannot_be_continued_is_refused_naming_the_key(toy_images, tmp_path):
    train_teacher(_net(), toy_images, total_kimg=0.032, checkpoint_dir=tmp_path, **KW)
    ckpt = latest_checkpoint(tmp_path)
    state = torch.load(ckpt, weights_only=False)
    weights_only = tmp_path / "teacher.pt"
    torch.save(state["ema"], weights_only)
    with pytest.raises(
        CheckpointError, match=r"teacher\.resume_from .*teacher\.pt holds weights but no training"
    ):
        resumable_teacher_checkpoint(weights_only.read_bytes(), TEACHER, 1, 8, str(weights_only))
    wider = TeacherConfig(**{**TEACHER.__dict__, "channels": 16})
    with pytest.raises(CheckpointError, match=r"teacher\.resume_from .*teacher\.channels"):
        resumable_teacher_checkpoint(ckpt.read_bytes(), wider, 1, 8, str(ckpt))
    with pytest.raises(CheckpointError, match=r"teacher\.resume_from .* is unreadable"):
        resumable_teacher_checkpoint(b"not a checkpoint", TEACHER, 1, 8, "s3://hkd/x/ckpt-1.pt")

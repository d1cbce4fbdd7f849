"""Shared fixtures: tiny models and trajectories small enough for unit tests to run in seconds."""
from __future__ import annotations

import pytest
import torch

from hkd_core.models import preset
from hkd_core.sampler import karras_sigmas, sample_heun
from hkd_core.teachers import EmpiricalTeacher


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Unit tests never write to the user's cache; the FID weights are looked up where setup put them.
    import os
    from pathlib import Path

    real = Path(os.environ.get("HKD_CACHE", Path.home() / ".cache" / "hkd")).expanduser()
    weights = real / "inception" / "weights-inception-2015-12-05-6726825d.pth"
    if weights.is_file() and "HKD_INCEPTION_WEIGHTS" not in os.environ:
        monkeypatch.setenv("HKD_INCEPTION_WEIGHTS", str(weights))
    monkeypatch.setenv("HKD_CACHE", str(tmp_path_factory.getbasetemp() / "hkd_cache"))


@pytest.fixture
def tiny_cfg():
    """The 'tiny' preset at 8x8: two levels (8x8, 4x4)."""
    return preset("tiny", resolution=8)


@pytest.fixture(scope="session")
def toy_images():
    g = torch.Generator().manual_seed(0)
    # 32 blurry 8x8 'images' in [-1, 1]
    x = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1).clamp(-1, 1)


@pytest.fixture(scope="session")
def toy_trajectories(toy_images):
    """(64, 7, 1, 8, 8) Heun trajectories (6 steps) of the empirical teacher of toy_images, and the sigmas."""
    teacher = EmpiricalTeacher(toy_images)
    sigmas = karras_sigmas(6)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 80
    tr = sample_heun(teacher.denoise, x_T, sigmas)
    return tr.states.transpose(0, 1).contiguous(), sigmas

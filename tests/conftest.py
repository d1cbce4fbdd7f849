"""Shared fixtures: tiny models and trajectories small enough for unit tests to run in seconds."""

from __future__ import annotations

import pytest
import torch

from hkd_core.architecture import preset
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


@pytest.fixture
def koopman_model(tiny_cfg):
    """A tiny HKD model whose generators are spread out (alpha in [-3, 0.5], beta in [-2, 2]), as after
    training: at initialisation every eigenvalue is 0 and the bands would be arbitrary."""
    from hkd_core.models import build_model

    torch.manual_seed(0)
    m = build_model("hkd", tiny_cfg).eval()
    with torch.no_grad():
        for k in m.koopman:
            k.alpha.uniform_(-3, 0.5)
            k.beta.uniform_(-2, 2)
    return m


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


def _real_weights():
    import os
    from pathlib import Path

    if os.environ.get("HKD_INCEPTION_WEIGHTS"):
        return Path(os.environ["HKD_INCEPTION_WEIGHTS"])
    real = Path(os.environ.get("HKD_CACHE", Path.home() / ".cache" / "hkd")).expanduser()
    return real / "inception" / "weights-inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="session")
def fid_images():
    """Two small, different sets of Fashion-MNIST images at 32x32 (32 train, 28 test)."""
    from hkd_core.data import load_images

    a, _ = load_images("fashion_mnist", "train", resolution=32, limit=32, seed=1)
    b, _ = load_images("fashion_mnist", "test", resolution=32, limit=28, seed=2)
    return a, b


@pytest.fixture(scope="session")
def torch_fidelity_direct(fid_images):
    """torch-fidelity's own FID and KID (subsets of 16) of ``fid_images``, computed once per session; the
    project's single-process and distributed FIDs are both checked against it."""
    import torch_fidelity

    from hkd_core.fid import InceptionFeatures

    weights = _real_weights()
    if not weights.is_file():
        pytest.fail(
            f"FID Inception weights missing at {weights}: run `python -m hkd_core weights` (set-up does)"
        )

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = InceptionFeatures.as_uint8_rgb(x)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    a, b = fid_images
    m = torch_fidelity.calculate_metrics(
        input1=Images(a),
        input2=Images(b),
        fid=True,
        kid=True,
        kid_subset_size=16,
        cuda=False,
        verbose=False,
        save_cpu_ram=True,
        feature_extractor_weights_path=str(weights),
    )
    return {
        "weights": weights,
        "fid": m["frechet_inception_distance"],
        "kid": m["kernel_inception_distance_mean"],
        "kid_std": m["kernel_inception_distance_std"],
    }


@pytest.fixture
def fast_kw():
    """train_hkd's keyword arguments for a run of seconds: small batches, no lr ramp, a log point and a
    checkpoint every 16 images, a short EMA (the tests of hkd_core.train and of the adversarial term)."""
    return dict(
        batch_size=16,
        lr=3e-3,
        lr_rampup_kimg=0.0,
        log_every_kimg=0.016,
        checkpoint_every_kimg=0.016,
        ema_halflife_kimg=0.01,
        progress=False,
    )


def _random_unet_teacher(seed: int = 0):
    """An EDM U-Net teacher (8 wide, two levels, 1 channel) with random weights of std 0.3, so that its features
    differ from position to position: for the teacher-feature distance and discriminator."""
    from hkd_core.config import TeacherConfig
    from hkd_core.teachers import teacher_denoiser

    torch.manual_seed(seed)
    net = teacher_denoiser(
        TeacherConfig(kind="edm", channels=8, channel_mult=[1, 2], blocks=1, attn_resolutions=[]), 1, 16
    )
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


@pytest.fixture
def unet_teacher():
    """``unet_teacher(seed=0)`` builds a small random-weight U-Net teacher (EDMPrecond)."""
    return _random_unet_teacher

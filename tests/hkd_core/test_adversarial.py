"""The adversarial term (beyond the paper, issue 23): the discriminator learns, the generator term points
towards what it calls real, and its state resumes with the run."""

import json

import pytest
import torch

from hkd_core.adversarial import AdversarialTerm, Discriminator
from hkd_core.models import build_model
from hkd_core.train import train_hkd


def _term(real: torch.Tensor, lr: float = 2e-3) -> AdversarialTerm:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    return AdversarialTerm(
        Discriminator(1, 8, width=8),
        lambda step: real[torch.randint(0, len(real), (16,), generator=g)],
        weight=0.01,
        lr=lr,
    )


def _two_sets():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, 3, 1, 1)
    noisy = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    return smooth, noisy


@pytest.mark.slow
def test_the_discriminator_learns_to_tell_real_from_fake():
    real, fake = _two_sets()
    term = _term(real)
    first = term.discriminator_step(fake[:16], 0)
    for step in range(1, 60):
        last = term.discriminator_step(fake[(step % 4) * 16 : (step % 4 + 1) * 16], step)
    assert last["adv_d_loss"] < 0.5 * first["adv_d_loss"], (first, last)
    with torch.no_grad():
        term.disc.eval()
        assert term.disc(real).mean() > term.disc(fake).mean() + 0.5


def test_the_generator_term_moves_samples_towards_real_and_leaves_the_discriminator_alone():
    real, fake = _two_sets()
    term = _term(real)
    for step in range(60):
        term.discriminator_step(fake[(step % 4) * 16 : (step % 4 + 1) * 16], step)
    before = {k: v.clone() for k, v in term.disc.state_dict().items()}
    x = fake[:16].clone().requires_grad_(True)
    term.generator_loss(x).backward()
    # no power-iteration step and no weight change in the discriminator
    for k, v in term.disc.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        term.disc.eval()
        moved = x - 0.5 * x.grad / x.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        assert term.disc(moved).mean() > term.disc(x).mean()


def test_the_discriminator_gets_no_gradient_from_the_generator_term():
    real, fake = _two_sets()
    term = _term(real)
    term.opt.zero_grad(set_to_none=True)
    term.generator_loss(fake[:16].clone().requires_grad_(True)).backward()
    assert all(p.grad is None for p in term.disc.parameters())
    assert all(p.requires_grad for p in term.disc.parameters())  # trainable again for its own step


def _fresh(tiny_cfg):
    torch.manual_seed(0)
    return build_model("hkd", tiny_cfg)


@pytest.mark.slow
def test_distillation_with_the_term_logs_it_and_resumes_with_the_same_discriminator(
    fast_kw, tiny_cfg, toy_trajectories, toy_images, tmp_path
):
    states, sigmas = toy_trajectories
    fast = {**fast_kw, "adversarial_weight": 0.05, "adversarial_lr": 1e-3}
    logged = []
    straight = train_hkd(
        _fresh(tiny_cfg),
        states,
        sigmas,
        total_kimg=0.16,
        checkpoint_dir=tmp_path / "a",
        real_images=toy_images,
        metrics_cb=lambda m, k: logged.append(m),
        **fast,
    )
    assert {"train/loss_adv", "train/adv_d_loss", "train/adv_d_real", "train/adv_d_fake"} <= set(logged[-1])

    def crash(path, metrics, kimg):
        if kimg >= 0.08 - 1e-9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_hkd(
            _fresh(tiny_cfg),
            states,
            sigmas,
            total_kimg=0.16,
            checkpoint_dir=tmp_path / "b",
            real_images=toy_images,
            checkpoint_cb=crash,
            **fast,
        )
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["kimg"] == pytest.approx(0.08)
    resumed = train_hkd(
        _fresh(tiny_cfg),
        states,
        sigmas,
        total_kimg=0.16,
        checkpoint_dir=tmp_path / "b",
        real_images=toy_images,
        **fast,
    )
    for a, b in zip(straight["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    # without the term the same run ends elsewhere: the term acts on the student
    plain = train_hkd(_fresh(tiny_cfg), states, sigmas, total_kimg=0.16, **fast_kw)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(straight["model"].state_dict().values(), plain["model"].state_dict().values())
    )


def test_a_checkpoint_without_the_discriminator_is_not_resumed_with_it(
    fast_kw, tiny_cfg, toy_trajectories, toy_images, tmp_path
):
    states, sigmas = toy_trajectories
    train_hkd(_fresh(tiny_cfg), states, sigmas, total_kimg=0.032, checkpoint_dir=tmp_path, **fast_kw)
    with pytest.raises(ValueError, match="adversarial"):
        train_hkd(
            _fresh(tiny_cfg),
            states,
            sigmas,
            total_kimg=0.064,
            checkpoint_dir=tmp_path,
            real_images=toy_images,
            **{**fast_kw, "adversarial_weight": 0.01},
        )


def test_the_term_needs_real_images(fast_kw, tiny_cfg, toy_trajectories):
    states, sigmas = toy_trajectories
    with pytest.raises(ValueError, match="train.adversarial_weight=0.01 needs real images"):
        train_hkd(
            _fresh(tiny_cfg), states, sigmas, total_kimg=0.032, **{**fast_kw, "adversarial_weight": 0.01}
        )


def test_recipe_extras_loads_only_what_the_recipe_asks_for():
    """The distill loop and the presets' first steps share this choice: the teacher network is loaded for
    perceptual=teacher only, the real images for an adversarial weight only."""
    from hkd_core.config import TrainConfig
    from hkd_core.train import recipe_extras

    calls = []

    def teacher():
        calls.append("teacher")
        return "net"

    def images():
        calls.append("images")
        return "imgs"

    assert recipe_extras(TrainConfig(perceptual="pseudo_huber", adversarial_weight=0.0), teacher, images) == {}
    assert calls == []
    both = recipe_extras(TrainConfig(perceptual="teacher", adversarial_weight=0.1), teacher, images)
    assert both == {"perceptual_kwargs": {"denoiser": "net"}, "real_images": "imgs"}
    assert calls == ["teacher", "images"]

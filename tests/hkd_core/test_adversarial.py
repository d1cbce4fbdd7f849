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
@pytest.mark.parametrize("disc", ["small", "teacher"])
def test_distillation_with_the_term_logs_it_and_resumes_with_the_same_discriminator(
    disc, fast_kw, tiny_cfg, toy_trajectories, toy_images, tmp_path, unet_teacher
):
    """Either discriminator: a run stopped halfway and resumed ends bit for bit where the straight run ends
    (the teacher-feature one's noise included)."""
    states, sigmas = toy_trajectories
    fast = {**fast_kw, "adversarial_weight": 0.05, "adversarial_lr": 1e-3, "adversarial_disc": disc}
    if disc == "teacher":
        fast.update(adversarial_teacher=unet_teacher(), adversarial_sigma=0.3)
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

    assert (
        recipe_extras(TrainConfig(perceptual="pseudo_huber", adversarial_weight=0.0), teacher, images) == {}
    )
    assert calls == []
    both = recipe_extras(TrainConfig(perceptual="teacher", adversarial_weight=0.1), teacher, images)
    assert both == {"perceptual_kwargs": {"denoiser": "net"}, "real_images": "imgs"}
    assert calls == ["teacher", "images"]
    calls.clear()  # the teacher-feature discriminator: the teacher too, loaded once when both want it
    cfg = TrainConfig(perceptual="teacher", adversarial_weight=0.1, adversarial_disc="teacher")
    assert recipe_extras(cfg, teacher, images) == {
        "perceptual_kwargs": {"denoiser": "net"},
        "real_images": "imgs",
        "adversarial_teacher": "net",
    }
    assert calls == ["teacher", "images"]
    calls.clear()
    cfg = TrainConfig(adversarial_weight=0.1, adversarial_disc="teacher")
    assert recipe_extras(cfg, teacher, images) == {"real_images": "imgs", "adversarial_teacher": "net"}
    assert (
        recipe_extras(TrainConfig(adversarial_disc="teacher"), teacher, images) == {}
    )  # no term, no teacher
    assert calls == ["teacher", "images"]


def _teacher_term(teacher, real, sigma=0.3):
    from hkd_core.adversarial import TeacherFeatureDiscriminator

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    disc = TeacherFeatureDiscriminator(teacher, sigma=sigma)
    return AdversarialTerm(
        disc, lambda step: real[torch.randint(0, len(real), (16,), generator=g)], weight=0.01, lr=2e-3
    )


def _sets16():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(64, 1, 16, 16, generator=g) * 2 - 1, 5, 1, 2)
    noisy = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1
    return smooth, noisy


def test_the_teacher_feature_discriminator_trains_its_heads_and_never_the_teacher(unet_teacher):
    """train.adversarial_disc=teacher: the discriminator learns to tell smooth images from noise through the
    frozen teacher's features; the teacher copy neither changes nor gets gradients (from either step), it is
    a copy (the given teacher is not touched), and only the heads are in the optimiser."""
    teacher = unet_teacher()
    given = {k: v.clone() for k, v in teacher.state_dict().items()}
    real, fake = _sets16()
    term = _teacher_term(teacher, real, sigma=0.1)
    frozen = {k: v.clone() for k, v in term.disc.features.state_dict().items()}
    assert {id(p) for p in term.trainable} == {id(p) for p in term.disc.heads.parameters()}
    losses = [
        float(term.discriminator_step(fake[(step % 4) * 16 : (step % 4 + 1) * 16], step)["adv_d_loss"])
        for step in range(60)
    ]
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0], losses  # 2 is chance; noisy step to step
    x = fake[:16].clone().requires_grad_(True)
    heads = {k: v.clone() for k, v in term.disc.heads.state_dict().items()}
    term.generator_loss(x).backward()
    assert x.grad.abs().sum() > 0
    for k, v in term.disc.heads.state_dict().items():  # no power-iteration step, no weight change
        assert torch.equal(v, heads[k]), k
    for k, v in term.disc.features.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None and not p.requires_grad for p in term.disc.features.parameters())
    assert all(p.requires_grad for p in term.disc.heads.parameters())
    assert not term.disc.features.training  # eval mode, whatever the discriminator's
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, given[k]), k
    with torch.no_grad():
        term.disc.eval()
        assert term.disc(real).mean() > term.disc(fake).mean() + 0.5


def test_the_teacher_feature_discriminator_draws_its_noise_by_call_count(unet_teacher):
    """Its noise depends only on (seed, calls), a buffer in its state: a copy restored from a state dict draws
    what the original draws next (so a resumed run continues bit for bit)."""
    from hkd_core.adversarial import TeacherFeatureDiscriminator

    teacher = unet_teacher()
    a = TeacherFeatureDiscriminator(teacher, sigma=0.3, seed=3)
    x = _sets16()[0][:4]
    with torch.no_grad():
        a(x), a(x)
        b = TeacherFeatureDiscriminator(teacher, sigma=0.3, seed=0)
        b.load_state_dict(a.state_dict())
        assert int(b.calls) == 2 and int(b.seed) == 3
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), a(x))  # another call, other noise


def test_the_teacher_feature_discriminator_is_refused_without_a_network(fast_kw, tiny_cfg, toy_trajectories):
    """adversarial_disc=teacher with no teacher passed: a clear error naming the key, before training."""
    states, sigmas = toy_trajectories
    with pytest.raises(ValueError, match="adversarial_disc=teacher"):
        train_hkd(
            _fresh(tiny_cfg),
            states,
            sigmas,
            total_kimg=0.04,
            real_images=torch.zeros(8, 1, 16, 16),
            adversarial_weight=0.1,
            adversarial_disc="teacher",
            **fast_kw,
        )

"""model.init: the student takes exactly the teacher tensors it says, and nothing else; a mismatched trunk is
refused before training, naming the tensor."""

import pytest
import torch

from hkd_core.config import ConfigError, DataConfig, ModelConfig, RunConfig, TeacherConfig
from hkd_core.models import build_model
from hkd_core.teacher_init import TeacherInitError, init_from_teacher
from hkd_core.teachers import teacher_denoiser
from hkd_core.validation import validate

TEACHER = TeacherConfig(
    kind="edm", channels=8, channel_mult=[1, 2], blocks=1, attn_resolutions=[], sigma_data=0.66
)
STUDENT = dict(preset="tiny")  # channels 8, channel_mult [1, 2], blocks 1: the teacher's trunk


def _pair(variant: str):
    cfg = RunConfig(
        data=DataConfig(limit=None), teacher=TEACHER, model=ModelConfig(variant=variant, **STUDENT)
    )
    torch.manual_seed(0)
    teacher = teacher_denoiser(TEACHER, 1, 32)
    with torch.no_grad():  # random, non-zero values everywhere (fresh U-Nets zero some convs)
        for p in teacher.parameters():
            p.normal_()
    torch.manual_seed(1)
    return cfg, build_model(variant, cfg.hkd_config()), teacher.state_dict()


def _random_teacher(std: float = 0.2):
    """The tiny teacher with random, non-zero values everywhere (seed 0)."""
    torch.manual_seed(0)
    teacher = teacher_denoiser(TEACHER, 1, 32)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, std)
    return teacher


@pytest.mark.parametrize("mode", ["teacher_encoder", "teacher"])
def test_hkd_takes_exactly_the_tensors_it_names(mode):
    _, model, tstate = _pair("hkd")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = init_from_teacher(model, tstate, mode)
    after = model.state_dict()
    enc = [k for k in after if k.startswith("encoder.")]
    assert set(enc) <= set(names)  # the whole encoder, always
    for k in names:
        src = k.replace("encoder.stages.", "net.down.").replace("encoder.", "net.")
        if k.startswith("decoder.stages."):
            level, rest = k[len("decoder.stages.") :].split(".", 1)
            src = f"net.up.{model.cfg.levels - 1 - int(level)}.{rest}"
        elif k.startswith("decoder."):
            src = "net." + k[len("decoder.") :]
        assert torch.equal(after[k], tstate[src]), k
    for k in set(after) - set(names):  # everything else untouched
        assert torch.equal(after[k], before[k]), k
    dec = [k for k in names if k.startswith("decoder.")]
    if mode == "teacher_encoder":
        assert dec == []
    else:
        # the output head and the finer decoder stages take the teacher's up path; the coarsest stage's first
        # convolution cannot (it sees the latent alone, the teacher's sees the bottleneck and a skip)
        assert "decoder.conv_out.weight" in dec and "decoder.stages.0.res.0.conv0.weight" in dec
        assert "decoder.stages.1.res.0.conv0.weight" not in dec
        assert not any(k.startswith(("proj.", "koopman.", "decoder.lift.")) for k in names)


def test_kd_is_the_whole_teacher():
    _, model, tstate = _pair("kd")
    names = init_from_teacher(model, tstate, "teacher")
    assert len(names) == len(tstate) == len(model.state_dict())
    x = torch.randn(3, 1, 32, 32)
    teacher = teacher_denoiser(TEACHER, 1, 32)
    teacher.load_state_dict(tstate)
    torch.testing.assert_close(model(x, 2.5), teacher(x, 2.5))  # the same function


def test_a_mismatched_trunk_is_refused_naming_the_tensor():
    _, model, tstate = _pair("hkd")
    bad = dict(tstate)
    bad["net.down.1.res.0.conv0.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(
        TeacherInitError, match=r"encoder.stages.1.res.0.conv0.weight .*net.down.1.res.0.conv0.weight"
    ):
        init_from_teacher(model, bad, "teacher")
    wide = RunConfig(
        data=DataConfig(limit=None),
        teacher=TEACHER,
        model=ModelConfig(preset="tiny", channels=16, init="teacher"),
    )
    with pytest.raises(ConfigError, match="model.init=teacher: student tensor encoder.embed"):
        validate(wide)
    empirical = RunConfig(model=ModelConfig(preset="tiny", init="teacher"))
    with pytest.raises(ConfigError, match="needs a U-Net teacher"):
        validate(empirical)
    validate(
        RunConfig(
            data=DataConfig(limit=None), teacher=TEACHER, model=ModelConfig(preset="tiny", init="teacher")
        )
    )


def test_the_student_follows_the_teachers_sigma_data():
    cfg, model, _ = _pair("hkd")
    assert cfg.hkd_config().sigma_data == 0.66 and model.encoder.sigma_data == 0.66
    assert RunConfig(model=ModelConfig(sigma_data=0.5), teacher=TEACHER).hkd_config().sigma_data == 0.5


def test_latents_as_wide_as_their_level_start_as_the_teachers_skip_features():
    """model.init=teacher with subspace_dims equal to the trunk's widths: the projections and lifts are set to
    the identity (and named), so each latent is the teacher's down-path feature and the lift hands it on
    unchanged; narrower latents keep their random projections."""
    cfg = RunConfig(
        data=DataConfig(limit=None),
        teacher=TEACHER,
        model=ModelConfig(variant="hkd", subspace_dims=[8, 16], **STUDENT),
    )
    _, _, tstate = _pair("hkd")
    torch.manual_seed(1)
    wide = build_model("hkd", cfg.hkd_config())
    names = init_from_teacher(wide, tstate, "teacher")
    links = sorted(k for k in names if k.startswith(("proj.", "decoder.lift.")))
    assert links == sorted(
        f"{m}.{i}.{p}" for m in ("proj", "decoder.lift") for i in (0, 1) for p in ("weight", "bias")
    )
    x, sigma = torch.randn(2, 1, 32, 32) * 5, torch.tensor([5.0, 5.0])
    feats = wide.encoder(x, sigma)
    for f, z in zip(feats, wide.encode(x, sigma)):
        torch.testing.assert_close(z, f)
    for l, f in enumerate(feats):
        torch.testing.assert_close(wide.decoder.lift[l](f), f)
    _, narrow, _ = _pair("hkd")  # tiny: subspace_dims [4, 4] < widths [8, 16]
    before = {
        k: v.clone() for k, v in narrow.state_dict().items() if k.startswith(("proj.", "decoder.lift."))
    }
    assert not [k for k in init_from_teacher(narrow, tstate, "teacher") if k in before]
    assert all(torch.equal(narrow.state_dict()[k], v) for k, v in before.items())


def test_a_unet_decoder_starts_as_the_teachers_denoiser_at_sigma_max():
    """model.decoder=unet, latents as wide as their level, model.init=teacher: before any training the one-step
    student computes the teacher's D(x_T; sigma_max) less its c_skip x_T term, to float precision; only the
    Koopman generators (which start at 0) are left unset."""
    from hkd_core.edm import SIGMA_MAX

    cfg = RunConfig(
        data=DataConfig(limit=None),
        teacher=TEACHER,
        model=ModelConfig(variant="hkd", subspace_dims=[8, 16], decoder="unet", **STUDENT),
    )
    teacher = _random_teacher()
    student = build_model("hkd", cfg.hkd_config())
    names = init_from_teacher(student, teacher.state_dict(), "teacher")
    assert sorted(set(student.state_dict()) - set(names)) == sorted(
        f"koopman.{l}.{p}" for l in (0, 1) for p in ("alpha", "beta")
    )
    x = torch.randn(3, 1, 32, 32) * SIGMA_MAX
    c_skip = 0.66**2 / (SIGMA_MAX**2 + 0.66**2)
    with torch.no_grad():
        torch.testing.assert_close(
            student(x, SIGMA_MAX), teacher(x, SIGMA_MAX) - c_skip * x, atol=1e-4, rtol=1e-4
        )
    light = build_model(
        "hkd",
        RunConfig(
            data=DataConfig(limit=None), teacher=TEACHER, model=ModelConfig(subspace_dims=[8, 16], **STUDENT)
        ).hkd_config(),
    )
    init_from_teacher(light, teacher.state_dict(), "teacher")
    with torch.no_grad():  # the light decoder is not the teacher
        assert (light(x, SIGMA_MAX) - (teacher(x, SIGMA_MAX) - c_skip * x)).abs().max() > 1e-2


@pytest.mark.parametrize("grow", [1, 2])
def test_a_grown_student_still_starts_as_the_teachers_denoiser(grow):
    """model.grow_blocks: the extra decoder blocks are the identity at initialisation, so a grown student
    grown from the teacher computes the teacher's D(x_T; sigma_max) less c_skip x_T, like the plain one; the
    blocks' zeroed convolutions still get a gradient at the first step (they are trained, not dead)."""
    from hkd_core.edm import SIGMA_MAX

    cfg = RunConfig(
        data=DataConfig(limit=None),
        teacher=TEACHER,
        model=ModelConfig(variant="hkd", subspace_dims=[8, 16], decoder="unet", grow_blocks=grow, **STUDENT),
    )
    teacher = _random_teacher()
    student = build_model("hkd", cfg.hkd_config())
    names = init_from_teacher(student, teacher.state_dict(), "teacher")
    grown = [k for k in student.state_dict() if k.startswith("decoder.grown.")]
    assert grown and not set(grown) & set(names)  # the new blocks are new: nothing copied into them
    assert len(student.decoder.grown) == 2 and all(len(level) == grow for level in student.decoder.grown)
    x = torch.randn(3, 1, 32, 32) * SIGMA_MAX
    c_skip = 0.66**2 / (SIGMA_MAX**2 + 0.66**2)
    with torch.no_grad():
        torch.testing.assert_close(
            student(x, SIGMA_MAX), teacher(x, SIGMA_MAX) - c_skip * x, atol=1e-4, rtol=1e-4
        )
    student(x, SIGMA_MAX).square().mean().backward()
    assert student.decoder.grown[0][0].conv1.weight.grad.abs().sum() > 0


def test_grow_blocks_is_refused_for_kd():
    cfg = RunConfig(
        data=DataConfig(limit=None),
        teacher=TEACHER,
        model=ModelConfig(variant="kd", grow_blocks=1, **STUDENT),
    )
    with pytest.raises(ConfigError, match="model.grow_blocks=1"):
        validate(cfg)


def test_one_level_starts_from_the_teacher_like_the_others():
    """The one_level row: its coarsest latent holds every level's modes (wider than the level) and its finer
    decoder stages get no latent. Every tensor but the Koopman generators still starts from the teacher: the
    wide latent's first channels as the identity (the rest: random projection, zero lift, so they start silent
    and still learn), the latent-less stages' first block as the teacher's with the skip's input channels
    sliced off."""
    cfg = RunConfig(
        data=DataConfig(limit=None),
        teacher=TEACHER,
        model=ModelConfig(variant="one_level", subspace_dims=[8, 16], decoder="unet", **STUDENT),
    )
    teacher = _random_teacher()
    t = teacher.state_dict()
    student = build_model("one_level", cfg.hkd_config())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    names = init_from_teacher(student, t, "teacher")
    own = student.state_dict()
    assert sorted(set(own) - set(names)) == ["koopman.0.alpha", "koopman.0.beta"]
    proj, lift = (
        own["proj.0.weight"][:, :, 0, 0],
        own["decoder.lift.1.weight"][:, :, 0, 0],
    )  # (24, 16), (16, 24)
    assert (
        proj.shape == (24, 16)
        and torch.equal(proj[:16], torch.eye(16))
        and torch.equal(proj[16:], before["proj.0.weight"][16:, :, 0, 0])
    )
    assert torch.equal(lift[:, :16], torch.eye(16)) and not lift[:, 16:].any()
    conv = own["decoder.stages.0.res.0.conv0.weight"]  # sees the 16 channels from below only
    assert conv.shape[1] == 16 and torch.equal(conv, t["net.up.1.res.0.conv0.weight"][:, :16])
    assert torch.equal(own["decoder.stages.0.res.0.norm0.weight"], t["net.up.1.res.0.norm0.weight"][:16])
    assert torch.equal(own["decoder.stages.0.res.0.skip.weight"], t["net.up.1.res.0.skip.weight"][:, :16])
    assert torch.equal(own["decoder.stages.0.res.0.conv1.weight"], t["net.up.1.res.0.conv1.weight"])

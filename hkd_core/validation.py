"""``validate``: every key of a RunConfig and every constraint between keys, checked before any work; each
failure a ``ConfigError`` whose message names the key and what to do. The checks that build networks (the
teacher initialisation, on the meta device: shapes only) and the gauge keys' are here too; the primitives
(``ConfigError``, ``choice``, ``positive``, ``from_dict``) are in config_checks.py, below config.py."""

from __future__ import annotations

from pathlib import Path

from .architecture import PRESETS
from .config import EMPIRICAL_LIMIT, RunConfig, default_latent_weight
from .config_checks import ConfigError
from .config_checks import choice as _choice
from .config_checks import positive as _positive
from .data import DATASETS
from .losses import PERCEPTUAL
from .models import VARIANTS
from .sampler import SAMPLERS, karras_sigmas


def validate(cfg: RunConfig) -> RunConfig:
    """Check every key and every cross-key constraint; raise ConfigError naming the key."""
    _choice("data.name", cfg.data.name, DATASETS)
    _choice("data.split", cfg.data.split, {"train", "test"})
    native = DATASETS[cfg.data.name].resolution
    if cfg.data.resolution < native or (cfg.data.resolution - native) % 2:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} is not reachable from {cfg.data.name}'s {native}px "
            f"by symmetric zero-padding; use {native} or {native} + an even number (e.g. 32)"
        )
    if isinstance(cfg.data.limit, str):
        raise ConfigError(
            f"data.limit={cfg.data.limit!r}: give a number of images, null (all of them) or auto "
            f"(all for teacher=edm, {EMPIRICAL_LIMIT} for teacher=empirical)"
        )
    _positive("data.limit", cfg.data.limit)
    _choice("teacher.kind", cfg.teacher.kind, {"empirical", "edm"})
    for k in ("sigma_data", "total_kimg", "batch_size", "lr", "log_every_kimg", "checkpoint_every_kimg"):
        _positive(f"teacher.{k}", getattr(cfg.teacher, k))
    _positive("teacher.max_train_s", cfg.teacher.max_train_s)
    if cfg.teacher.checkpoint:
        if cfg.teacher.kind != "edm":
            raise ConfigError(
                f"teacher.checkpoint is set but teacher.kind is {cfg.teacher.kind!r}; a checkpoint "
                f"holds a U-Net teacher's weights: use teacher=edm, or unset teacher.checkpoint"
            )
        if "://" not in cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).expanduser().is_file():
            raise ConfigError(
                f"teacher.checkpoint={cfg.teacher.checkpoint} is not a file; give a local teacher.pt "
                f"(or a training checkpoint) or an s3://bucket/key URI"
            )
    if cfg.teacher.resume_from:
        if cfg.teacher.kind != "edm":
            raise ConfigError(
                f"teacher.resume_from is set but teacher.kind is {cfg.teacher.kind!r}; only a trained U-Net teacher "
                f"(teacher=edm) has training to continue: use teacher=edm, or unset teacher.resume_from"
            )
        if cfg.teacher.checkpoint:
            raise ConfigError(
                "teacher.resume_from and teacher.checkpoint are both set: teacher.checkpoint adopts finished "
                "weights (no training), teacher.resume_from continues training; unset one of them"
            )
    _choice("trajectories.sampler", cfg.trajectories.sampler, SAMPLERS)
    for k in ("num", "steps", "shard_size", "batch_size"):
        _positive(f"trajectories.{k}", getattr(cfg.trajectories, k))
    _positive("trajectories.holdout", cfg.trajectories.holdout, strict=False)
    _choice("model.variant", cfg.model.variant, VARIANTS)
    _choice("model.preset", cfg.model.preset, PRESETS)
    _positive("model.sigma_data", cfg.model.sigma_data)
    try:
        cfg.hkd_config().validate()
    except ValueError as e:  # ConfigError included: keep the message, which names the key
        raise ConfigError(str(e)) from None
    check_init(cfg)
    for k in ("total_kimg", "batch_size", "lr", "states_per_traj", "log_every_kimg", "checkpoint_every_kimg"):
        _positive(f"train.{k}", getattr(cfg.train, k))
    _positive("train.max_train_s", cfg.train.max_train_s)
    _choice("train.perceptual", cfg.train.perceptual, set(PERCEPTUAL))
    _positive("train.perceptual_sigma", cfg.train.perceptual_sigma)
    if cfg.train.perceptual == "teacher" and cfg.teacher.kind != "edm":
        raise ConfigError(
            f"train.perceptual=teacher measures images in a U-Net teacher's features; teacher.kind is "
            f"{cfg.teacher.kind!r}, which has no network: use teacher=edm (it adopts a shipped teacher "
            f"where one matches), or train.perceptual=pseudo_huber"
        )
    _choice("train.lr_schedule", cfg.train.lr_schedule, {"constant", "cosine"})
    if not 0 <= cfg.train.lr_end_frac <= 1:
        raise ConfigError(
            f"train.lr_end_frac={cfg.train.lr_end_frac} must be in [0, 1] (the last lr as a fraction "
            f"of the peak)"
        )
    _positive("train.teacher_lr_mult", cfg.train.teacher_lr_mult, strict=False)
    _positive("train.holdout_every_kimg", cfg.train.holdout_every_kimg, strict=False)
    check_gauge(cfg)
    _positive("train.adversarial_weight", cfg.train.adversarial_weight, strict=False)
    _positive("train.adversarial_lr", cfg.train.adversarial_lr)
    _positive("train.adversarial_start_kimg", cfg.train.adversarial_start_kimg, strict=False)
    _choice("train.adversarial_disc", cfg.train.adversarial_disc, {"small", "teacher"})
    _positive("train.adversarial_sigma", cfg.train.adversarial_sigma)
    if cfg.train.adversarial_weight and cfg.train.adversarial_disc == "teacher" and cfg.teacher.kind != "edm":
        raise ConfigError(
            f"train.adversarial_disc=teacher puts the discriminator on a U-Net teacher's features; teacher.kind "
            f"is {cfg.teacher.kind!r}, which has no network: use teacher=edm, or train.adversarial_disc=small"
        )
    if cfg.train.adversarial_weight and cfg.data.resolution % 8:
        raise ConfigError(
            f"train.adversarial_weight={cfg.train.adversarial_weight}: the discriminator halves the "
            f"resolution 3 times; data.resolution={cfg.data.resolution} is not divisible by 8"
        )
    if cfg.model.grow_blocks and cfg.model.variant == "kd":
        raise ConfigError(
            f"model.grow_blocks={cfg.model.grow_blocks} adds blocks to the HKD/KDM decoder; "
            f"model.variant=kd is the teacher's U-Net itself: use model.grow_blocks=0 (or null)"
        )
    if cfg.train.perceptual == "lpips":
        for key in ("lpips_vgg_path", "lpips_lin_path"):
            path = getattr(cfg.train, key)
            if not path:
                raise ConfigError(
                    f"train.perceptual=lpips needs local weight files (nothing is downloaded): set "
                    f"train.lpips_vgg_path (torchvision's vgg16 state dict) and train.lpips_lin_path "
                    f"(the LPIPS linear heads); train.{key} is not set. Or use "
                    f"train.perceptual=pseudo_huber, which needs none"
                )
            if not Path(path).expanduser().is_file():
                raise ConfigError(
                    f"train.{key}={path} is not a file; LPIPS needs its weights on local disk "
                    f"(the same path on every node), or use train.perceptual=pseudo_huber"
                )
    if cfg.train.xT_weight is not None and not 0 < cfg.train.xT_weight <= 1:
        raise ConfigError(
            f"train.xT_weight={cfg.train.xT_weight} must be in (0, 1], or null for the paper's plain "
            f"sum over the states"
        )
    _positive("train.tcons_sigma_min", cfg.train.tcons_sigma_min, strict=False)

    if cfg.train.latent_weight is None:
        cfg.train.latent_weight = default_latent_weight(cfg.model.variant)
    _positive("train.latent_weight", cfg.train.latent_weight, strict=False)
    if cfg.train.latent_weight > 0 and cfg.model.variant in ("kd", "kdm"):
        raise ConfigError(
            f"train.latent_weight={cfg.train.latent_weight} needs per-level Koopman latents "
            f"(model.variant hkd, no_koopman or one_level); model.variant={cfg.model.variant} has none: "
            f"use train.latent_weight=0"
        )
    inner = karras_sigmas(cfg.trajectories.steps)[1:-1]  # the states strictly between x_T and x_0
    allowed = int((inner >= cfg.train.tcons_sigma_min).sum())
    s = cfg.train.states_per_traj
    needed = s - 1 + (1 if cfg.train.latent_weight > 0 and s == 1 else 0)
    if needed > allowed:
        why = f"train.states_per_traj={s}" + (
            f" with train.latent_weight={cfg.train.latent_weight}" if needed > s - 1 else ""
        )
        raise ConfigError(
            f"{why} needs {needed} intermediate states, but trajectories.steps="
            f"{cfg.trajectories.steps} gives {allowed}"
            + (
                f" with sigma >= train.tcons_sigma_min={cfg.train.tcons_sigma_min}"
                if cfg.train.tcons_sigma_min
                else ""
            )
        )
    _positive("eval.n", cfg.eval.n)
    if cfg.eval.n < 2:
        raise ConfigError(
            f"eval.n={cfg.eval.n}: FID needs at least 2 samples (a covariance); use a few hundred or more"
        )
    _choice("eval.split", cfg.eval.split, {"train", "test"})
    _positive("eval.curve_n", cfg.eval.curve_n, strict=False)
    if cfg.eval.curve_n == 1:
        raise ConfigError(
            "eval.curve_n=1: FID needs at least 2 samples; use 0 (no curve) or a few hundred or more"
        )
    for i, n in enumerate(cfg.eval.teacher_nfe):
        _positive(f"eval.teacher_nfe[{i}]", n)
    return cfg


def check_gauge(cfg: RunConfig) -> None:
    """The gauge keys (issue 24): offsets and the condition need Koopman latents that evolve."""
    m, t = cfg.model, cfg.train
    _positive("train.gauge_weight", t.gauge_weight, strict=False)
    _positive("model.alpha_offset_spread", m.alpha_offset_spread, strict=False)
    evolves = m.variant in ("hkd", "one_level") and "none" not in cfg.hkd_config().operators()
    for key, value in (
        ("train.gauge_weight", t.gauge_weight),
        ("model.alpha_offset", m.alpha_offset),
        ("model.alpha_offset_spread", m.alpha_offset_spread),
    ):
        if value and not evolves:
            raise ConfigError(
                f"{key}={value} acts on Koopman latents that evolve; model.variant={m.variant} "
                f"(operator {cfg.hkd_config().operator}) has none: use model.variant=hkd or one_level"
            )
    if t.gauge_weight and cfg.hkd_config().observables == "state":
        raise ConfigError(
            f"train.gauge_weight={t.gauge_weight} with model.observables=state: observables of the state "
            f"alone meet the gauge condition by construction (the condition is then 0); use one of them"
        )


def check_init(cfg: RunConfig) -> None:
    """model.init: the teacher must be a U-Net, and the student's trunk must take its tensors (checked on
    shapes only, with both networks built on the meta device: no memory, no time)."""
    from .teacher_init import INIT_MODES, TeacherInitError, init_from_teacher

    _choice("model.init", cfg.model.init, INIT_MODES)
    if cfg.model.init == "none":
        return
    if cfg.teacher.kind != "edm":
        raise ConfigError(
            f"model.init={cfg.model.init} needs a U-Net teacher (teacher=edm); teacher.kind is "
            f"{cfg.teacher.kind!r}, which has no weights to start from; use model.init=none"
        )
    h, t_levels = cfg.hkd_config(), len(cfg.teacher.channel_mult)
    if h.levels > t_levels:  # say what was asked for, before a tensor name would
        raise ConfigError(
            f"model.levels={h.levels} with model.init={cfg.model.init}: the student starts from the "
            f"teacher's U-Net, which has only {t_levels} levels (teacher.channel_mult="
            f"{list(cfg.teacher.channel_mult)}); use model.levels <= {t_levels} or model.init=none "
            f"(random weights)"
        )
    import torch

    from .data import DATASETS
    from .models import build_model
    from .teachers import teacher_denoiser

    with torch.device("meta"):
        student = build_model(cfg.model.variant, cfg.hkd_config())
        teacher = teacher_denoiser(cfg.teacher, DATASETS[cfg.data.name].channels, cfg.data.resolution)
    if cfg.model.variant != "kd" or cfg.model.init == "teacher":
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in teacher.state_dict().items()}
        try:
            dry_init(student, shapes, cfg.model.init, init_from_teacher)
        except TeacherInitError as e:
            raise ConfigError(str(e)) from None
    else:
        raise ConfigError(
            "model.init=teacher_encoder does not apply to model.variant=kd (no separate encoder); "
            "use model.init=teacher (the whole U-Net) or none"
        )
    if abs(cfg.hkd_config().sigma_data - cfg.teacher.sigma_data) > 1e-12:
        raise ConfigError(
            f"model.init={cfg.model.init} with model.sigma_data={cfg.model.sigma_data} != "
            f"teacher.sigma_data={cfg.teacher.sigma_data}: the copied layers expect the teacher's input "
            f"scaling; leave model.sigma_data unset (it follows the teacher)"
        )


def dry_init(student, shapes, mode, init) -> None:
    import torch

    with torch.no_grad():
        init(student, shapes, mode, "the teacher (teacher.*)")

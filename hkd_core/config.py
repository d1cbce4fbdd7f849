"""The configuration of a run, as nested dataclasses with defaults, strict loading and stage hashes.

This is the single schema: the local command fills it from flags, the orchestrator from Hydra. Loading
from a dict rejects unknown keys and wrong types with the dotted key at fault; ``validate`` checks what
depends on several keys (levels vs subspace dims vs resolution, and so on) before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .architecture import PRESETS, HKDConfig
from .config_checks import ConfigError
from .data import DATASETS

# field metadata: the key enters a stage's identity (its hash) only when it differs from its default
IDENTITY_WHEN_SET = {"identity": "when_set"}


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # mnist | fashion_mnist | cifar10_jpeg
    split: str = "train"
    resolution: int = 32  # 28 -> 32 by zero-padding for the gray sets
    limit: int | str | None = "auto"  # images the teacher sees (a seeded subset); None: all; auto: all for a
    # trained teacher (edm), EMPIRICAL_LIMIT for the empirical one (its
    # closed form runs over the whole subset at every denoiser call)
    root: str | None = None  # a folder holding the data files (searched first)


@dataclass
class TeacherConfig:
    kind: str = "empirical"  # empirical (closed form, no training) | edm (trained here)
    channels: int = 32  # edm: U-Net width ...
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    dropout: float = 0.0
    sigma_data: float = 0.5  # edm: EDM's sigma_data, the data's std (Fashion-MNIST padded to 32: 0.66)
    total_kimg: float = 200.0  # edm: training length
    max_train_s: float | None = None  # edm: optional wall-clock budget, seconds of training
    batch_size: int = 128
    lr: float = 1e-3
    lr_rampup_kimg: float = 10.0
    grad_clip: float = 1.0
    ema_halflife_kimg: float = 10.0
    ema_rampup: float = 0.05
    log_every_kimg: float = 2.0
    checkpoint_every_kimg: float = 20.0
    checkpoint: str | None = None  # edm: use this checkpoint (a local file or s3://bucket/key) instead of
    # training: its EMA weights become the teacher stage's output
    resume_from: str | None = field(default=None, metadata={"identity": "when_set"})  # edm: continue training
    # from this training checkpoint (a ckpt-<kimg>.pt, local or s3://): its weights, optimiser, EMA and kimg;
    # training goes on to total_kimg (raise max_train_s, which counts the seconds already trained, or unset it)


@dataclass
class TrajectoryConfig:
    num: int = 1000  # trajectories for training
    holdout: int = 100  # extra trajectories (unseen seeds) to measure error vs the teacher
    sampler: str = "heun"
    steps: int = 18  # Heun: 2 * steps - 1 NFE (35 at 18)
    shard_size: int = 250
    batch_size: int = 250
    seed: int = 0


# The model's architecture keys are HKDConfig's own fields (hkd_core/architecture.py, where each is documented), added
# to ModelConfig below, each None here: "the preset's value" (PRESETS holds the named architectures). The data set
# gives img_channels and resolution. A key in IDENTITY_WHEN_NONE is part of a stage's identity even while None (as
# it has been since the model config was first hashed); any other architecture key joins the identity only once
# it is set, so a field added to HKDConfig changes no existing config's hash.
FROM_DATA = ("img_channels", "resolution")
IDENTITY_WHEN_NONE = (
    "levels",
    "subspace_dims",
    "channels",
    "channel_mult",
    "blocks",
    "attn_levels",
    "operator",
    "dropout",
    "kdm_dim",
    "alpha_bound",
    "decoder",
    "sigma_data",
    "grow_blocks",
    "observables",
)
_AFTER_ARCH = ("init", "alpha_offset", "alpha_offset_spread")


def _with_architecture_keys(cls):
    """``cls`` as a dataclass whose fields are its own plus every HKDConfig field (but FROM_DATA), typed
    ``<HKDConfig's type> | None`` with default None, placed between ``preset`` and ``init``."""
    hints = typing.get_type_hints(HKDConfig)
    own = dict(cls.__annotations__)
    arch = {}
    for f in dataclasses.fields(HKDConfig):
        if f.name in FROM_DATA:
            continue
        arch[f.name] = hints[f.name] | None
        setattr(
            cls,
            f.name,
            field(default=None, metadata={} if f.name in IDENTITY_WHEN_NONE else {"identity": "when_set"}),
        )
    before = {k: v for k, v in own.items() if k not in _AFTER_ARCH}
    cls.__annotations__ = {**before, **arch, **{k: own[k] for k in _AFTER_ARCH}}
    return dataclass(cls)


@_with_architecture_keys
class ModelConfig:
    """The student: its variant, a named architecture (``preset``, architecture.PRESETS) with any of HKDConfig's fields
    overridden (``model.channels=48``; None keeps the preset's), and how it starts."""

    variant: str = "hkd"  # hkd | no_koopman | one_level | kd | kdm
    preset: str = "small"  # tiny | small | cifar (architecture.PRESETS)
    init: str = "auto"  # none | teacher: start from the teacher's U-Net (hkd_core/teacher_init.py);
    # auto: teacher where the teacher is a U-Net (edm), else none
    alpha_offset: float = 0.0  # the gauge experiment (issue 24): alpha starts at this per-mode offset
    alpha_offset_spread: float = (
        0.0  # plus a uniform draw in +-this per mode (seeded by train.seed), the decoder's
    )
    # lift scaled to keep the map at sigma_max (hkd_core/gauge.offset_alpha)

    def architecture(self) -> dict:
        """The architecture keys that are set (the overrides of the preset)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("variant", "preset", *_AFTER_ARCH) and getattr(self, f.name) is not None
        }

    def hkd_config(self, img_channels: int, resolution: int, sigma_data: float | None = None) -> HKDConfig:
        over = self.architecture()
        base = dataclasses.replace(PRESETS[self.preset], img_channels=img_channels, resolution=resolution)
        if sigma_data is not None and self.sigma_data is None:
            base = dataclasses.replace(base, sigma_data=sigma_data)
        if "levels" in over and "subspace_dims" not in over and over["levels"] != base.levels:
            raise ConfigError(
                f"model.levels={over['levels']} differs from preset {self.preset!r} "
                f"({base.levels} levels); give model.subspace_dims too (one even d_l per level)"
            )
        return dataclasses.replace(base, **over)


@dataclass
class TrainConfig:
    # Defaults: the main job's recipe on 2 CPU cores, chosen at equal training seconds (docs/results/issue12):
    # one state per trajectory (x_T alone) reached FID@1000 92.8 in 600 s where the paper's s = 4 reached 150.0;
    # 35 kimg keeps the main job within 20 minutes (FID@1000 90.2 at 35 kimg, 89.3 at 40: the same within noise).
    total_kimg: float = 35.0
    max_train_s: float | None = None
    # batch 32: twice the steps of 64 at the same images and seconds (a step's cost per image is the same on 2
    # cores): KID x1e3 35.9 / 36.0 against 37.4 / 37.8 at seeds 0 / 1 (docs/results/issue23)
    batch_size: int = 32
    # lr 1e-3 at batch 32 (2e-3 was chosen at batch 64): KID x1e3 34.9 / 35.0 against 35.9 / 36.0 at seeds 0 / 1,
    # -1.0 at both; 4e-3 is worse, 40.7 (docs/results/issue23, "The peak learning rate at batch 32")
    lr: float = 1e-3
    koopman_lr_mult: float = 10.0  # alpha/beta move lr * mult per step: short runs still shape the spectrum
    lr_rampup_kimg: float = 1.0
    lr_schedule: str = "cosine"  # constant | cosine: after the ramp-up, cosine decay to lr * lr_end_frac at
    # the end of the run (total_kimg, or max_train_s when that comes first);
    # cosine: KID x1e3 42.8 against 45.1 at 35 kimg (docs/results/issue23)
    lr_end_frac: float = 0.01  # cosine: the last step's lr as a fraction of the peak
    teacher_lr_mult: float = 1.0  # lr multiplier for the tensors model.init copied from the teacher (a
    # lower peak for what already works); new tensors keep 1, Koopman's its own
    grad_clip: float = 1.0
    ema_halflife_kimg: float = 1.0
    ema_rampup: float = 0.05
    states_per_traj: int = 1  # states of each trajectory in the loss: 1 = x_T alone (no trajectory
    # consistency); the paper's 4 costs 4x the compute per image
    xT_weight: float | None = None  # x_T's share of the loss; None: the paper's plain sum (1/states_per_traj)
    tcons_sigma_min: float = 0.0  # consistency states are drawn among those with sigma >= this (0: all)
    latent_weight: float | None = (
        None  # > 0: + this x |evolve(E(x_T), tau_s - tau_T) - E(x_s)|^2 / |E(x_s)|^2 for a
    )
    # later state x_s of each trajectory (issue 13; hkd_core/losses.py).
    # None: LATENT_WEIGHT for models with Koopman latents (hkd, one_level), 0
    # for the others (docs/results/issue13: identifiable, reproducible spectra
    # at the same FID, 1.25x the step)
    gauge_weight: float = 0.0  # > 0: + this x the gauge condition (hkd_core/gauge.py): at a fixed state, each
    # mode's mean log-energy and phase slopes against the encoder's noise level
    # driven to 0, which fixes the spectrum's per-mode offset (issue 24)
    lambda1_start: float = 1.0
    lambda1_end: float = 0.0
    lambda1_anneal_kimg: float = 4.0
    lambda2: float = 1.0
    perceptual: str = "pseudo_huber"  # pseudo_huber | l1 | mse | teacher | lpips (l1: per pixel, robust;
    # lpips needs the two weight files below; teacher: the frozen teacher U-Net's down-path features, LPIPS's
    # recipe, needs a U-Net teacher: losses.TeacherFeatureDistance)
    perceptual_sigma: float = 0.5  # teacher: the noise level the teacher's features are taken at
    lpips_vgg_path: str | None = None  # lpips: torchvision's vgg16 state dict, a local file on every node
    lpips_lin_path: str | None = None  # lpips: the five LPIPS linear heads (lin{0..4}.model.1.weight)
    adversarial_weight: float = 0.0  # beyond the paper: + this x the hinge term -D(x_0) of a small
    # discriminator trained on real training images (hkd_core/adversarial.py);
    # 0: off. About 0.01 (issue 23), measured in a long run only
    adversarial_lr: float = 2e-4  # the discriminator's Adam lr (betas 0, 0.99)
    adversarial_start_kimg: float = 0.0  # the term (and the discriminator's training) starts here
    adversarial_disc: str = field(default="small", metadata=IDENTITY_WHEN_SET)  # small: the discriminator of
    # its own; teacher: heads on the frozen teacher U-Net's down-path features, the images noised to
    # adversarial_sigma (adversarial.TeacherFeatureDiscriminator; needs a U-Net teacher)
    # teacher: the noise level of that discriminator's input (low: the fine detail a blurry student lacks survives)
    adversarial_sigma: float = field(default=0.25, metadata=IDENTITY_WHEN_SET)
    log_every_kimg: float = 1.0
    holdout_every_kimg: float = 1.0  # the EMA model's error on the held-out trajectories (train/holdout_mse),
    # a curve beside the training loss; 0: never (also when there are none)
    checkpoint_every_kimg: float = 5.0
    seed: int = 0
    skip_corrupt_shards: bool = False  # leave out trajectory shards that fail the checks (counted in the
    # metric data/skipped_shards) instead of refusing to train
    # a step whose loss or gradient is NaN/inf: skipped and counted (train/skipped_nonfinite) instead of ending the
    # run with its step named. Part of a stage's identity only when set (IDENTITY_WHEN_SET: a key added later
    # leaves every existing stage's hash, and so its cached output, as it was)
    skip_nonfinite: bool = field(default=False, metadata=IDENTITY_WHEN_SET)


@dataclass
class EvalConfig:
    n: int = 1000  # samples for FID/KID (state it with every number; >= 1000 to compare)
    split: str = "test"  # reference split
    teacher_nfe: list[int] = field(default_factory=lambda: [4, 35])  # also score the teacher at these NFE (a
    # shipped teacher's record supplies them when it holds the same N)
    curve_n: int = 0  # > 0: FID/KID with this N at every distill checkpoint (curve/* in MLflow)
    floor: bool = True  # the noise floor at this N (N real training images against the reference),
    # from the teacher's record or measured once and cached in storage
    kid_subset_size: int = 1000
    batch_size: int = 100
    inception_weights: str | None = None
    seed: int = 123


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        resolve_auto(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hkd_config(self) -> HKDConfig:
        return self.model.hkd_config(
            DATASETS[self.data.name].channels, self.data.resolution, self.teacher.sigma_data
        )


AUTO = "auto"
EMPIRICAL_LIMIT = 5000  # data.limit=auto with the empirical teacher: a seeded subset of this many images


def resolve_auto(cfg: RunConfig) -> None:
    """The two keys whose natural value is the teacher's, not their own section's: ``data.limit`` and
    ``model.init`` at ``auto`` take the value that suits ``teacher.kind``. Resolved where a RunConfig is made,
    before anything hashes, logs or runs it, so a stage's identity holds the value, never "auto"."""
    edm = cfg.teacher.kind == "edm"
    if cfg.data.limit == AUTO:
        cfg.data = dataclasses.replace(cfg.data, limit=None if edm else EMPIRICAL_LIMIT)
    if cfg.model.init == AUTO:
        cfg.model = dataclasses.replace(cfg.model, init="teacher" if edm else "none")


def _identity(obj):
    """A dataclass as the dict its hash is taken of: every field, except those marked IDENTITY_WHEN_SET while they
    hold their default."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.metadata.get("identity") == "when_set" and v == f.default:
            continue
        out[f.name] = _identity(v) if dataclasses.is_dataclass(v) else v
    return out


def config_hash(*parts) -> str:
    """A short content hash of dataclasses / dicts / strings, for content-addressed stage outputs."""
    blob = json.dumps(
        [_identity(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=dataclasses.asdict,
    )  # a dataclass inside a list: as asdict writes it
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


LATENT_WEIGHT = 0.1  # the latent-consistency term's default weight (docs/results/issue13, "Spectra")


def default_latent_weight(variant: str) -> float:
    """train.latent_weight when it is not given: on for models whose Koopman evolution acts on per-level
    latents (hkd, one_level), off for the others (kd and kdm have none; no_koopman has no evolution to tie)."""
    return LATENT_WEIGHT if variant in ("hkd", "one_level") else 0.0


def _content(path: str) -> str:
    """sha256 of a local file (its content as part of an identity); '' if it is not there (validation says so)."""
    from .data import file_digest

    p = Path(path).expanduser()
    return file_digest(p) if p.is_file() else ""


def stage_hashes(cfg: RunConfig) -> dict[str, str]:
    """Each stage's identity: its own config plus the identity of what it consumes."""
    teacher = config_hash(cfg.data, cfg.teacher)
    if cfg.teacher.checkpoint and "://" not in cfg.teacher.checkpoint:
        # a local checkpoint's content is part of the identity: new weights at the same path are a new teacher
        teacher = config_hash(teacher, _content(cfg.teacher.checkpoint))
    traj = config_hash(teacher, cfg.trajectories)
    distill = config_hash(traj, cfg.model, cfg.train)
    evaluate = config_hash(distill, cfg.eval)
    return {"teacher": teacher, "trajectories": traj, "distill": distill, "evaluate": evaluate}

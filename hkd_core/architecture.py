"""A model's architecture as data: ``HKDConfig`` (every field documented where it is declared) and the named
architectures (``PRESETS``: tiny for tests, small for CPU runs, cifar for GPUs). Plain dataclasses, no torch
modules: the pipeline's config (hkd_core/config.py ModelConfig) takes its model.* keys from these fields, and
hkd_core/models.py builds networks from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .edm import SIGMA_DATA
from .koopman import OPERATORS

DECODERS = ("light", "unet")
OBSERVABLES = ("sigma", "state")


@dataclass
class HKDConfig:
    img_channels: int = 1
    resolution: int = 32
    levels: int = 3  # L: number of spatial scales (resolution / 2^(l-1))
    subspace_dims: list[int] = field(default_factory=lambda: [16, 16, 16])  # d_l per level, each even
    channels: int = 32  # trunk width at full resolution
    channel_mult: list[int] = field(
        default_factory=lambda: [1, 2, 2]
    )  # width per level; last repeats if L > len
    blocks: int = 1  # residual blocks per level, encoder and decoder
    attn_levels: list[int] = field(default_factory=list)  # 1-based levels with self-attention
    operator: str | list[str] = "position"  # 'position' | 'shared' | 'none' (A = 0), or one per level
    latent_levels: list[int] = field(default_factory=list)  # 1-based levels carrying a latent; [] = all
    dropout: float = 0.0
    kdm_dim: int = 64  # KDM only: size of the flat global latent
    alpha_bound: float = 0.0  # > 0: decay rates alpha = B tanh(rho / B); 0: unbounded
    decoder: str = "light"  # 'light': stages fed by the latents, no conditioning;
    # 'unet': the teacher's up path (see Decoder)
    sigma_data: float = SIGMA_DATA  # the data's std: the encoder's input scaling c_in (EDM)
    grow_blocks: int = 0  # extra residual blocks after each decoder stage, each the
    # identity at initialisation (layers.GrownBlock): capacity
    # added to a student that still starts as its teacher
    observables: str = "sigma"  # 'sigma': the Koopman latents E(x, sigma) see the noise level;
    # 'state': E(x) sees the state alone (scaled by its own RMS,
    # a fixed noise embedding), which fixes the spectrum's gauge
    # (hkd_core/gauge.py, issue 24)

    def widths(self) -> list[int]:
        m = self.channel_mult
        return [self.channels * m[min(l, len(m) - 1)] for l in range(self.levels)]

    def sizes(self) -> list[int]:
        return [self.resolution // 2**l for l in range(self.levels)]

    def validate(self) -> HKDConfig:
        """Raise ValueError naming the field at fault."""
        if self.levels < 1:
            raise ValueError(f"model.levels must be >= 1, got {self.levels}")
        if not self.sigma_data > 0:
            raise ValueError(f"model.sigma_data must be > 0 (the data's std), got {self.sigma_data}")
        if not self.alpha_bound >= 0:
            raise ValueError(
                f"model.alpha_bound is {self.alpha_bound}; it must be > 0 (the largest |alpha|) or 0 "
                f"(unbounded)"
            )
        if len(self.subspace_dims) != self.levels:
            raise ValueError(
                f"model.subspace_dims has {len(self.subspace_dims)} entries {list(self.subspace_dims)}"
                f" but model.levels is {self.levels}; give one d_l per level"
            )
        for l, d in enumerate(self.subspace_dims, 1):
            if d < 2 or d % 2:
                raise ValueError(
                    f"model.subspace_dims[{l - 1}] (level {l}) is {d}; each d_l must be even "
                    f"and >= 2 (it holds d_l/2 complex-conjugate eigenvalue pairs)"
                )
        if self.resolution % 2 ** (self.levels - 1):
            max_l = next(l for l in range(self.levels, 0, -1) if self.resolution % 2 ** (l - 1) == 0)
            raise ValueError(
                f"model.levels={self.levels} needs resolution divisible by 2^{self.levels - 1}; "
                f"resolution {self.resolution} allows at most {max_l} levels"
            )
        ops = self.operator if isinstance(self.operator, list) else [self.operator]
        if isinstance(self.operator, list) and len(self.operator) != self.levels:
            raise ValueError(
                f"model.operator has {len(self.operator)} entries {self.operator} but model.levels is "
                f"{self.levels}; give one operator per level, or a single one for all"
            )
        bad_ops = [o for o in ops if o not in OPERATORS]
        if bad_ops:
            raise ValueError(
                f"model.operator is {self.operator!r}; allowed: {list(OPERATORS)} (or one per level)"
            )
        if self.grow_blocks < 0:
            raise ValueError(
                f"model.grow_blocks must be >= 0 (extra decoder blocks per level), got {self.grow_blocks}"
            )
        if self.observables not in OBSERVABLES:
            raise ValueError(f"model.observables is {self.observables!r}; allowed: {list(OBSERVABLES)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"model.decoder is {self.decoder!r}; allowed: {list(DECODERS)}")
        for key in ("attn_levels", "latent_levels"):
            bad = [a for a in getattr(self, key) if not 1 <= a <= self.levels]
            if bad:
                raise ValueError(f"model.{key} {bad} are outside 1..{self.levels}")
        return self

    def operators(self) -> list[str]:
        """The operator mode of each level."""
        return list(self.operator) if isinstance(self.operator, list) else [self.operator] * self.levels

    def latent_dims(self) -> list[int]:
        """d_l per level, 0 where the level carries no latent."""
        keep = set(self.latent_levels or range(1, self.levels + 1))
        return [d if l in keep else 0 for l, d in enumerate(self.subspace_dims, 1)]

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, HKDConfig] = {
    # Unit tests: a few thousand parameters per level, 32x32 gray.
    "tiny": HKDConfig(levels=2, subspace_dims=[4, 4], channels=8, channel_mult=[1, 2], blocks=1, kdm_dim=16),
    # CPU experiments on (Fashion-)MNIST padded to 32x32; one grown decoder block per level (the teacher's function
    # at init, 1.23x the step; KID x1e3 39.8 against 45.1 at 35 kimg: docs/results/issue23).
    "small": HKDConfig(
        levels=3,
        subspace_dims=[32, 64, 64],
        channels=32,
        channel_mult=[1, 2, 2],
        blocks=1,
        kdm_dim=64,
        decoder="unet",
        grow_blocks=1,
    ),
    # CIFAR-10 scale (GPU): three levels 32/16/8, attention at 8x8.
    "cifar": HKDConfig(
        img_channels=3,
        levels=3,
        subspace_dims=[16, 32, 64],
        channels=128,
        channel_mult=[1, 2, 2],
        blocks=2,
        attn_levels=[3],
        kdm_dim=256,
        decoder="unet",
    ),
}


def preset(name: str, **overrides) -> HKDConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides).validate()

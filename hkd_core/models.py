"""The HKD model (DESIGN 1.2), its one-step baselines (KD, KDM-style) and a registry of named presets.

Every model maps a trajectory state to a clean image with ``forward(x_t, sigma_t)`` and samples in one
network evaluation with ``sample(n)``. ``build_model(variant, preset, **overrides)`` makes the ablations
switches on the same code:

- ``hkd``: full model; ``no_koopman``: generators fixed at A = 0; ``one_level``: L = 1 (non-hierarchical);
- ``kd``: a U-Net regressing x_0 from x_T directly; ``kdm``: one global linear operator on a flat latent.
(No trajectory consistency, s = 1, is a loss switch: see ``losses.HKDLoss``.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import HKDConfig, preset
from .edm import SIGMA_MAX, SIGMA_MIN, EDMPrecond, UNet, UNetConfig, as_sigma
from .koopman import KoopmanOperator, tau_of_sigma
from .layers import (
    GrownBlock,
    NoiseEmbedding,
    ResBlock,
    SelfAttention,
    Stage,
    downsample,
    group_norm,
    upsample,
)


class Encoder(nn.Module):
    """Noise-conditioned downsampling trunk; returns the features at every level, finest first."""

    def __init__(self, cfg: HKDConfig):
        super().__init__()
        emb = cfg.channels * 4
        self.sigma_data = cfg.sigma_data
        self.embed = NoiseEmbedding(cfg.channels, emb)
        self.conv_in = nn.Conv2d(cfg.img_channels, cfg.channels, 3, padding=1)
        cin, self.stages = cfg.channels, nn.ModuleList()
        for l, w in enumerate(cfg.widths(), 1):
            self.stages.append(Stage(cin, w, cfg.blocks, emb, l in cfg.attn_levels, cfg.dropout))
            cin = w

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None) -> list[torch.Tensor]:
        """Features of x at noise level sigma; sigma None: of the state alone, which the encoder then scales by
        its own RMS (EDM's c_in with the state's energy for sigma^2 + sigma_data^2) under the noise embedding of
        sigma_max (where the two agree for x_T: a teacher-initialised student still starts as its teacher)."""
        if sigma is None:
            emb = self.embed(torch.full((x.shape[0],), math.log(SIGMA_MAX) / 4, device=x.device))
            h = self.conv_in(x * x.square().flatten(1).mean(1).clamp_min(1e-8).rsqrt().view(-1, 1, 1, 1))
        else:
            s = as_sigma(sigma, x)
            emb = self.embed(s.flatten().log() / 4)
            h = self.conv_in(x / (s**2 + self.sigma_data**2).sqrt())  # EDM's c_in: unit-variance input
        feats = []
        for i, stage in enumerate(self.stages):
            h = stage(downsample(h) if i else h, emb)
            feats.append(h)
        return feats


class Decoder(nn.Module):
    """Upsampling trunk fusing the per-level latents coarse to fine (they take the place of skip features).
    ``in_dims[l]`` is the number of latent channels fed at level l (0: none); ``coarse_channels`` is the
    width of an extra input below the coarsest level (KDM's decoded global latent).

    ``cfg.decoder = 'unet'`` makes it the teacher's up path at sigma_max, block for block: a bottleneck
    (residual block, attention, residual block) on the coarsest lifted latent, whose output joins that latent
    at the coarsest stage as the teacher's bottleneck joins its last skip; every block modulated by one learned
    embedding vector (the teacher's noise embedding at sigma_max, under ``model.init=teacher``); and EDM's
    output scale c_out(sigma_max). With latents as wide as their level, identity links and the Koopman
    evolution at the identity, the student then computes the teacher's denoiser at sigma_max (less c_skip x_T,
    0.007 % of it).
    """

    def __init__(self, cfg: HKDConfig, in_dims: list[int], coarse_channels: int = 0):
        super().__init__()
        widths = cfg.widths()
        self.unet = cfg.decoder == "unet" and in_dims[-1] > 0 and not coarse_channels
        emb = cfg.channels * 4 if self.unet else None
        self.lift = nn.ModuleList(nn.Conv2d(d, w, 1) if d else nn.Identity() for d, w in zip(in_dims, widths))
        self.in_dims = in_dims
        if self.unet:
            w = widths[-1]
            self.emb = nn.Parameter(torch.zeros(emb))
            self.mid0 = ResBlock(w, w, emb, cfg.dropout)
            self.mid_attn = SelfAttention(w)
            self.mid1 = ResBlock(w, w, emb, cfg.dropout)
            coarse_channels = w
            sd = cfg.sigma_data
            self.out_scale = SIGMA_MAX * sd / math.sqrt(SIGMA_MAX**2 + sd**2)  # EDM's c_out(sigma_max)
        else:
            self.out_scale = 1.0
        self.stages = nn.ModuleList()
        for l in range(cfg.levels):
            below = widths[l + 1] if l + 1 < cfg.levels else coarse_channels
            cin = below + (widths[l] if in_dims[l] else 0)
            self.stages.append(
                Stage(cin, widths[l], cfg.blocks, emb, (l + 1) in cfg.attn_levels, cfg.dropout)
            )
        # model.grow_blocks: identity-initialised blocks after each stage (none: no 'grown' tensors at all, so
        # that the records of models without them load as before)
        self.grown = (
            nn.ModuleList(
                nn.ModuleList(GrownBlock(w, emb, cfg.dropout) for _ in range(cfg.grow_blocks)) for w in widths
            )
            if cfg.grow_blocks
            else None
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.img_channels, 3, padding=1)

    def forward(self, zs: list[torch.Tensor | None], coarse: torch.Tensor | None = None) -> torch.Tensor:
        h, emb = coarse, None
        if self.unet:
            top = self.lift[-1](zs[-1])
            emb = self.emb[None].expand(top.shape[0], -1)
            h = self.mid1(self.mid_attn(self.mid0(top, emb)), emb)
        for l in reversed(range(len(self.stages))):
            parts = [] if h is None else [upsample(h) if l + 1 < len(self.stages) else h]
            if self.in_dims[l]:
                parts.append(self.lift[l](zs[l]))
            h = self.stages[l](torch.cat(parts, 1), emb)
            for block in self.grown[l] if self.grown is not None else ():
                h = block(h, emb)
        return self.out_scale * self.conv_out(F.silu(self.norm_out(h)))


class OneStepModel(nn.Module):
    """What every one-step generator shares: sampling from fresh noise in one network evaluation."""

    sigma_min, sigma_max = SIGMA_MIN, SIGMA_MAX

    def noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        c, r = self.cfg.img_channels, self.cfg.resolution
        return torch.randn(n, c, r, r, generator=generator, device=device) * self.sigma_max

    def sample(
        self, n: int | None = None, generator: torch.Generator | None = None, x_T: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_hat = model(x_T, sigma_max): NFE = 1. Pass x_T (already scaled by sigma_max) or n."""
        if x_T is None:
            x_T = self.noise(n, generator, next(self.parameters()).device)
        return self(x_T, self.sigma_max)

    def spectrum(self) -> list[torch.Tensor]:
        """Eigenvalues per level (complex); empty for models without a Koopman operator."""
        return []


class HKD(OneStepModel):
    """x_hat(x_t) = Decoder(evolve(Encoder(x_t, sigma_t), tau_t -> 1))."""

    def __init__(self, cfg: HKDConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = Encoder(cfg)
        self.levels = [l for l, d in enumerate(cfg.latent_dims()) if d]  # 0-based levels with a latent
        dims, widths, sizes = cfg.latent_dims(), cfg.widths(), cfg.sizes()
        self.proj = nn.ModuleList(nn.Conv2d(widths[l], dims[l], 1) for l in self.levels)
        ops = cfg.operators()
        self.koopman = nn.ModuleList(
            KoopmanOperator(dims[l], sizes[l], sizes[l], ops[l], cfg.alpha_bound) for l in self.levels
        )
        self.decoder = Decoder(cfg, dims)

    def encode(self, x: torch.Tensor, sigma: torch.Tensor | float) -> list[torch.Tensor]:
        """One latent per latent-carrying level, finest first (with ``observables='state'`` sigma is not used)."""
        feats = self.encoder(x, None if self.cfg.observables == "state" else sigma)
        return [p(feats[l]) for p, l in zip(self.proj, self.levels)]

    def evolve(self, zs: list[torch.Tensor], dtau: torch.Tensor | float) -> list[torch.Tensor]:
        return [k(z, dtau) for k, z in zip(self.koopman, zs)]

    def decode(self, zs: list[torch.Tensor]) -> torch.Tensor:
        full: list[torch.Tensor | None] = [None] * self.cfg.levels
        for l, z in zip(self.levels, zs):
            full[l] = z
        return self.decoder(full)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        latent_tau: torch.Tensor | None = None,
        decode: torch.Tensor | None = None,
    ):
        """x_hat = D(evolve(E(x, sigma), tau(sigma) -> 1)). With ``latent_tau`` (B,) also the latents evolved from
        tau(sigma) to latent_tau, (x_hat, latents): what the latent-consistency term compares (losses.py); one
        call, so that a DDP-wrapped model sees one forward per step. ``decode`` (indices into the batch) decodes
        only those rows (x_hat then has len(decode) rows): a state that only the latent term needs is encoded,
        never decoded, which saves the decoder's share of its cost."""
        s = as_sigma(sigma, x).flatten()
        tau = tau_of_sigma(s).to(x.device)
        zs = self.encode(x, s)
        if decode is None:
            out = self.decode(self.evolve(zs, 1 - tau))
        else:
            out = self.decode(self.evolve([z[decode] for z in zs], 1 - tau[decode]))
        if latent_tau is None:
            return out
        return out, self.evolve(zs, latent_tau.to(x.device, torch.float32).flatten() - tau)

    def trajectory(self, x_T: torch.Tensor, taus: torch.Tensor | list[float]) -> dict:
        """Latents z_tau = evolve(E(x_T), 0 -> tau) and their decodings D(z_tau), for each tau.

        D(z_tau) is the preview: by the group property evolve(z_tau, tau -> 1) is the same for every tau
        (it is the final latent), so what changes along the trajectory is the latent itself, decoded.
        """
        z0 = self.encode(x_T, self.sigma_max)
        latents, previews = [], []
        for t in torch.as_tensor(taus, dtype=torch.float32).tolist():
            zt = self.evolve(z0, t)
            latents.append(zt)
            previews.append(self.decode(zt))
        return {
            "taus": torch.as_tensor(taus, dtype=torch.float32),
            "latents": latents,
            "previews": torch.stack(previews),
        }

    def spectrum(self) -> list[torch.Tensor]:
        return [k.eigenvalues() for k in self.koopman]


class KD(OneStepModel):
    """Knowledge distillation (Luhman & Luhman 2021): an EDM-preconditioned U-Net mapping x_t to x_0."""

    def __init__(self, cfg: HKDConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.net = EDMPrecond(
            UNet(
                UNetConfig(
                    img_channels=cfg.img_channels,
                    resolution=cfg.resolution,
                    channels=cfg.channels,
                    channel_mult=tuple(cfg.widths()[l] // cfg.channels for l in range(cfg.levels)),
                    blocks=cfg.blocks,
                    attn_resolutions=tuple(cfg.sizes()[l - 1] for l in cfg.attn_levels),
                    dropout=cfg.dropout,
                )
            ),
            sigma_data=cfg.sigma_data,
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return self.net(x, sigma)


class KDM(OneStepModel):
    """KDM-style (Berman et al. 2025): one global linear operator K on a flattened latent, exp(K dtau) z."""

    def __init__(self, cfg: HKDConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = Encoder(cfg)
        w, s = cfg.widths()[-1], cfg.sizes()[-1]
        self.flat = (w, s, s)
        self.to_latent = nn.Linear(w * s * s, cfg.kdm_dim)
        self.generator = nn.Parameter(torch.zeros(cfg.kdm_dim, cfg.kdm_dim))
        self.from_latent = nn.Linear(cfg.kdm_dim, w * s * s)
        self.decoder = Decoder(cfg, [0] * cfg.levels, coarse_channels=w)

    def latent(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The state's (B, kdm_dim) latent at its own noise level, before any evolution."""
        return self.to_latent(self.encoder(x, as_sigma(sigma, x).flatten())[-1].flatten(1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = as_sigma(sigma, x).flatten()
        z = self.latent(x, s)
        dtau = (1 - tau_of_sigma(s).to(x.device))[:, None, None]
        z = (torch.matrix_exp(self.generator[None] * dtau) @ z[:, :, None])[:, :, 0]
        return self.decoder([None] * self.cfg.levels, self.from_latent(z).reshape(-1, *self.flat))

    def spectrum(self) -> list[torch.Tensor]:
        return [torch.linalg.eigvals(self.generator.detach().double()).to(torch.complex64)]


def _one_level(cfg: HKDConfig) -> HKD:
    """Non-hierarchical: the same trunk, but a single latent at the coarsest level, holding as many modes per
    position as all levels together had; the decoder gets no finer latents."""
    dims = list(cfg.subspace_dims[:-1]) + [sum(cfg.latent_dims())]
    return HKD(replace(cfg, subspace_dims=dims, latent_levels=[cfg.levels]))


# model.variant -> how its model is built from the preset's HKDConfig
VARIANTS: dict[str, Callable[[HKDConfig], OneStepModel]] = {
    "hkd": HKD,
    "no_koopman": lambda cfg: HKD(replace(cfg, operator="none")),  # A = 0: no Koopman evolution
    "one_level": _one_level,
    "kd": KD,
    "kdm": KDM,
}


def build_model(variant: str = "hkd", cfg: HKDConfig | str = "small", **overrides) -> OneStepModel:
    """A model for one of VARIANTS from a config or preset name, with field overrides."""
    if isinstance(cfg, str):
        cfg = preset(cfg, **overrides)
    elif overrides:
        cfg = replace(cfg, **overrides)
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {list(VARIANTS)}")
    model = VARIANTS[variant](cfg)
    model.variant = variant
    return model


def model_record(model: OneStepModel, state_dict: dict | None = None) -> dict:
    """Everything needed to rebuild a trained model: class, final config, variant, weights."""
    return {
        "class": type(model).__name__,
        "variant": getattr(model, "variant", None),
        "config": model.cfg.to_dict(),
        "state_dict": state_dict if state_dict is not None else model.state_dict(),
    }


def model_from_record(record: dict) -> OneStepModel:
    classes = {"HKD": HKD, "KD": KD, "KDM": KDM}
    if record.get("class") not in classes:
        raise ValueError(f"model record has class {record.get('class')!r}; expected one of {sorted(classes)}")
    model = classes[record["class"]](HKDConfig(**record["config"]))
    model.variant = record.get("variant")
    model.load_state_dict(record["state_dict"])
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

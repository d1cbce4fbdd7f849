"""EDM teacher pieces (Karras et al. 2022): a compact DDPM++-style U-Net, the preconditioning wrapper, the loss.

The network knows nothing of noise parameterisation; ``EDMPrecond`` owns c_skip/c_out/c_in/c_noise
(EDM Table 1), and ``EDMLoss`` samples ln(sigma) ~ N(P_mean, P_std^2) with weight
(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .layers import NoiseEmbedding, ResBlock, SelfAttention, Stage, downsample, group_norm, upsample

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5


@dataclass
class UNetConfig:
    img_channels: int = 1
    resolution: int = 32
    channels: int = 32  # width at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution (32, 16, 8)
    blocks: int = 2  # residual blocks per resolution
    attn_resolutions: tuple[int, ...] = (8,)  # resolutions with self-attention
    dropout: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class UNet(nn.Module):
    """A compact DDPM++-style U-Net F(x, c_noise): one skip per resolution, attention where configured."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.resolution % 2 ** (len(cfg.channel_mult) - 1):
            raise ValueError(
                f"resolution {cfg.resolution} is not divisible by 2^{len(cfg.channel_mult) - 1} "
                f"(channel_mult has {len(cfg.channel_mult)} entries)"
            )
        emb = cfg.channels * 4
        self.embed = NoiseEmbedding(cfg.channels, emb)
        widths = [cfg.channels * m for m in cfg.channel_mult]
        res = [cfg.resolution // 2**i for i in range(len(widths))]
        self.conv_in = nn.Conv2d(cfg.img_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.channels
        for w, r in zip(widths, res):
            self.down.append(Stage(cin, w, cfg.blocks, emb, r in cfg.attn_resolutions, cfg.dropout))
            cin = w
        self.mid0 = ResBlock(cin, cin, emb, cfg.dropout)
        self.mid_attn = SelfAttention(cin)
        self.mid1 = ResBlock(cin, cin, emb, cfg.dropout)
        self.up = nn.ModuleList()
        for w, r in zip(reversed(widths), reversed(res)):
            self.up.append(Stage(cin + w, w, cfg.blocks, emb, r in cfg.attn_resolutions, cfg.dropout))
            cin = w
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.img_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        h = self.conv_in(x)
        skips = []
        for i, stage in enumerate(self.down):
            h = stage(h, emb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = downsample(h)
        h = self.mid1(self.mid_attn(self.mid0(h, emb)), emb)
        for i, stage in enumerate(self.up):
            h = stage(torch.cat([h, skips.pop()], 1), emb)
            if i < len(self.up) - 1:
                h = upsample(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcastable (B, 1, ..., 1) float32 sigma for a batch x."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)  (EDM eq. 7, Table 1)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = as_sigma(sigma, x)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        c_noise = s.flatten().log() / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


@dataclass
class EDMLoss:
    """Denoising score matching with EDM's log-normal sigma and loss weighting; returns per-sample losses."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = SIGMA_DATA
    extra: dict = field(default_factory=dict)

    def __call__(
        self, denoiser: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        b = x0.shape[0]
        rnd = torch.randn(b, generator=generator, device=x0.device)
        sigma = (rnd * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        d = denoiser(x0 + s * noise, sigma)
        return weight * (d - x0).square().flatten(1).mean(1)

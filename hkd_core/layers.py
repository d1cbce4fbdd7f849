"""Building blocks shared by the teacher U-Net and the HKD encoder/decoder (DDPM++ style, Song et al. 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in DDPM++, fewer for the narrow CPU presets so every group has >= 4 channels.
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar (EDM's c_noise), as in the transformer and DDPM++."""

    def __init__(self, dim: int, max_positions: int = 10000):
        super().__init__()
        self.dim, self.max_positions = dim, max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.arange(half, device=x.device, dtype=torch.float32) / half
        freqs = (1 / self.max_positions) ** freqs
        ang = x.float()[:, None] * freqs[None]
        return torch.cat([ang.cos(), ang.sin()], dim=1)


class NoiseEmbedding(nn.Module):
    """c_noise -> conditioning vector for the residual blocks."""

    def __init__(self, base: int, dim: int):
        super().__init__()
        self.pos = PositionalEmbedding(base)
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pos(c_noise))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional adaptive scale/shift from the noise embedding."""

    residual_scale = 1 / math.sqrt(2)

    def __init__(self, cin: int, cout: int, emb_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = self.norm1(h)
        if self.affine is not None and emb is not None:
            scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv1(self.dropout(F.silu(h)))
        return (h + self.skip(x)) * self.residual_scale


class SelfAttention(nn.Module):
    """Multi-head self-attention over spatial positions, residual."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2)


class Stage(nn.Module):
    """``blocks`` residual blocks (each followed by attention if asked) at one resolution."""

    def __init__(
        self, cin: int, cout: int, blocks: int, emb_dim: int | None, attention: bool, dropout: float = 0.0
    ):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(cin if i == 0 else cout, cout, emb_dim, dropout) for i in range(blocks)
        )
        self.attn = nn.ModuleList(SelfAttention(cout) if attention else nn.Identity() for _ in range(blocks))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        for res, attn in zip(self.res, self.attn):
            x = attn(res(x, emb))
        return x


def downsample(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class GrownBlock(ResBlock):
    """A residual block that starts as the identity: x + conv1(...(x)), the ResBlock without its 1/sqrt(2) on the
    sum (its conv1 is zero-initialised). Added to a student grown from its teacher (``model.grow_blocks``), it
    leaves the teacher's function untouched at initialisation and still receives a gradient from the first step
    (the zeroed convolution's input is not zero)."""

    residual_scale = 1.0

    def __init__(self, channels: int, emb_dim: int | None = None, dropout: float = 0.0):
        super().__init__(channels, channels, emb_dim, dropout)

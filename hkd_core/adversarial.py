"""An adversarial term for the one-step student: beyond the paper (issue 23).

HKD's loss compares the student's x_0 with the teacher's x_0 for the same noise, so the student inherits the
teacher's errors and, with a finite capacity, blurs where it cannot follow. A small discriminator that sees
real training images and the student's samples adds a term that rewards samples the discriminator cannot
tell from real ones, as in adversarial distillation (ADD, DMD2). The term is optional
(``train.adversarial_weight``, 0 by default) and every table labels a row that uses it "beyond the paper".

- ``Discriminator``: a few strided convolutions with spectral normalisation (Miyato et al. 2018), a linear
  head; about 0.1 M parameters at 32 x 32.
- ``TeacherFeatureDiscriminator`` (``train.adversarial_disc=teacher``): the frozen teacher U-Net's down path as
  the feature network, both images noised to ``sigma`` (as in LADD, Sauer et al. 2024), and a small trained head
  per level. It starts with features that already tell images apart, where the small discriminator learns slowly
  (its hinge loss only fell from 1.96 to 1.69 over the 240-kimg long run, 2 being chance).
- ``AdversarialTerm``: the discriminator, its own Adam (betas 0, 0.99) and the hinge losses. Each training
  step first updates the discriminator on this rank's real batch and the student's detached samples
  (gradients and spectral-norm vectors averaged over data-parallel ranks, so every rank holds the same
  discriminator), then returns the generator's hinge term -D(x) for the student's loss. Its state goes into
  the training checkpoint, so a resumed run continues with the same discriminator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class Discriminator(nn.Module):
    """Images (B, C, R, R) in [-1, 1] -> (B,) logits: per stage a 3x3 convolution and a strided 4x4 one, each
    spectrally normalised, LeakyReLU 0.2; widths ``width * 2^i``; then a linear head."""

    def __init__(self, channels: int, resolution: int, width: int = 32, stages: int = 3):
        super().__init__()
        if resolution % 2**stages:
            raise ValueError(
                f"the discriminator halves the resolution {stages} times; {resolution} is not "
                f"divisible by {2**stages}"
            )
        layers: list[nn.Module] = []
        c = channels
        for i in range(stages):
            w = width * 2**i
            layers += [
                spectral_norm(nn.Conv2d(c, w, 3, 1, 1)),
                nn.LeakyReLU(0.2),
                spectral_norm(nn.Conv2d(w, w, 4, 2, 1)),
                nn.LeakyReLU(0.2),
            ]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = spectral_norm(nn.Linear(c * (resolution // 2**stages) ** 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1)).squeeze(1)


class TeacherFeatureDiscriminator(nn.Module):
    """Images (B, C, R, R) in [-1, 1] -> (B,) logits through the frozen teacher's features. Each image gets
    Gaussian noise of std ``sigma`` and goes through the teacher U-Net's down path as a state at that noise
    level (EDM's c_in and c_noise); each level's output feeds a head (a spectrally normalised 3x3 convolution,
    LeakyReLU 0.2, a 1x1 convolution to one channel) whose map is averaged over positions; the levels' logits
    are summed. Only the heads train: the teacher copy stays frozen and in eval mode.

    ``denoiser``: the teacher, an ``EDMPrecond`` around a ``UNet`` (a copy is kept)."""

    def __init__(self, denoiser: nn.Module, sigma: float = 0.25, seed: int = 0):
        super().__init__()
        import copy

        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("calls", torch.tensor(0, dtype=torch.long))
        net = getattr(denoiser, "net", None)
        if net is None or not hasattr(net, "down"):
            raise TypeError(
                "train.adversarial_disc=teacher needs the teacher as an EDMPrecond(UNet); got "
                f"{type(denoiser).__name__}"
            )
        if not sigma > 0:
            raise ValueError(f"train.adversarial_sigma must be > 0, got {sigma}")
        self.features = copy.deepcopy(net).eval().requires_grad_(False)
        self.sigma, self.sigma_data = float(sigma), float(denoiser.sigma_data)
        with torch.no_grad():  # each level's width, from one probe
            widths = [h.shape[1] for h in self._levels(torch.zeros(1, net.conv_in.in_channels, 8, 8))]
        self.heads = nn.ModuleList(
            nn.Sequential(
                spectral_norm(nn.Conv2d(w, w, 3, 1, 1)), nn.LeakyReLU(0.2), spectral_norm(nn.Conv2d(w, 1, 1))
            )
            for w in widths
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # the teacher's dropout (if any) stays off
        return self

    def _levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        from .losses import unet_levels

        return unet_levels(self.features, x, self.sigma, self.sigma_data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the noise of the n-th call comes from a generator seeded by n (a buffer, saved with the state), so a
        # resumed run draws what the uninterrupted one would have
        g = torch.Generator(device=x.device).manual_seed(int(self.seed) * 1_000_003 + int(self.calls))
        self.calls += 1
        x = x + self.sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return sum(head(h).mean((1, 2, 3)) for head, h in zip(self.heads, self._levels(x)))


def _average_over_ranks(tensors) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    w = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t)
        t.div_(w)


class AdversarialTerm:
    """The discriminator, its optimiser and the hinge losses; ``real(step)`` gives this rank's real batch."""

    def __init__(
        self,
        disc: nn.Module,
        real: Callable[[int], torch.Tensor],
        weight: float,
        lr: float = 2e-4,
        start_kimg: float = 0.0,
        device: str | torch.device = "cpu",
    ):
        if not weight > 0:
            raise ValueError(f"train.adversarial_weight must be > 0 to build the term, got {weight}")
        if not lr > 0:
            raise ValueError(f"train.adversarial_lr must be > 0, got {lr}")
        self.disc, self.real, self.weight, self.start_kimg, self.device = (
            disc.to(device),
            real,
            weight,
            start_kimg,
            device,
        )
        # only what trains: a frozen feature network stays out of the optimiser and the gradient averaging
        self.trainable = [p for p in self.disc.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.trainable, lr=lr, betas=(0.0, 0.99))

    def active(self, kimg: float) -> bool:
        return kimg >= self.start_kimg

    def discriminator_step(self, fake: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One hinge update of the discriminator: max(0, 1 - D(real)) + max(0, 1 + D(fake)), the student's
        samples detached. Returns the loss and the mean logits (detached scalars)."""
        real = self.real(step).to(self.device, torch.float32)
        self.disc.train()
        d_real, d_fake = self.disc(real), self.disc(fake.detach().float())
        loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_over_ranks([p.grad for p in self.trainable if p.grad is not None])
        self.opt.step()
        _average_over_ranks([b for b in self.disc.buffers() if b.is_floating_point()])
        return {
            "adv_d_loss": loss.detach(),
            "adv_d_real": d_real.mean().detach(),
            "adv_d_fake": d_fake.mean().detach(),
        }

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """The hinge generator term -D(fake), gradients to the student only (the discriminator frozen and in
        eval mode, so its spectral-norm vectors do not move)."""
        self.disc.eval()
        for p in self.trainable:
            p.requires_grad_(False)
        try:
            return -self.disc(fake.float()).mean()
        finally:
            self.disc.train()
            for p in self.trainable:
                p.requires_grad_(True)

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])

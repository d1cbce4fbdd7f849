"""Start a one-step student from the teacher's U-Net (``model.init``), as the paper does (DESIGN 1.4).

- ``teacher_encoder``: the HKD (or KDM-style) encoder is the teacher's down path: its noise embedding, input
  convolution and every down stage, tensor for tensor. This needs the same trunk (``model.channels``,
  ``channel_mult``, ``blocks``, attention) as the teacher, and is refused otherwise, naming the tensor.
- ``teacher``: the above, plus every decoder tensor whose counterpart in the teacher's up path has the same
  shape (the decoder's stage at level l is the teacher's up stage at the same resolution; the coarsest one
  takes the latent alone where the teacher takes the bottleneck and its skip, so its first convolution
  differs; the decoder has no noise embedding, so the teacher's scale/shift layers have no counterpart).
  For KD, whose network *is* a U-Net of the teacher's kind, it is the whole teacher.
  Where an HKD level's latent is as wide as its features (``model.subspace_dims`` equal to the trunk's widths),
  ``teacher`` also starts that level's projection and lift (1x1 convolutions) as the identity: with the
  Koopman evolution starting as the identity too, the decoder's first step sees exactly the teacher's skip
  features. A latent wider than its level (the ``one_level`` variant's coarsest latent, which holds every level's
  modes) starts with its first channels as that identity: the extra channels' projection keeps its random start
  and their lift starts at zero, so the decoder sees the teacher's features and the new channels still learn.
  A decoder stage whose level carries no latent (``one_level``'s finer levels) takes the teacher's up stage with
  the skip's input channels left out (the first convolution, its normalisation and its 1x1 skip sliced to the
  channels that come from below, which come first in both). With ``model.decoder=unet`` the decoder is the
  teacher's whole up path (bottleneck included) and
  its embedding is the teacher's at sigma_max: the student then starts as the teacher's one-step denoiser.

``init_from_teacher`` copies and returns the student's tensor names it set; nothing else is touched.
"""

from __future__ import annotations

import torch
from torch import nn

INIT_MODES = ("none", "teacher_encoder", "teacher")


class TeacherInitError(ValueError):
    """The student cannot take the teacher's tensors (different trunk); the message names the tensor."""


def _mapping(model: nn.Module, mode: str) -> tuple[dict[str, str], dict[str, str]]:
    """(required, optional): student tensor name -> teacher tensor name (EDMPrecond state-dict keys)."""
    names = list(model.state_dict())
    kind = type(model).__name__
    if kind == "KD":
        # KD.net is an EDMPrecond like the teacher: KD's "net.net.X" is the teacher's "net.X"
        return ({n: n[len("net.") :] for n in names}, {}) if mode == "teacher" else ({}, {})
    required, optional = {}, {}
    levels = model.cfg.levels
    for n in names:
        if n.startswith("encoder.embed.") or n.startswith("encoder.conv_in."):
            required[n] = "net." + n[len("encoder.") :]
        elif n.startswith("encoder.stages."):
            required[n] = "net.down." + n[len("encoder.stages.") :]
        elif mode == "teacher" and n.startswith("decoder.stages."):
            level, rest = n[len("decoder.stages.") :].split(".", 1)
            optional[n] = f"net.up.{levels - 1 - int(level)}.{rest}"
        elif mode == "teacher" and (n.startswith("decoder.norm_out.") or n.startswith("decoder.conv_out.")):
            optional[n] = "net." + n[len("decoder.") :]
        elif mode == "teacher" and n.startswith(("decoder.mid0.", "decoder.mid_attn.", "decoder.mid1.")):
            required[n] = "net." + n[len("decoder.") :]  # the 'unet' decoder's bottleneck is the teacher's
    return required, optional


def init_from_teacher(
    model: nn.Module,
    teacher_state: dict[str, torch.Tensor],
    mode: str = "teacher",
    source: str = "the teacher",
) -> list[str]:
    """Copy the teacher's tensors into ``model`` (HKD, KDM or KD) for ``mode`` (see the module docstring);
    returns the names of the student tensors that were set, in state-dict order."""
    if mode not in INIT_MODES:
        raise TeacherInitError(f"model.init={mode!r} is not allowed; choose one of {list(INIT_MODES)}")
    if mode == "none":
        return []
    kind = type(model).__name__
    if kind == "KD" and mode != "teacher":
        raise TeacherInitError(
            "model.init=teacher_encoder does not apply to KD (it has no separate encoder); "
            "use model.init=teacher (the whole U-Net) or none"
        )
    required, optional = _mapping(model, mode)
    own = model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for n, t in required.items():
        src = teacher_state.get(t)
        if src is None or src.shape != own[n].shape:
            got = "missing" if src is None else f"shape {tuple(src.shape)}"
            raise TeacherInitError(
                f"model.init={mode}: student tensor {n} {tuple(own[n].shape)} needs {t} from {source}, which is "
                f"{got}; the student's trunk must match the teacher's (model.channels, model.channel_mult, "
                f"model.blocks and attention equal to teacher.channels, channel_mult, blocks, attn_resolutions), "
                f"or use model.init=none"
            )
        copied[n] = src
    for n, t in optional.items():
        src = teacher_state.get(t)
        if src is not None and src.shape == own[n].shape:
            copied[n] = src
    if mode == "teacher" and kind == "HKD":
        copied.update(_identity_links(model, own))
        copied.update(_without_skip(model, own, teacher_state, copied))
        if "decoder.emb" in own:
            copied["decoder.emb"] = _teacher_embedding(model, teacher_state)
    with torch.no_grad():
        for n, src in copied.items():
            own[n].copy_(src.to(own[n].dtype))
    return [n for n in own if n in copied]


def _teacher_embedding(model: nn.Module, teacher_state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's noise embedding at sigma_max (c_noise = log(sigma_max) / 4, as EDMPrecond feeds it): the
    constant that modulates the teacher's up path when it denoises x_T."""
    import math

    from .edm import SIGMA_MAX
    from .layers import NoiseEmbedding

    c = model.cfg.channels
    if any(v.is_meta for k, v in teacher_state.items() if k.startswith("net.embed.")):
        return torch.empty(4 * c, device="meta")  # a shape check (hkd_core/config.py), nothing to compute
    embed = NoiseEmbedding(c, 4 * c)
    embed.load_state_dict(
        {k[len("net.embed.") :]: v for k, v in teacher_state.items() if k.startswith("net.embed.")}
    )
    with torch.no_grad():
        return embed(torch.tensor([math.log(SIGMA_MAX) / 4]))[0]


def _identity_links(model: nn.Module, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Identity weights (and zero biases) for each projection encoder -> latent and lift latent -> decoder whose
    latent is at least as wide as its level, so that the latent passes the encoder's features through unchanged;
    a wider latent's extra channels keep their random projection and get a zero lift (they start silent and
    learn). A latent narrower than its level is left alone."""
    out = {}
    pairs = [(f"proj.{i}", f"decoder.lift.{l}") for i, l in enumerate(model.levels)]
    for proj, lift in pairs:
        w = own[f"{proj}.weight"]  # (d, width, 1, 1)
        d, width = w.shape[:2]
        if d < width:
            continue
        eye = torch.eye(width)
        p = own[f"{proj}.weight"].clone().reshape(d, width)
        p[:width] = eye
        li = torch.zeros(width, d)
        li[:, :width] = eye
        out[f"{proj}.weight"] = p.reshape(w.shape)
        out[f"{lift}.weight"] = li.reshape(own[f"{lift}.weight"].shape)
        b = own[f"{proj}.bias"].clone()
        b[:width] = 0
        out[f"{proj}.bias"] = b
        out[f"{lift}.bias"] = torch.zeros_like(own[f"{lift}.bias"])
    return out


def _without_skip(
    model: nn.Module,
    own: dict[str, torch.Tensor],
    teacher_state: dict[str, torch.Tensor],
    copied: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The first block of each decoder stage whose level has no latent but has a level below it: the teacher's
    up stage at that resolution with the skip's input channels sliced off (conv0 and the 1x1 skip along their
    inputs, norm0 along its channels); the block's other tensors have the teacher's shapes and are copied whole."""
    out = {}
    levels = model.cfg.levels
    for l, d in enumerate(model.decoder.in_dims):
        if d or l == levels - 1:
            continue
        pre, src = f"decoder.stages.{l}.res.0.", f"net.up.{levels - 1 - l}.res.0."
        for name, dim in (("conv0.weight", 1), ("skip.weight", 1), ("norm0.weight", 0), ("norm0.bias", 0)):
            mine, theirs = own.get(pre + name), teacher_state.get(src + name)
            if mine is None or theirs is None or pre + name in copied:
                continue
            if (
                theirs.shape[dim] > mine.shape[dim]
                and mine.shape == theirs.narrow(dim, 0, mine.shape[dim]).shape
            ):
                out[pre + name] = theirs.narrow(dim, 0, mine.shape[dim])
    return out

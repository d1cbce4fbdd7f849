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
  features. With ``model.decoder=unet`` the decoder is the teacher's whole up path (bottleneck included) and
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
        return ({n: n[len("net."):] for n in names}, {}) if mode == "teacher" else ({}, {})
    required, optional = {}, {}
    levels = model.cfg.levels
    for n in names:
        if n.startswith("encoder.embed.") or n.startswith("encoder.conv_in."):
            required[n] = "net." + n[len("encoder."):]
        elif n.startswith("encoder.stages."):
            required[n] = "net.down." + n[len("encoder.stages."):]
        elif mode == "teacher" and n.startswith("decoder.stages."):
            level, rest = n[len("decoder.stages."):].split(".", 1)
            optional[n] = f"net.up.{levels - 1 - int(level)}.{rest}"
        elif mode == "teacher" and (n.startswith("decoder.norm_out.") or n.startswith("decoder.conv_out.")):
            optional[n] = "net." + n[len("decoder."):]
        elif mode == "teacher" and n.startswith(("decoder.mid0.", "decoder.mid_attn.", "decoder.mid1.")):
            required[n] = "net." + n[len("decoder."):]     # the 'unet' decoder's bottleneck is the teacher's
    return required, optional


def init_from_teacher(model: nn.Module, teacher_state: dict[str, torch.Tensor], mode: str = "teacher",
                      source: str = "the teacher") -> list[str]:
    """Copy the teacher's tensors into ``model`` (HKD, KDM or KD) for ``mode`` (see the module docstring);
    returns the names of the student tensors that were set, in state-dict order."""
    if mode not in INIT_MODES:
        raise TeacherInitError(f"model.init={mode!r} is not allowed; choose one of {list(INIT_MODES)}")
    if mode == "none":
        return []
    kind = type(model).__name__
    if kind == "KD" and mode != "teacher":
        raise TeacherInitError("model.init=teacher_encoder does not apply to KD (it has no separate encoder); "
                               "use model.init=teacher (the whole U-Net) or none")
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
                f"or use model.init=none")
        copied[n] = src
    for n, t in optional.items():
        src = teacher_state.get(t)
        if src is not None and src.shape == own[n].shape:
            copied[n] = src
    if mode == "teacher" and kind == "HKD":
        copied.update(_identity_links(model, own))
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
        return torch.empty(4 * c, device="meta")          # a shape check (hkd_core/config.py), nothing to compute
    embed = NoiseEmbedding(c, 4 * c)
    embed.load_state_dict({k[len("net.embed."):]: v for k, v in teacher_state.items() if k.startswith("net.embed.")})
    with torch.no_grad():
        return embed(torch.tensor([math.log(SIGMA_MAX) / 4]))[0]


def _identity_links(model: nn.Module, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Identity weights (and zero biases) for each square projection encoder -> latent and lift latent ->
    decoder, so that a latent as wide as its level passes the encoder's features through unchanged."""
    out = {}
    pairs = [(f"proj.{i}", f"decoder.lift.{l}") for i, l in enumerate(model.levels)]
    for proj, lift in pairs:
        w = own[f"{proj}.weight"]
        if w.shape[0] != w.shape[1]:
            continue
        eye = torch.eye(w.shape[0]).reshape(w.shape)
        for name in (proj, lift):
            out[f"{name}.weight"] = eye
            out[f"{name}.bias"] = torch.zeros_like(own[f"{name}.bias"])
    return out

"""Reading a config and the checks that need more than one key or a built network (hkd_core/config.py's
``validate`` calls them): ``from_dict`` builds a config dataclass from a nested dict, rejecting unknown keys and
wrong types; every check raises ``ConfigError``, whose message names the key and what is allowed."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import RunConfig


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {sorted(allowed)}")


def positive(key: str, value, strict: bool = True) -> None:
    if value is not None and (value <= 0 if strict else value < 0):
        raise ConfigError(f"{key}={value} must be {'> 0' if strict else '>= 0'}")


def check_gauge(cfg: RunConfig) -> None:
    """The gauge keys (issue 24): offsets and the condition need Koopman latents that evolve."""
    m, t = cfg.model, cfg.train
    positive("train.gauge_weight", t.gauge_weight, strict=False)
    positive("model.alpha_offset_spread", m.alpha_offset_spread, strict=False)
    evolves = m.variant in ("hkd", "one_level") and "none" not in cfg.hkd_config().operators()
    for key, value in (("train.gauge_weight", t.gauge_weight), ("model.alpha_offset", m.alpha_offset),
                       ("model.alpha_offset_spread", m.alpha_offset_spread)):
        if value and not evolves:
            raise ConfigError(f"{key}={value} acts on Koopman latents that evolve; model.variant={m.variant} "
                              f"(operator {cfg.hkd_config().operator}) has none: use model.variant=hkd or one_level")
    if t.gauge_weight and cfg.hkd_config().observables == "state":
        raise ConfigError(f"train.gauge_weight={t.gauge_weight} with model.observables=state: observables of the state "
                          f"alone meet the gauge condition by construction (the condition is then 0); use one of them")


def check_init(cfg: RunConfig) -> None:
    """model.init: the teacher must be a U-Net, and the student's trunk must take its tensors (checked on
    shapes only, with both networks built on the meta device: no memory, no time)."""
    from .teacher_init import INIT_MODES, TeacherInitError, init_from_teacher

    choice("model.init", cfg.model.init, INIT_MODES)
    if cfg.model.init == "none":
        return
    if cfg.teacher.kind != "edm":
        raise ConfigError(f"model.init={cfg.model.init} needs a U-Net teacher (teacher=edm); teacher.kind is "
                          f"{cfg.teacher.kind!r}, which has no weights to start from; use model.init=none")
    h, t_levels = cfg.hkd_config(), len(cfg.teacher.channel_mult)
    if h.levels > t_levels:          # say what was asked for, before a tensor name would
        raise ConfigError(f"model.levels={h.levels} with model.init={cfg.model.init}: the student starts from the "
                          f"teacher's U-Net, which has only {t_levels} levels (teacher.channel_mult="
                          f"{list(cfg.teacher.channel_mult)}); use model.levels <= {t_levels} or model.init=none "
                          f"(random weights)")
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
        raise ConfigError("model.init=teacher_encoder does not apply to model.variant=kd (no separate encoder); "
                          "use model.init=teacher (the whole U-Net) or none")
    if abs(cfg.hkd_config().sigma_data - cfg.teacher.sigma_data) > 1e-12:
        raise ConfigError(f"model.init={cfg.model.init} with model.sigma_data={cfg.model.sigma_data} != "
                          f"teacher.sigma_data={cfg.teacher.sigma_data}: the copied layers expect the teacher's input "
                          f"scaling; leave model.sigma_data unset (it follows the teacher)")


def dry_init(student, shapes, mode, init) -> None:
    import torch

    with torch.no_grad():
        init(student, shapes, mode, "the teacher (teacher.*)")


def _check_type(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (inner,) = typing.get_args(tp)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if (tp is dict or origin is dict) and isinstance(value, dict):
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}={value!r} must be of type {getattr(tp, '__name__', tp)}")


def from_dict(cls, d: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    d = dict(d or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed under {prefix.rstrip('.') or 'the top level'}: "
                          f"{names}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping, got {value!r}")
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, f"{prefix}{name}")
    return cls(**kwargs)

"""The sweep YAML schema: parsing, validation (before anything runs) and define-by-run sampling.

A sweep file (see ``sweeps/README.md``)::

    name: scale_count
    base: [experiment=fmnist_small, train.total_kimg=4]        # Hydra overrides of the base experiment
    space:
      model.levels: {values: [1, 2, 3]}
      model.subspace_dims: {per_level: {values: [8, 16, 32]}}  # one entry per level: length follows levels
      model.operator: {per_level: {values: [position, shared]}}
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}
    metric: eval/mse_vs_teacher      # eval/fid (small-N FID at each report) or the cheaper proxy
    mode: min
    trials: 12
    max_concurrency: null            # null: as many as the cluster's CPUs/GPUs hold
    scheduler: {type: asha, grace_period_kimg: 1.0, reduction_factor: 2}
    report: {every_kimg: 1.0, fid_n: 100}
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    study_storage: null              # an SQLAlchemy URL for the Optuna study; null: SQLite beside the stack
    seed: 0
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hkd_core import metric_names as M
from hkd_core.config import ConfigError

METRICS = (M.FID, M.KID, M.MSE_VS_TEACHER)
DIST_KINDS = ("values", "uniform", "loguniform", "int")
TOP_KEYS = (
    "name",
    "base",
    "space",
    "metric",
    "mode",
    "trials",
    "max_concurrency",
    "scheduler",
    "report",
    "resources",
    "study_storage",
    "seed",
    "description",
)


class SweepError(ConfigError):
    """A sweep file is malformed; the message names the file and key."""


@dataclass
class Scheduler:
    type: str = "asha"  # asha | fifo
    grace_period_kimg: float = 1.0  # no trial is stopped before this many kimg
    reduction_factor: float = 2.0


@dataclass
class Report:
    every_kimg: float = 1.0  # intermediate metric (and checkpoint) interval
    fid_n: int = 100  # samples for the intermediate FID, when metric is eval/fid


@dataclass
class Resources:
    workers: int = 1  # Ray Train workers per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class SweepSpec:
    name: str
    base: list[str]
    space: dict
    metric: str = M.MSE_VS_TEACHER
    mode: str = "min"
    trials: int = 8
    max_concurrency: int | None = None
    scheduler: Scheduler = field(default_factory=Scheduler)
    report: Report = field(default_factory=Report)
    resources: Resources = field(default_factory=Resources)
    study_storage: str | None = None
    seed: int = 0
    description: str = ""
    source: str = ""

    def digest(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k not in ("source", "description")}
        return hashlib.sha256(
            json.dumps(d, sort_keys=True, default=lambda o: o.__dict__).encode()
        ).hexdigest()[:10]


def _err(src: str, key: str, msg: str) -> SweepError:
    return SweepError(f"{src}: {key}: {msg}")


class _Mistakes:
    """Every mistake found in one sweep file, reported together: one is ``<file>: <key>: <what>``; several are
    listed one per line under ``<file>: N mistakes:``."""

    def __init__(self, src: str):
        self.src, self.found = src, []

    def __call__(self, key: str, msg: str) -> None:
        self.found.append((key, msg))

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise _err(self.src, *self.found[0])
        if self.found:
            lines = "\n".join(f"  {k}: {m}" for k, m in self.found)
            raise SweepError(f"{self.src}: {len(self.found)} mistakes:\n{lines}")


def _check_dist(bad: _Mistakes, key: str, d, even: bool = False) -> None:
    if not isinstance(d, dict) or len(d) != 1 or next(iter(d)) not in DIST_KINDS:
        return bad(
            key,
            f"must be one of {{values: [...]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
            f"{{int: [lo, hi]}}; got {d!r}",
        )
    kind, arg = next(iter(d.items()))
    if kind == "values":
        if not isinstance(arg, list) or not arg:
            return bad(key, f"values must be a non-empty list, got {arg!r}")
        if even and any(not isinstance(v, int) or v < 2 or v % 2 for v in arg):
            bad(key, f"subspace dimensions must be even integers >= 2, got {arg}")
        return None
    if not isinstance(arg, list) or len(arg) != 2 or not all(isinstance(x, (int, float)) for x in arg):
        return bad(key, f"{kind} needs [lo, hi], got {arg!r}")
    lo, hi = arg
    if not lo < hi:
        return bad(key, f"{kind} range [{lo}, {hi}] is empty: lo must be < hi")
    if kind == "loguniform" and lo <= 0:
        return bad(key, f"loguniform needs lo > 0, got {lo}")
    if kind == "int" and not (isinstance(lo, int) and isinstance(hi, int)):
        return bad(key, f"int needs integer bounds, got {arg}")
    if even:
        bad(key, "subspace dimensions need {values: [...]} of even integers")
    return None


def _dataclass_from(bad: _Mistakes, key: str, cls, d):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        bad(key, f"must be a mapping, got {d!r}")
        return cls()
    allowed = list(cls.__dataclass_fields__)
    for k in d:
        if k not in allowed:
            bad(f"{key}.{k}", f"unknown key; allowed: {allowed}")
    return cls(**{k: v for k, v in d.items() if k in allowed})


def _check_space(bad: _Mistakes, space) -> None:
    if not isinstance(space, dict) or not space:
        return bad("space", "is empty: give at least one key to search")
    for key, dist in space.items():
        if not isinstance(key, str) or "." not in key:
            bad(f"space.{key}", "keys are dotted config keys such as model.levels or train.lr")
        elif isinstance(dist, dict) and "per_level" in dist:
            if len(dist) != 1:
                bad(f"space.{key}", "per_level stands alone")
            elif key not in ("model.subspace_dims", "model.operator"):
                bad(f"space.{key}", "per_level applies to model.subspace_dims and model.operator")
            else:
                _check_dist(
                    bad, f"space.{key}.per_level", dist["per_level"], even=key == "model.subspace_dims"
                )
        else:
            _check_dist(bad, f"space.{key}", dist, even=key == "model.subspace_dims")
    if "model.levels" in space and "model.subspace_dims" not in space:
        bad(
            "space.model.levels",
            "searching the number of levels needs model.subspace_dims with per_level, so that d_l follows L",
        )
    return None


def parse(text: str, src: str = "<sweep>", compose_fn=None) -> SweepSpec:
    """The sweep file's spec, every mistake in it reported at once (a SweepError); with ``compose_fn``, the space's
    keys are also checked against the composed base config in the same go."""
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SweepError(f"{src}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise SweepError(f"{src}: a sweep file is a mapping with at least name, base and space")
    bad = _Mistakes(src)
    for k in d:
        if k not in TOP_KEYS:
            bad(k, f"unknown key; allowed: {list(TOP_KEYS)}")
    for k in ("name", "space"):
        if k not in d:
            bad(k, "missing")
    name = d.get("name", "")
    if "name" in d and (not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum()):
        bad("name", f"must be letters, digits, '-' or '_', got {name!r}")
    base = d.get("base") or []
    base_ok = isinstance(base, list) and all(isinstance(b, str) and "=" in b for b in base)
    if not base_ok:
        bad("base", f"must be a list of Hydra overrides like 'experiment=smoke', got {base!r}")
    space = d.get("space")
    if "space" in d:
        _check_space(bad, space)
    metric = d.get("metric", M.MSE_VS_TEACHER)
    if metric not in METRICS:
        bad("metric", f"{metric!r} is not reported per trial; choose one of {list(METRICS)}")
    mode = d.get("mode", "min")
    if mode not in ("min", "max"):
        bad("mode", f"must be min or max, got {mode!r}")
    trials = d.get("trials", 8)
    if not isinstance(trials, int) or trials < 1:
        bad("trials", f"must be an integer >= 1, got {trials!r}")
    conc = d.get("max_concurrency")
    if conc is not None and (not isinstance(conc, int) or conc < 1):
        bad("max_concurrency", f"must be null or an integer >= 1, got {conc!r}")
    sched = _dataclass_from(bad, "scheduler", Scheduler, d.get("scheduler"))
    if sched.type not in ("asha", "fifo"):
        bad("scheduler.type", f"must be asha or fifo, got {sched.type!r}")
    if sched.grace_period_kimg <= 0 or sched.reduction_factor <= 1:
        bad("scheduler", "grace_period_kimg must be > 0 and reduction_factor > 1")
    report = _dataclass_from(bad, "report", Report, d.get("report"))
    if report.every_kimg <= 0 or report.fid_n < 2:
        bad("report", "every_kimg must be > 0 and fid_n >= 2")
    res = _dataclass_from(bad, "resources", Resources, d.get("resources"))
    if res.workers < 1 or res.cpus_per_worker <= 0 or res.gpus_per_worker < 0:
        bad("resources", "workers >= 1, cpus_per_worker > 0, gpus_per_worker >= 0")
    if compose_fn is not None and base_ok and isinstance(space, dict):
        try:
            _check_keys(bad, compose_fn(base), space)
        except ConfigError as e:
            bad("base", str(e))
    bad.raise_any()
    return SweepSpec(
        name=name,
        base=base,
        space=space,
        metric=metric,
        mode=mode,
        trials=trials,
        max_concurrency=conc,
        scheduler=sched,
        report=report,
        resources=res,
        study_storage=d.get("study_storage"),
        seed=int(d.get("seed", 0)),
        description=str(d.get("description", "")),
        source=src,
    )


def _check_keys(bad: _Mistakes, base: dict, space: dict) -> None:
    for key in space:
        node = base
        for part in str(key).split("."):
            if not isinstance(node, dict) or part not in node:
                bad(f"space.{key}", "is not a key of the composed base config")
                break
            node = node[part]


def load(path: str | Path, compose_fn=None) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{p}: no such sweep file")
    return parse(p.read_text(), str(p), compose_fn)


def _suggest(trial, name: str, dist: dict):
    kind, arg = next(iter(dist.items()))
    if kind == "values":
        return trial.suggest_categorical(name, arg)
    if kind == "uniform":
        return trial.suggest_float(name, arg[0], arg[1])
    if kind == "loguniform":
        return trial.suggest_float(name, arg[0], arg[1], log=True)
    return trial.suggest_int(name, arg[0], arg[1])


class DefineByRun:
    """The Optuna define-by-run space: model.levels first, then one d_l (and operator) per sampled level.
    A class, not a closure, so that Tune can pickle it into its experiment checkpoint (for --resume)."""

    def __init__(self, space: dict, levels_default: int):
        self.space, self.levels_default = space, levels_default

    def __call__(self, trial) -> dict:
        out = {}
        levels = self.levels_default
        if "model.levels" in self.space:
            levels = _suggest(trial, "model.levels", self.space["model.levels"])
            out["model.levels"] = levels
        for key, dist in self.space.items():
            if key == "model.levels":
                continue
            if isinstance(dist, dict) and "per_level" in dist:
                # a parameter per level index: Optuna keeps each one's own history across trials
                out[key] = [_suggest(trial, f"{key}.l{l + 1}", dist["per_level"]) for l in range(levels)]
            else:
                out[key] = _suggest(trial, key, dist)
        return out


def define_by_run(spec: SweepSpec, levels_default: int) -> DefineByRun:
    return DefineByRun(spec.space, levels_default)


def overrides_for(params: dict) -> list[str]:
    """Sampled params -> Hydra overrides (lists without spaces)."""
    out = []
    for k, v in params.items():
        if isinstance(v, list):
            v = "[" + ",".join(str(x) for x in v) + "]"
        out.append(f"{k}={v}")
    return out


def check_against_config(spec: SweepSpec, compose_fn) -> dict:
    """Every space key must exist in the composed base config; sample a few points and validate them."""
    import random

    import optuna

    base = compose_fn(spec.base)
    bad = _Mistakes(spec.source)
    _check_keys(bad, base, spec.space)
    bad.raise_any()
    levels_default = base["model"].get("levels") or 0
    if not levels_default:
        from hkd_core.architecture import PRESETS

        levels_default = PRESETS[base["model"]["preset"]].levels
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    study = optuna.create_study(sampler=sampler)
    fn = define_by_run(spec, levels_default)
    rng = random.Random(spec.seed)
    for _ in range(16):
        trial = study.ask()
        params = fn(trial)
        study.tell(trial, rng.random())
        from orchestrator.config import from_composed

        try:
            from_composed(compose_fn(spec.base + overrides_for(params)))
        except ConfigError as e:
            raise _err(
                spec.source, "space", f"a sampled point is not a valid config ({e}); sampled {params}"
            ) from e
    return copy.deepcopy(base)


def asha_rungs(spec: SweepSpec, total_kimg: float) -> list[float]:
    """The kimg milestones where ASHA compares trials (for the docs and --dry-run)."""
    out, t = [], spec.scheduler.grace_period_kimg
    while t < total_kimg - 1e-9:
        out.append(round(t, 6))
        t *= spec.scheduler.reduction_factor
    return out

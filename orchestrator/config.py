"""Compose the pipeline config with Hydra and validate all of it before any cluster work.

Defaults live in one place: the dataclasses (hkd_core/config.py for the method; StorageConfig,
TrackingConfig and ClusterConfig here). They are registered as the base of the composition
(``hkd_defaults``); a group YAML under ``conf/`` carries only what its option changes, and an experiment
preset only what it changes on top. The method's sections load into hkd_core's ``RunConfig`` (strict:
unknown keys and wrong types are errors naming the dotted key); storage, tracking and cluster load into
the orchestrator's dataclasses, checked the same way. Presets of your own (``hkd sweep`` writes the best
trial's there) live in ``$HKD_USER_CONF`` (default ``./conf``): ``conf/experiment/<name>.yaml`` is then
``experiment=<name>``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hkd_core.config import ConfigError, RunConfig, stage_hashes
from hkd_core.config_checks import from_dict
from hkd_core.validation import validate as validate_run
from orchestrator.services.storage import StorageConfig
from orchestrator.services.tracking import TrackingConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"
DEFAULTS_NAME = "hkd_defaults"
CORE = ("data", "teacher", "trajectories", "model", "train", "eval")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")


@dataclass
class ClusterConfig:
    address: str | None = None  # None: an in-process Ray; "auto" or "host:port" to join a running one
    num_workers: int = 2  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    generation_tasks: int = 2  # parallel tasks for trajectories and evaluation
    max_failures: int = 3  # Ray Train FailureConfig
    # where the Train workers' bundles go (Ray's placement group strategies): PACK fills one node first;
    # SPREAD puts them on different nodes when it can (and packs them when it must: a restart after a lost
    # node); STRICT_SPREAD only ever on different nodes
    placement_strategy: str = "PACK"
    # An autoscaling cluster's size at its maximum (KubeRay: maxReplicas x each worker pod's CPUs and GPUs; the
    # launcher: max_workers x the node type's), which a sweep sizes its concurrency from: trials beyond what is
    # up now wait as pending demand, which is what makes the autoscaler add nodes. None: the resources present
    # when the sweep starts (a fixed cluster).
    max_cpus: float | None = None
    max_gpus: float | None = None


@dataclass
class PipelineConfig:
    name: str = "hkd"
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            **self.run.to_dict(),
            "storage": dataclasses.asdict(self.storage),
            "tracking": dataclasses.asdict(self.tracking),
            "cluster": dataclasses.asdict(self.cluster),
        }

    def stages(self) -> dict[str, str]:
        return stage_hashes(self.run)


def defaults() -> dict:
    """Every key with its default, from the dataclasses: the base of every composition."""
    # each section's own defaults, "auto" kept: a RunConfig would resolve it for its default teacher already
    run = {f.name: dataclasses.asdict(f.default_factory()) for f in dataclasses.fields(RunConfig)}
    return {
        "name": "hkd",
        **run,
        "storage": dataclasses.asdict(StorageConfig()),
        "tracking": dataclasses.asdict(TrackingConfig()),
        "cluster": dataclasses.asdict(ClusterConfig()),
    }


def user_conf_dir() -> Path:
    """The user's own config folder (experiment presets written by `hkd sweep`), on Hydra's search path."""
    return Path(os.environ.get("HKD_USER_CONF", "conf")).expanduser().resolve()


def compose(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """Hydra composition -> a plain resolved dict. Hydra's own errors are turned into ConfigErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name=DEFAULTS_NAME, node=defaults())
    extra = []
    if user_conf_dir().is_dir():
        extra = [f"hydra.searchpath=[{user_conf_dir().as_uri()}]"]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=extra + list(overrides or []))
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_hydra_message(e)) from None


def _hydra_message(e: Exception) -> str:
    text = str(e).strip()
    env = re.search(r"Environment variable '([^']+)' not found.*full_key: (\S+)", text, re.S)
    if env:
        return (
            f"{env.group(2)} comes from the environment variable {env.group(1)}, which is not set; export it "
            f"(or override {env.group(2)}=...)"
        )
    m = re.match(r"Could not override '([^']+)'", text)
    if m:
        return (
            f"unknown key {m.group(1)}: it is not in the composed config (a typo? `hkd pipeline --dry-run` "
            f"prints every key)"
        )
    lines = [ln.strip() for ln in text.split("Config search path")[0].splitlines() if ln.strip()]
    return " ".join(lines).replace("Available options in", "; available options in")


def from_composed(d: dict) -> PipelineConfig:
    d = dict(d)
    known = set(CORE) | {"storage", "tracking", "cluster", "name"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]}; allowed at the top level: {sorted(known)}")
    run = validate_run(from_dict(RunConfig, {k: d[k] for k in CORE if k in d}))
    cfg = PipelineConfig(
        name=str(d.get("name", "hkd")),
        run=run,
        storage=from_dict(StorageConfig, d.get("storage"), "storage."),
        tracking=from_dict(TrackingConfig, d.get("tracking"), "tracking."),
        cluster=from_dict(ClusterConfig, d.get("cluster"), "cluster."),
    )
    return validate(cfg)


def validate(cfg: PipelineConfig) -> PipelineConfig:
    s, c, t = cfg.storage, cfg.cluster, cfg.tracking
    if s.kind not in ("s3", "fs"):
        raise ConfigError(
            f"storage.kind={s.kind!r} is not allowed; choose s3 (storage=local or storage=s3) or fs "
            f"(storage=fs: a local folder)"
        )
    if s.data_source not in ("auto", "local", "s3"):
        raise ConfigError(
            f"storage.data_source={s.data_source!r} is not allowed; choose auto (the local disk, else "
            f"s3://<bucket>/datasets/), local or s3"
        )
    if s.kind == "s3" and not s.bucket:
        raise ConfigError("storage.bucket is empty; name the S3 bucket (or set HKD_S3_BUCKET)")
    if s.endpoint_url and not s.endpoint_url.startswith(("http://", "https://")):
        raise ConfigError(f"storage.endpoint_url={s.endpoint_url!r} must start with http:// or https://")
    if t.kind not in ("server", "file"):
        raise ConfigError(
            f"tracking.kind={t.kind!r} is not allowed; choose server (tracking=local or "
            f"tracking=remote) or file (tracking=file: a local MLflow store)"
        )
    if t.kind == "server" and not t.uri:
        raise ConfigError("tracking.uri is empty; set it (or MLFLOW_TRACKING_URI) to the MLflow server's URL")
    if t.kind == "server" and not t.uri.startswith(("http://", "https://", "sqlite:", "file:", "databricks")):
        raise ConfigError(
            f"tracking.uri={t.uri!r} is not an MLflow tracking URI (http://host:port, sqlite:///...)"
        )
    if not t.experiment or not t.experiment.strip():
        raise ConfigError(
            "tracking.experiment is empty; name the MLflow experiment the runs go to (default hkd)"
        )
    if c.num_workers < 1:
        raise ConfigError(f"cluster.num_workers={c.num_workers} must be >= 1")
    if c.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(
            f"cluster.placement_strategy={c.placement_strategy!r}; choose one of {list(PLACEMENT_STRATEGIES)}"
        )
    if c.generation_tasks < 1:
        raise ConfigError(f"cluster.generation_tasks={c.generation_tasks} must be >= 1")
    if c.use_gpu and c.gpus_per_worker <= 0:
        raise ConfigError("cluster.use_gpu is true but cluster.gpus_per_worker is 0; give each worker a GPU")
    if cfg.run.train.batch_size % c.num_workers:
        raise ConfigError(
            f"train.batch_size={cfg.run.train.batch_size} is not divisible by "
            f"cluster.num_workers={c.num_workers}"
        )
    shards = -(-cfg.run.trajectories.num // cfg.run.trajectories.shard_size)
    if shards < c.num_workers:
        raise ConfigError(
            f"trajectories.num={cfg.run.trajectories.num} with trajectories.shard_size="
            f"{cfg.run.trajectories.shard_size} makes {shards} shards, fewer than cluster.num_workers="
            f"{c.num_workers}: every worker streams its own shards; lower shard_size"
        )
    return cfg


def load(overrides: list[str] | None = None) -> PipelineConfig:
    return from_composed(compose(overrides))


def options() -> dict:
    """The config groups (``group=option``), each with its options and the first comment line of each option's
    YAML, the default option, and the experiment presets (packaged and the user's, ``$HKD_USER_CONF``)."""
    defaults = _default_options(CONF_DIR / "config.yaml")
    groups = {}
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")):
        opts = {y.stem: _first_comment(y) for y in sorted(folder.glob("*.yaml"))}
        user = user_conf_dir() / folder.name
        if user.is_dir():
            opts.update(
                {y.stem: _first_comment(y) + " (yours: " + str(y) + ")" for y in sorted(user.glob("*.yaml"))}
            )
        groups[folder.name] = {"default": defaults.get(folder.name), "options": opts}
    return {"groups": groups, "presets": groups.get("experiment", {}).get("options", {})}


def _default_options(path: Path) -> dict[str, str]:
    import yaml

    out = {}
    for item in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
        if isinstance(item, dict):
            out.update({str(k).split("@")[0].lstrip("/"): str(v) for k, v in item.items()})
    return out


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# @"):  # a Hydra directive (# @package _global_), not a description
            continue
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""

"""Joining or starting Ray for the driver: the one place that calls ``ray.init``."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.config import PipelineConfig


# Lines Ray echoes to the driver's terminal that say nothing a user can act on. They stay in Ray's own log
# files (the session's logs/ folder: worker-*.err, raylet.out); HKD_RAY_VERBOSE=1 shows them here too.
RAY_NOISE = (
    re.compile(r"Actor with class name: 'PreemptionWatcher' .*constructor arguments in the object store"),
    re.compile(r"\d+ PYTHON worker processes have been started on node"),
    re.compile(r"Failed to query Ray Train Controller actor state"),
    re.compile(r"^Reporting training result \d+: TrainingReport\("),  # Ray Train V2 echoes every report
)
NOISY_ACTORS = ("PlacementGroupCleaner",)  # its every line: placement-group bookkeeping and its tracebacks


def keep_line(data: dict, line: str) -> bool:
    """Does a line Ray forwards from a worker (``data``: its pid, actor_name, ...) reach the user's terminal?"""
    if data.get("actor_name") in NOISY_ACTORS:
        return False
    return not any(p.search(line) for p in RAY_NOISE)


def quiet_ray_echo() -> None:
    """Filter what Ray echoes from workers and the raylet to this driver (``print_to_stdstream``: both the
    worker-log dispatcher and the raylet's error messages go through it); idempotent; before ``ray.init``, so
    that the dispatcher binds the filtered function."""
    if os.environ.get("HKD_RAY_VERBOSE") == "1":
        return
    try:
        import ray._private.worker as rw
    except ImportError:  # another Ray layout: show everything rather than fail
        return
    original = rw.print_to_stdstream
    if getattr(original, "_hkd_filtered", False):
        return

    def filtered(data, ignore_prefix: bool):
        lines = [ln for ln in data.get("lines", []) if keep_line(data, ln)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    filtered._hkd_filtered = True
    rw.print_to_stdstream = filtered


def driver_address(pc: PipelineConfig) -> str | None:
    """The Ray this driver joins: cluster.address or, inside `ray job submit`, the head the job runs on
    (RAY_ADDRESS is its GCS); None: a Ray in this process. The preflight asks the same head."""
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    return pc.cluster.address or (os.environ.get("RAY_ADDRESS") if in_job else None)


def loopback_env(pc: PipelineConfig) -> None:
    """For a one-node Ray on this machine's 127.0.0.1 (in-process, or the local stack's head): Ray would replace
    127.0.0.1 by the machine's network address without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. Never for a
    cluster: with it set, a worker node's `ray start --address` aborts (multi-node nodes use other loopback
    addresses, or real ones). Ray reads it when it is first imported, so the driver calls this before any
    stage runs (``driver.run_stages``), and ``init_ray`` again."""
    target = driver_address(pc)
    if not target or target.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(pc: PipelineConfig) -> None:
    """Join cluster.address, or start a Ray in this process sized for the workers (plus one CPU for the
    driver's tasks)."""
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    loopback_env(pc)
    import ray

    if ray.is_initialized():
        return
    quiet_ray_echo()
    runtime_env = {"env_vars": env_for_workers()}
    if in_job:
        # inside `ray job submit`: the job already carries its runtime env (working dir, env vars); passing
        # another one here would replace it
        ray.init(address=pc.cluster.address or "auto", log_to_driver=True)
    elif pc.cluster.address:
        ray.init(address=pc.cluster.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        need = pc.cluster.num_workers * pc.cluster.cpus_per_worker + 1
        ray.init(
            num_cpus=max(int(need), os.cpu_count() or 1),
            include_dashboard=False,
            runtime_env=runtime_env,
            _node_ip_address="127.0.0.1",
        )


def env_for_workers() -> dict:
    """Variables the workers need that the driver has (endpoints and the credentials file, never the keys)."""
    keys = (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_PROFILE",
        "HKD_S3_PROFILE",
        "AWS_DEFAULT_REGION",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "HKD_MLFLOW_CREDENTIALS",
        "PGPASSFILE",
        "HKD_S3_BUCKET",
        "HKD_INCEPTION_WEIGHTS",
        "HKD_CACHE",
        "HKD_DATA_DIR",
        "HKD_GIT_SHA",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
        "HKD_FAULT_STALL_BEFORE_UPLOAD_S",
        "HKD_FAULT_STALL_AFTER_UPLOAD_S",
        "HKD_FAULT_STALL_MARK",
        "HKD_FAULT_STALL_ARMED_BY",
    )
    return {k: os.environ[k] for k in keys if os.environ.get(k)}

"""Joining or starting Ray for the driver: the one place that calls ``ray.init``."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import PipelineConfig


def init_ray(pc: PipelineConfig) -> None:
    """Join cluster.address, or start a Ray in this process sized for the workers (plus one CPU for the
    driver's tasks)."""
    # keeps a local Ray on 127.0.0.1; read when ray is imported, so set before that
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from .workers import env_for_workers

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env_for_workers()}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # inside `ray job submit`: the job already carries its runtime env (working dir, env vars); passing
        # another one here would replace it
        ray.init(address=pc.cluster.address or "auto", log_to_driver=True)
    elif pc.cluster.address:
        ray.init(address=pc.cluster.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        need = pc.cluster.num_workers * pc.cluster.cpus_per_worker + 1
        ray.init(num_cpus=max(int(need), os.cpu_count() or 1), include_dashboard=False, runtime_env=runtime_env,
                 _node_ip_address="127.0.0.1")

"""The one place a Ray Train ``TorchTrainer`` is built: the pipeline's stages and every sweep trial use it.

Ray Train V2: ``TorchTrainer(loop, train_loop_config, scaling_config, run_config).fit()``. Its run folder
is ``<storage>/ray/<name>`` (S3, or a local folder with storage=fs); workers get the driver's endpoint
variables (never keys); checkpoints are kept ``num_to_keep`` deep; failures are retried
``cluster.max_failures`` times from the last recorded checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.services.rayfs import ray_storage


@dataclass
class Workers:
    """How many Ray Train workers and what each one holds."""

    num: int
    cpus: float = 1.0
    gpus: float = 0.0

    @classmethod
    def of(cls, cluster) -> Workers:
        return cls(
            cluster.num_workers, cluster.cpus_per_worker, cluster.gpus_per_worker if cluster.use_gpu else 0.0
        )

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def make_trainer(
    pc,
    loop,
    loop_config: dict,
    name: str,
    *,
    workers: Workers | None = None,
    subdir: str = "",
    callbacks: list | None = None,
    num_to_keep: int = 2,
):
    """A TorchTrainer for ``loop`` (a function of one dict) on the config's cluster and storage."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.services.raycluster import env_for_workers

    w = workers or Workers.of(pc.cluster)
    res = {"CPU": w.cpus, **({"GPU": w.gpus} if w.gpus else {})}
    path, fs = ray_storage(pc.storage)
    run_config = RunConfig(
        name=name,
        storage_path=f"{path}/{subdir}".rstrip("/"),
        storage_filesystem=fs,
        callbacks=callbacks or [],
        failure_config=FailureConfig(max_failures=pc.cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        worker_runtime_env={"env_vars": env_for_workers()},
    )
    return TorchTrainer(
        loop,
        train_loop_config={"threads": w.threads, **loop_config},
        torch_config=TorchConfig(backend="nccl" if w.gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=w.num,
            use_gpu=bool(w.gpus),
            resources_per_worker=res,
            placement_strategy=pc.cluster.placement_strategy,
        ),
        run_config=run_config,
    )


def fit(trainer):
    """Train; returns (Result, wall seconds); raises the training error, if any."""
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    return result, time.perf_counter() - t0


def checkpoint_state(result) -> dict:
    """The training state (model, EMA, optimizer, step, nimg, ...) of the result's newest checkpoint."""
    with result.checkpoint.as_directory() as d:
        f = sorted(Path(d).glob("ckpt-*.pt"))[-1]
        return torch.load(f, map_location="cpu", weights_only=False)

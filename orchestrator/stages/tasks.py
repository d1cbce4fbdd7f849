"""The Ray tasks of the trajectories and evaluate stages: one shard of teacher trajectories written to storage,
and the Inception statistics of a chunk of samples (the model at NFE 1 or the teacher at some NFE) or of given
images. Each takes the driver's validated ``PipelineConfig`` as it is, and the number of threads its CPUs allow."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from orchestrator.stages.workers import inception_weights, load_model, load_teacher, worker_device


def generate_shard_task(
    pc,
    images: torch.Tensor | None,
    teacher_key: str | None,
    prefix: str,
    index: int,
    first: int,
    count: int,
    seed: int,
    threads: int = 1,
) -> dict:
    """One shard of teacher trajectories, written to storage (reused if a whole one is already there); ``images``
    only for the empirical teacher (an EDM teacher's weights come from storage)."""
    from hkd_core.generate import existing_shard, generate_shard, sampler_spec
    from orchestrator.services.storage import make_store

    torch.set_num_threads(threads)
    store = make_store(pc.storage, prefix)
    info = existing_shard(store, index, first, count, seed)
    if info is None:
        t = pc.run.trajectories
        from hkd_core.evaluation import image_shape

        info = generate_shard(
            store,
            load_teacher(pc, images, teacher_key),
            index,
            first,
            count,
            image_shape(pc.run.data),
            sampler_spec(t.sampler, t.steps),
            seed,
            t.batch_size,
            worker_device(),
        )
    return dataclasses.asdict(info)


def features_task(
    pc,
    what: dict,
    seeds: list[int],
    images=None,
    teacher_key: str | None = None,
    model_key: str | None = None,
    threads: int = 1,
) -> dict:
    """Inception statistics of the samples drawn from these noise seeds: the model at NFE 1, or the teacher at
    ``what['nfe']`` (hkd_core.evaluation.chunk_result)."""
    from hkd_core import evaluation as E

    torch.set_num_threads(threads)
    dev = worker_device()
    feats = inception(pc, dev)
    if what["kind"] == "model":
        generate = E.model_generator(load_model(pc, model_key).to(dev))
    else:
        generate = E.teacher_generator(load_teacher(pc, images, teacher_key), what["nfe"])
    f = E.chunk_features(generate, seeds, E.image_shape(pc.run.data), feats, pc.run.eval.batch_size, dev)
    return E.chunk_result(f)


def image_features_task(pc, images: torch.Tensor, threads: int = 1) -> dict:
    """Inception statistics and features of given images (a chunk of the reference set, or any images)."""
    from hkd_core import evaluation as E

    torch.set_num_threads(threads)
    return E.chunk_result(inception(pc, worker_device())(images))


def inception(pc, device):
    """The Inception network of this worker process, built once (1.5 s on a CPU core) and kept for the next
    evaluation task that Ray hands the same process; a weights file replaced in place is another network."""
    path = inception_weights(pc)
    st = os.stat(path)
    return _inception(str(path), st.st_size, st.st_mtime_ns, str(device), pc.run.eval.batch_size)


@functools.lru_cache(maxsize=2)
def _inception(path: str, size: int, mtime_ns: int, device: str, batch_size: int):
    from hkd_core.fid import InceptionFeatures

    return InceptionFeatures(path, device=device, batch_size=batch_size)

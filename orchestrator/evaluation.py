"""Evaluation on Ray: hkd_core.evaluation's units spread over Ray tasks, and reference statistics cached in storage.

Seeds are split into ``cluster.generation_tasks`` chunks; each task draws its samples, runs Inception and
returns float64 sums and features; the driver merges them exactly and scores them. Reference statistics of
the evaluation split are computed the same way once and cached under ``fid-refs/`` keyed by (data set, split,
N, resolution, Inception weights sha256).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from hkd_core import evaluation as E
from hkd_core import metric_names as M

from . import workers
from .storage import make_store

log = logging.getLogger(__name__)
REFERENCES = "fid-refs"


def _tasks(pc):
    import ray

    return ray.remote(num_cpus=max(1, int(pc.cluster.cpus_per_worker)),
                      num_gpus=pc.cluster.gpus_per_worker if pc.cluster.use_gpu else 0,
                      max_retries=2, runtime_env={"env_vars": workers.env_for_workers()})


def _threads(pc) -> int:
    return max(1, int(pc.cluster.cpus_per_worker))


def image_features(pc, images: torch.Tensor, tasks: int | None = None):
    """(FeatureStats, features) of given images, split into contiguous chunks over ``tasks`` Ray tasks
    (default cluster.generation_tasks)."""
    import ray

    k = max(1, min(tasks or pc.cluster.generation_tasks, images.shape[0]))
    bounds = np.linspace(0, images.shape[0], k + 1).round().astype(int)
    fn = _tasks(pc)(workers.image_features_task)
    cfg = pc.to_dict()
    refs = [fn.remote(cfg, images[a:b].clone(), _threads(pc)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return E.merge_chunks(ray.get(refs))


def reference(pc, n: int | None = None) -> tuple:
    """Reference statistics of the evaluation split for N images (default eval.n), from the cache in storage
    or computed across Ray tasks once. Returns (Reference, cache object name, computed now?)."""
    from hkd_core.fid import Reference, decode_reference, encode_reference, reference_cache_name, reference_key
    from hkd_core.inception import weights_digest

    from .workers import inception_weights

    e, d = pc.run.eval, pc.run.data
    n = e.n if n is None else n
    key = reference_key(d.name, e.split, n, d.resolution, weights_digest(inception_weights(pc)))
    store = make_store(pc.storage, REFERENCES)
    name = reference_cache_name(key)
    if store.exists(name):
        ref = decode_reference(store.get(name))
        if ref.key == key:
            return ref, name, False
    images = E.reference_images(d, e.split, n)
    log.info("reference statistics for %s/%s N=%d across Ray tasks (once; cached at %s)", d.name, e.split, n,
             store.uri(name))
    stats, feats = image_features(pc, images)
    ref = Reference(key, stats, feats)
    store.put(name, encode_reference(ref))
    return ref, name, True


def sample_scores(pc, cfg_dict: dict, ref, what: dict, model_key=None, teacher_key=None, images_ref=None) -> dict:
    """Samples from the evaluation seeds and their scores, computed across Ray tasks, one chunk of seeds each."""
    import ray

    seeds = E.eval_seeds(pc.run.eval)
    k = pc.cluster.generation_tasks
    chunks = [seeds[i::k] for i in range(k) if seeds[i::k]]
    fn = _tasks(pc)(workers.features_task)
    refs = [fn.remote(cfg_dict, what, c, images_ref, teacher_key, model_key, _threads(pc)) for c in chunks]
    return E.score(*E.merge_chunks(ray.get(refs)), ref, pc.run.eval.kid_subset_size)


def recorded_teacher_scores(pc, adopted: str | None) -> tuple[dict[int, dict], dict | None]:
    """The shipped teacher's own scores (its record.json) when they were measured exactly as this evaluation
    would measure them (the same N, noise seeds and reference split): {nfe: scores} and the noise floor."""
    from hkd_core.shipped import find_shipped

    shipped = find_shipped(pc.run.data, pc.run.teacher) if adopted else None
    if shipped is None:
        return {}, None
    ev = shipped.record.get("eval") or {}
    e = pc.run.eval
    if (ev.get("n"), ev.get("seed"), ev.get("split")) != (e.n, e.seed, e.split):
        return {}, None
    return {int(k): v for k, v in (ev.get("by_nfe") or {}).items()}, ev.get("noise_floor_train_vs_test")


def evaluate(pc, cfg_dict: dict, model_key: str, teacher_key: str | None, images, adopted: str | None = None
             ) -> dict:
    """FID/KID of the model (NFE 1) and of the teacher at each eval.teacher_nfe, under their metric names.
    ``images()`` gives the teacher's data set (loaded only when the teacher is scored). A teacher adopted from
    ``hkd_core/shipped/`` (``adopted``: where from) is not sampled again where its record already holds the
    score on the same N, seeds and split; the record's train-vs-test noise floor comes along."""
    import ray

    ref = reference(pc)[0]
    e = pc.run.eval
    metrics = E.model_metrics(sample_scores(pc, cfg_dict, ref, {"kind": "model"}, model_key=model_key), e.n)
    recorded, floor = recorded_teacher_scores(pc, adopted)
    if floor:
        metrics[M.NOISE_FLOOR_FID] = floor["fid"]
    todo = [nfe for nfe in e.teacher_nfe if nfe not in recorded]
    for nfe in e.teacher_nfe:
        if nfe in recorded:
            metrics.update(E.teacher_metrics(recorded[nfe], nfe))
            log.info("teacher at NFE %d: from the shipped teacher's record (N=%d, the same seeds): FID %.2f",
                     nfe, e.n, recorded[nfe]["fid"])
    if todo:
        img_ref = ray.put(images()) if pc.run.teacher.kind == "empirical" else None
        for nfe in todo:
            s = sample_scores(pc, cfg_dict, ref, {"kind": "teacher", "nfe": nfe}, teacher_key=teacher_key,
                              images_ref=img_ref)
            metrics.update(E.teacher_metrics(s, nfe))
    return metrics


def figures(model, log_artifact) -> None:
    """Sample grid, spectrum plots, decay-rate maps, band masking, trajectory strip and the raw eigenvalues,
    handed to ``log_artifact(path, folder)`` (spectra/ or figures/)."""
    from hkd_core.figures import write_figures

    with tempfile.TemporaryDirectory() as d:
        paths = write_figures(model, Path(d))
        spec = model.spectrum()
        if spec:
            np.savez(Path(d) / "eigenvalues.npz", **{f"level{l + 1}": ev.numpy() for l, ev in enumerate(spec)})
            paths.append(Path(d) / "eigenvalues.npz")
        for p in paths:
            log_artifact(p, M.SPECTRA if p.name in ("spectrum.png", "alpha_maps.png", "eigenvalues.npz") else "figures")

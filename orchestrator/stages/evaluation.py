"""Evaluation on Ray: hkd_core.evaluation's units spread over Ray tasks, and reference statistics cached in storage.

Seeds are split into chunks of at most ``EVAL_CHUNK`` images (at least ``cluster.generation_tasks`` chunks);
each task draws its samples, runs Inception and returns float64 sums and features; the driver merges them
exactly, in chunk order, and scores them, with a progress bar counting images scored of N. Reference
statistics of the evaluation split are computed the same way once and cached under ``fid-refs/`` keyed by
(data set, split, N, resolution, Inception weights sha256), and so is the noise floor. A teacher's scores are
taken from its shipped record or from the teacher-score cache (``teacher-scores/``) only under the same
reference identity (``hkd_core.evaluation.reference_identity``: the reference images' sha256 and the
Inception weights' sha256 included) and the same noise seeds; otherwise the teacher is sampled again. The model's
own scores are cached there too, under the same identity plus its weights' sha256: an evaluate stage that fails
after scoring (at N = 10,000 on 2 cores, 17 minutes of Inception) resumes without scoring the model again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from hkd_core import evaluation as E
from hkd_core import metric_names as M
from orchestrator.services.raycluster import env_for_workers
from orchestrator.services.storage import make_store
from orchestrator.stages import tasks as ray_tasks
from orchestrator.stages import workers

log = logging.getLogger(__name__)
REFERENCES = "fid-refs"
TEACHER_SCORES = "teacher-scores"
EVAL_CHUNK = 500  # images per Ray task: the progress bar moves by this much (2 tasks at N = 1000)


def _tasks(pc):
    import ray

    return ray.remote(
        num_cpus=max(1, int(pc.cluster.cpus_per_worker)),
        num_gpus=pc.cluster.gpus_per_worker if pc.cluster.use_gpu else 0,
        max_retries=2,
        runtime_env={"env_vars": env_for_workers()},
    )


def _threads(pc) -> int:
    return max(1, int(pc.cluster.cpus_per_worker))


def _chunks(pc, n: int, tasks: int | None = None) -> int:
    """How many Ray tasks score n images: at least ``tasks`` (default cluster.generation_tasks), at most
    EVAL_CHUNK images each."""
    return max(1, min(n, max(tasks or pc.cluster.generation_tasks, math.ceil(n / EVAL_CHUNK))))


def gather(refs: list, sizes: list[int], desc: str, progress: bool) -> list:
    """ray.get of ``refs`` in their order, with a bar that counts the images (``sizes``) of each finished task."""
    import ray
    from tqdm.auto import tqdm

    index = {r: i for i, r in enumerate(refs)}
    out: list = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=sum(sizes), desc=desc, unit="img", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                out[index[r]] = ray.get(r)
                bar.update(sizes[index[r]])
    return out


def image_features(
    pc, images: torch.Tensor, tasks: int | None = None, desc: str = "images", progress: bool = False
):
    """(FeatureStats, features) of given images, split into contiguous chunks over Ray tasks (``_chunks``)."""
    k = _chunks(pc, images.shape[0], tasks)
    bounds = np.linspace(0, images.shape[0], k + 1).round().astype(int)
    fn = _tasks(pc)(ray_tasks.image_features_task)
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    refs = [fn.remote(pc, images[a:b].clone(), _threads(pc)) for a, b in spans]
    return E.merge_chunks(gather(refs, [b - a for a, b in spans], desc, progress))


def reference(pc, n: int | None = None, progress: bool = False) -> tuple:
    """Reference statistics of the evaluation split for N images (default eval.n), from the cache in storage
    or computed across Ray tasks once. Returns (Reference, cache object name, computed now?)."""
    from hkd_core.fid import (
        Reference,
        decode_reference,
        encode_reference,
        reference_cache_name,
        reference_key,
    )
    from hkd_core.inception import weights_digest
    from orchestrator.stages.workers import inception_weights

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
    log.info(
        "reference statistics for %s/%s N=%d across Ray tasks (once; cached at %s)",
        d.name,
        e.split,
        n,
        store.uri(name),
    )
    stats, feats = image_features(
        pc, images, desc=f"evaluate: reference {d.name}/{e.split}", progress=progress
    )
    ref = Reference(key, stats, feats)
    store.put(name, encode_reference(ref))
    return ref, name, True


def sample_scores(
    pc, ref, what: dict, model_key=None, teacher_key=None, images_ref=None, progress: bool = False
) -> dict:
    """Samples from the evaluation seeds and their scores, computed across Ray tasks, one chunk of seeds each
    (chunk i takes seeds i, i + k, ...; merged in chunk order)."""
    seeds = E.eval_seeds(pc.run.eval)
    k = _chunks(pc, len(seeds))
    chunks = [seeds[i::k] for i in range(k) if seeds[i::k]]
    fn = _tasks(pc)(ray_tasks.features_task)
    refs = [fn.remote(pc, what, c, images_ref, teacher_key, model_key, _threads(pc)) for c in chunks]
    name = "model at NFE 1" if what["kind"] == "model" else f"teacher at NFE {what['nfe']}"
    results = gather(refs, [len(c) for c in chunks], f"evaluate: {name}", progress)
    return E.score(*E.merge_chunks(results), ref, pc.run.eval.kid_subset_size)


def identity_of(pc) -> dict:
    """This evaluation's reference identity (hkd_core.evaluation.reference_identity) plus its noise seeds."""
    from hkd_core.inception import weights_digest
    from orchestrator.stages.workers import inception_weights

    e = pc.run.eval
    return {
        **E.reference_identity(pc.run.data, e.split, e.n, weights_digest(inception_weights(pc))),
        "seed": e.seed,
    }


def teacher_identity(pc, teacher_key: str) -> dict:
    """The identity a teacher's scores are cached under: the evaluation's (``identity_of``) plus the sha256 of
    the teacher's weights at ``teacher_key`` (a retrained teacher is another teacher, whatever its config)."""
    return {
        **identity_of(pc),
        "teacher_sha256": hashlib.sha256(make_store(pc.storage).get(teacher_key)).hexdigest(),
    }


def _differs(recorded: dict, want: dict) -> list[str]:
    return [k for k in sorted(set(want) | set(recorded)) if recorded.get(k) != want.get(k)]


def recorded_teacher_scores(pc, ident: dict | None = None) -> tuple[dict[int, dict], dict | None]:
    """The shipped teacher's own scores (its record.json) when they were measured exactly as this evaluation
    would measure them: {nfe: scores} and the noise floor. A record evaluation is reused only when its reference
    identity (data set, split, N, resolution, the reference subset and the sha256 of its images, the Inception
    weights' sha256) and its noise seeds equal this evaluation's (``ident``, default ``identity_of(pc)``); an
    evaluation recorded without an identity (before it was recorded) is never reused."""
    from hkd_core.shipped import find_shipped, same_eval

    shipped = find_shipped(pc.run.data, pc.run.teacher)
    if shipped is None:
        return {}, None
    e = pc.run.eval
    ident = ident or identity_of(pc)
    ev = same_eval(shipped.record, {"n": e.n, "seed": e.seed, "split": e.split, "reference": ident})
    if ev is not None:
        return {int(k): v for k, v in (ev.get("by_nfe") or {}).items()}, ev.get("noise_floor_train_vs_test")
    candidates = [
        ev
        for ev in shipped.record.get("evals") or []
        if (ev.get("n"), ev.get("seed"), ev.get("split")) == (e.n, e.seed, e.split)
    ]
    if not candidates:
        return {}, None
    log.warning(
        "the shipped teacher's record %s holds scores at N=%d, seed %d, split %s, measured against another "
        "reference or other Inception weights (%s differ): not reused; the teacher is sampled again",
        shipped.folder,
        e.n,
        e.seed,
        e.split,
        ", ".join(_differs(candidates[0].get("reference") or {}, ident)),
    )
    return {}, None


def _cache_name(pc, ident: dict, what: str) -> str:
    """teacher-scores/<teacher stage hash>/<what>-n<N>-<hash of the reference identity and seeds>.json"""
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{pc.stages()['teacher']}/{what}-n{ident['n']}-{h}.json"


def cached_scores(pc, ident: dict, what: str, compute) -> dict:
    """Scores of the teacher (``what`` = nfe<k>), of the noise floor (``floor``) or of a model (``model``, its
    weights' sha256 in ``ident``) under this identity: from the cache in storage, else ``compute()`` once and
    cached (written whole: one PUT)."""
    store = make_store(pc.storage, TEACHER_SCORES)
    name = _cache_name(pc, ident, what)
    if store.exists(name):
        cached = json.loads(store.get(name))
        if cached.get("reference") == ident:
            log.info("%s: from the score cache (%s)", what, store.uri(name))
            return cached["scores"]
    scores = compute()
    store.put(name, json.dumps({"reference": ident, "what": what, "scores": scores}, indent=1).encode())
    return scores


def noise_floor(pc, ref, progress: bool = False) -> dict:
    """FID/KID of N real training images against the N reference test images: no generator can be expected
    to score below this at this N."""
    from hkd_core.data import load_images

    e, d = pc.run.eval, pc.run.data
    real, _ = load_images(
        d.name, "train", resolution=d.resolution, limit=e.n, root=d.root, seed=E.REFERENCE_SEED + 1
    )
    stats, feats = image_features(
        pc, real, desc="evaluate: noise floor (real training images)", progress=progress
    )
    return E.score(stats, feats, ref, e.kid_subset_size)


def evaluate(
    pc, model_key: str, teacher_key: str | None, images, adopted: str | None = None, progress: bool = False
) -> dict:
    """FID/KID of the model (NFE 1) and of the teacher at each eval.teacher_nfe, and the noise floor (real
    training images, same N), under their metric names. ``images()`` gives the teacher's data set (loaded only
    when an empirical teacher is sampled). The teacher's scores and the floor come from an adopted teacher's
    record (``adopted``: where from) or from the score cache when they were measured under this evaluation's
    identity (``identity_of``); otherwise they are measured once and cached."""
    import ray

    ref = reference(pc, progress=progress)[0]
    e = pc.run.eval
    ident = identity_of(pc)
    mine = cached_scores(
        pc,
        {**ident, "model_sha256": hashlib.sha256(make_store(pc.storage).get(model_key)).hexdigest()},
        "model",
        lambda: sample_scores(pc, ref, {"kind": "model"}, model_key=model_key, progress=progress),
    )
    metrics = E.model_metrics(mine, e.n)
    recorded, floor = recorded_teacher_scores(pc, ident) if adopted else ({}, None)
    if not floor and e.floor:
        floor = cached_scores(pc, ident, "floor", lambda: noise_floor(pc, ref, progress))
    if floor:
        metrics[M.NOISE_FLOOR_FID] = floor["fid"]
        if floor.get("kid") is not None:
            metrics[M.NOISE_FLOOR_KID] = floor["kid"]
    img_ref = None
    for nfe in e.teacher_nfe:
        if nfe in recorded:
            metrics.update(E.teacher_metrics(recorded[nfe], nfe))
            log.info(
                "teacher at NFE %d: from the shipped teacher's record (N=%d, the same seeds, reference and "
                "Inception weights): FID %.2f",
                nfe,
                e.n,
                recorded[nfe]["fid"],
            )
            continue
        if img_ref is None and pc.run.teacher.kind == "empirical":
            img_ref = ray.put(images())
        if teacher_key and "teacher_sha256" not in ident:
            ident = teacher_identity(pc, teacher_key)

        def measure(nfe=nfe):
            return sample_scores(
                pc,
                ref,
                {"kind": "teacher", "nfe": nfe},
                teacher_key=teacher_key,
                images_ref=img_ref,
                progress=progress,
            )

        metrics.update(E.teacher_metrics(cached_scores(pc, ident, f"nfe{nfe}", measure), nfe))
    full = max(e.teacher_nfe) if e.teacher_nfe else None
    if full is not None and M.teacher_kid(full) in metrics:
        t_kid, t_std = metrics[M.teacher_kid(full)], metrics.get(M.teacher_kid_std(full)) or 0
        if t_kid > t_std:  # within its std of 0 (small N) the teacher's KID makes no ratio: none is logged
            metrics[M.KID_RATIO] = metrics[M.KID] / t_kid
        metrics[M.FID_RATIO] = metrics[M.FID] / metrics[M.teacher_fid(full)]
    return metrics


CANONICAL_IMAGES = (
    512  # test images (a seeded subset, the same for every run) the canonical gauge is measured on
)
SPECTRUM_FILES = ("spectrum.png", "alpha_maps.png", "eigenvalues.npz", "spectrum_gauges.png")


def canonical_images(pc) -> torch.Tensor:
    """The CANONICAL_IMAGES test images that ``hkd_core.gauge.canonical_gauge`` is measured on, the same subset
    for every run of a data set (seed 0), fetched from the bucket where ``storage.data_source`` says so."""
    from hkd_core.data import load_images
    from orchestrator.services.datasets import ensure_local

    d = pc.run.data
    ensure_local(pc.storage, d.name, pc.storage.data_source, d.root)
    return load_images(d.name, "test", resolution=d.resolution, limit=CANONICAL_IMAGES, root=d.root, seed=0)[
        0
    ]


def canonical_spectrum(pc, model) -> list[torch.Tensor]:
    """The model's spectrum in the canonical gauge (issue 24): per level (d/2, h, w) complex, the same model's
    eigenvalues moved along their gauge orbit so that no growth or decay of a mode is the encoder's clock; []
    for a model without Koopman latents. What the evaluate stage logs as ``spectra_canonical/`` and what
    ``hkd compare`` compares by default: two models that differ only by a gauge have the same one."""
    from hkd_core.gauge import canonical_spectrum as canon

    if not model.spectrum():
        return []
    return canon(model.eval(), canonical_images(pc), torch.Generator().manual_seed(0))


def spectrum_metrics(pc, model, canonical: list[torch.Tensor] | None = None) -> dict[str, float]:
    """The spectrum's summaries as trained (``spectra/l<level>/...``) and in the canonical gauge
    (``spectra_canonical/l<level>/...``): the second is the one to compare across runs."""
    from hkd_core.spectra import summarize

    canonical = canonical_spectrum(pc, model) if canonical is None else canonical
    return {**summarize(model.spectrum()), **summarize(canonical, M.SPECTRA_CANONICAL)}


def figures(model, log_artifact, canonical: list[torch.Tensor] | None = None) -> None:
    """Sample grid, spectrum plots, decay-rate maps, band masking, trajectory strip and the raw eigenvalues
    (with ``canonical``, the canonical gauge's too, and both spectra in one plot), handed to
    ``log_artifact(path, folder)`` (spectra/ or figures/)."""
    from hkd_core.figures import plot_spectra_overlay, write_figures

    with tempfile.TemporaryDirectory() as d:
        paths = write_figures(model, Path(d))
        spec = model.spectrum()
        if spec:
            arrays = {f"level{l + 1}": ev.numpy() for l, ev in enumerate(spec)}
            arrays.update({f"canonical_level{l + 1}": ev.numpy() for l, ev in enumerate(canonical or [])})
            np.savez(Path(d) / "eigenvalues.npz", **arrays)
            paths.append(Path(d) / "eigenvalues.npz")
        if spec and canonical:
            paths.append(
                plot_spectra_overlay(
                    {"as trained": spec, "canonical gauge": canonical}, Path(d) / "spectrum_gauges.png"
                )
            )
        for p in paths:
            log_artifact(p, M.SPECTRA if p.name in SPECTRUM_FILES else "figures")


BESIDE = 32  # samples in the side-by-side figure


def beside_teacher(pc, model, teacher_key: str | None, images) -> Path | None:
    """samples_vs_teacher.png: the model at NFE 1 and the teacher at its full NFE (the largest eval.teacher_nfe) on
    the same first BESIDE evaluation seeds, side by side, in a temporary folder; None when no teacher NFE is
    configured. Drawn in the driver: BESIDE x NFE teacher evaluations, seconds on a CPU."""
    e = pc.run.eval
    if not e.teacher_nfe:
        return None
    from hkd_core.figures import save_side_by_side

    nfe = max(e.teacher_nfe)
    x_T = E.noise(E.eval_seeds(e, BESIDE), E.image_shape(pc.run.data))
    teacher = workers.load_teacher(pc, images() if pc.run.teacher.kind == "empirical" else None, teacher_key)
    dev = next(model.parameters()).device
    with torch.no_grad():
        mine = E.model_generator(model)(x_T.to(dev)).clamp(-1, 1).cpu()
        theirs = E.teacher_generator(teacher, nfe)(x_T.to(workers.worker_device())).cpu()
    path = Path(tempfile.mkdtemp()) / "samples_vs_teacher.png"
    return save_side_by_side(mine, theirs, path, ("HKD, NFE 1", f"teacher, NFE {nfe}"))

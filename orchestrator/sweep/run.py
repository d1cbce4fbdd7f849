"""Sweeps: Ray Tune + Optuna (TPE, define-by-run) over HKD's Koopman subspace dims and scale counts.

The driver runs the shared stages once (teacher, trajectories), then a Tune function trainable per trial
drives a Ray Train V2 ``TorchTrainer`` whose rank 0 reports the sweep's metric at every checkpoint
through ``TuneReportCallback``; ASHA stops trials on those reports (time = kimg). Each trial has an MLflow
child run under the sweep's run, keyed by sweep and trial id, so a resumed sweep reopens instead of
duplicating. The Optuna study lives in a database (SQLite beside the local stack, or any SQLAlchemy URL),
the Tune experiment in S3; ``hkd sweep X.yaml --resume SWEEP_ID`` continues both.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from pathlib import Path

import torch

from hkd_core import metric_names as M
from orchestrator import identity
from orchestrator.analysis.editing import load_model
from orchestrator.config import compose, from_composed
from orchestrator.services.rayfs import ray_storage
from orchestrator.services.registry import register_sweep_best
from orchestrator.services.storage import make_store, store_at
from orchestrator.services.tracking import Tracker
from orchestrator.stages import trainer, workers
from orchestrator.stages.context import dataset_inputs
from orchestrator.stages.driver import context, init_ray, run_stages
from orchestrator.stages.evaluation import REFERENCES, reference, spectrum_metrics
from orchestrator.stages.steps import fit_distill, tag_compute
from orchestrator.sweep import asha
from orchestrator.sweep.closing import close_trial_runs
from orchestrator.sweep.results import publish, summarize_sweep
from orchestrator.sweep.snapshots import set_snapshot_period
from orchestrator.sweep.spec import SweepError, SweepSpec, check_against_config, define_by_run, overrides_for

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the checkout (its .stack/ holds the local Optuna study)


def study_url(spec: SweepSpec, pc=None, sweep_id: str | None = None) -> str:
    """Where the Optuna study lives: ``study_storage`` if set (any SQLAlchemy URL); with S3 storage, an SQLite
    file in this machine's cache that ``study_mirror`` keeps in the bucket; else SQLite beside the local stack."""
    if spec.study_storage:
        return spec.study_storage
    if pc is not None and sweep_id and pc.storage.kind == "s3":
        from hkd_core.data import cache_dir

        return f"sqlite:///{cache_dir() / 'optuna' / f'{sweep_id}.db'}"
    folder = Path(os.environ.get("HKD_STACK_DIR", ROOT / ".stack"))
    if not folder.is_dir():
        from hkd_core.data import cache_dir

        folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def study_mirror(spec: SweepSpec, pc, sweep_id: str):
    """The bucket's copy of the study's SQLite file (sweeps/<id>/optuna.db), when there is one to keep."""
    from orchestrator.sweep.search import StudyMirror

    url = study_url(spec, pc, sweep_id)
    if spec.study_storage or pc.storage.kind != "s3":
        return None
    local = Path(url.removeprefix("sqlite:///"))
    local.parent.mkdir(parents=True, exist_ok=True)
    return StudyMirror(pc.storage, f"sweeps/{sweep_id}/optuna.db", local)


def concurrency(spec: SweepSpec, cluster=None) -> tuple[int, str]:
    """Trials at once, and what it was sized from: ``max_concurrency`` if set; else what the cluster holds at its
    largest (``cluster.max_cpus`` / ``max_gpus``: an autoscaling cluster grows to meet the pending trials) or,
    without those, what it holds now; each trial being its workers plus one CPU for the trial's own process
    (which drives the trainer and the final evaluation)."""
    if spec.max_concurrency:
        return min(spec.max_concurrency, spec.trials), "max_concurrency"
    if cluster is not None and (cluster.max_cpus or cluster.max_gpus):
        import ray

        now = ray.cluster_resources() if ray.is_initialized() else {}
        res = {"CPU": cluster.max_cpus or now.get("CPU", 1), "GPU": cluster.max_gpus or now.get("GPU", 0)}
        source = (
            f"the cluster at its largest (cluster.max_cpus={cluster.max_cpus}, "
            f"cluster.max_gpus={cluster.max_gpus})"
        )
    else:
        import ray

        res = ray.cluster_resources()
        source = f"the cluster now ({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs)"
    r = spec.resources
    by_cpu = int(res.get("CPU", 1) // (r.workers * r.cpus_per_worker + 1))
    by_gpu = int(res.get("GPU", 0) // (r.workers * r.gpus_per_worker)) if r.gpus_per_worker else by_cpu
    return max(1, min(by_cpu, by_gpu, spec.trials)), source


def trial_fn(params: dict, ctx: dict) -> None:
    """One trial: distil with the sampled params on Ray Train, report to Tune, evaluate, log to MLflow."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hkd_core.models import model_record

    trial_id = tune.get_context().get_trial_id()
    # Tune hands over Optuna's per-suggestion values too (model.subspace_dims.l1, ...): keep the config keys
    params = {k: v for k, v in params.items() if k in ctx["space_keys"]}
    r = ctx["resources"]
    over = (
        ctx["base"]
        + overrides_for(params)
        + [
            f"train.checkpoint_every_kimg={ctx['report']['every_kimg']}",
            f"cluster.num_workers={r['workers']}",
        ]
    )
    pc = from_composed(compose(over))  # composed once, here on the trial's driver; its workers get pc itself
    results = make_store(pc.storage, f"sweeps/{ctx['sweep_id']}/{trial_id}")
    if results.exists("final.json"):
        # finished before the driver went down, but Tune's snapshot did not know yet: report, don't redo
        tune.report(json.loads(results.get("final.json")))
        return
    tracker = Tracker(pc.tracking)
    run_id = tracker.open_run(
        identity.sweep_run_key(ctx["sweep_id"], trial_id),
        f"{ctx['sweep_id']}-{trial_id}",
        ctx["sweep_run_id"],
        {
            "hkd.sweep_id": ctx["sweep_id"],
            "hkd.trial_id": trial_id,
            "hkd.stage": "trial",
            "hkd.config_hash": pc.stages()["distill"],
            "hkd.trajectories_uri": ctx["traj_uri"],
        },
    )
    # a trial that runs (again) is not stopped: a stop recorded before the driver died, which Tune's snapshot did
    # not know of when the sweep resumed, no longer holds (the close at its end records how it ends this time)
    tracker.delete_tags(
        run_id, ("hkd.stopped_early", "hkd.end_reason", "hkd.stopped_at_kimg", "hkd.closed_at")
    )
    tracker.log_params(run_id, {**pc.run.to_dict(), "sweep": {"params": json.dumps(params, sort_keys=True)}})
    tracker.log_inputs(
        run_id, dataset_inputs(pc, "distill", ctx["traj_uri"])
    )  # the Dataset column, as a stage's
    try:
        model, state, _, _ = (
            fit_distill(  # the distill stage's own fit, with the trial's workers; (1) to Tune
                pc,
                run_id,
                {
                    "trajectories_prefix": ctx["traj_prefix"],
                    "eval": ctx["eval"],
                    "teacher_key": ctx.get("teacher_key"),
                    "skip_shards": ctx.get("skip_shards", []),
                    "shards_checked": "skip_shards" in ctx,
                },
                f"{ctx['sweep_id']}-{trial_id}",
                subdir="sweeps-train",
                workers=trainer.Workers(r["workers"], r["cpus_per_worker"], r["gpus_per_worker"]),
                callbacks=[TuneReportCallback()],
                num_to_keep=1,
            )
        )
    except Exception:
        # When ASHA stops this trial, Tune tears the actor down and fit() may raise here before the process
        # goes: the driver's close_trial_runs decides from Tune's own record, so only a still-open run is marked
        if tracker.run_data(run_id).info.status == "RUNNING":
            tracker.end(run_id, "FAILED")
        raise
    final = final_metrics(pc, model, ctx)
    final.update(spectrum_metrics(pc, model))  # as trained and in the canonical gauge
    tracker.log_metrics(run_id, final, int(state["nimg"]))
    buf = io.BytesIO()
    torch.save(model_record(model), buf)
    results.put("model.pt", buf.getvalue())
    tracker.set_tags(run_id, {"hkd.model_uri": results.uri("model.pt")})  # what `hkd compare SWEEP_ID` loads
    tag_compute(tracker, run_id, state.get("compute", []))
    metric = ctx["metric"]
    report = {
        metric: final[metric],
        "kimg": state["nimg"] / 1000,
        "final": 1.0,
        **{k: v for k, v in final.items() if k.startswith(M.EVAL_PREFIX)},
    }
    tracker.end(run_id)
    results.put("final.json", json.dumps(report).encode())  # from here on the trial counts as done
    tune.report(report)  # (2) final value


def check_trial_shards(pc, prefix: str) -> dict[str, str]:
    """Every trajectory shard the trials will read, checked once by the sweep's driver before any trial starts
    (HEAD requests): a bad shard is one error naming it (ShardError), or with train.skip_corrupt_shards a
    shard every trial leaves out ({key: problem})."""
    from hkd_core.trajectories import check_shards, read_manifest

    store = make_store(pc.storage, prefix)
    skip = check_shards(store, read_manifest(store), skip_corrupt=pc.run.train.skip_corrupt_shards)
    for why in skip.values():
        log.warning("sweep: every trial skips a shard (train.skip_corrupt_shards=true): %s", why)
    return skip


def final_metrics(pc, model, ctx: dict) -> dict:
    """The evaluate stage's scores on the same seeds (hkd_core.evaluation), drawn in the trial's process, and
    the error against the teacher on held-out noise."""
    from hkd_core import evaluation as E
    from hkd_core.fid import InceptionFeatures, decode_reference
    from hkd_core.trajectories import load_all, read_manifest

    hold = make_store(pc.storage, ctx["eval"]["holdout_prefix"])
    out = {M.MSE_VS_TEACHER: E.holdout_error(model, load_all(hold, read_manifest(hold))[0])}
    if ctx.get("final_reference_key"):
        e = pc.run.eval
        feats = InceptionFeatures(workers.inception_weights(pc), batch_size=e.batch_size)
        ref = decode_reference(make_store(pc.storage, REFERENCES).get(ctx["final_reference_key"]))
        s = E.score_in_process(
            E.model_generator(model),
            E.eval_seeds(e),
            E.image_shape(pc.run.data),
            feats,
            ref,
            e.kid_subset_size,
            e.batch_size,
        )
        out.update({M.FID: s["fid"], M.KID: s["kid"], M.EVAL_N: float(e.n)})
    return out


def run_sweep(
    spec: SweepSpec,
    cli_overrides: list[str],
    resume: str | None = None,
    progress: bool = True,
    sweep_id: str | None = None,
) -> dict:
    spec = dataclasses.replace(spec, base=spec.base + list(cli_overrides))
    base_cfg = check_against_config(spec, compose)  # the YAML against the config, before any work
    pc = from_composed(base_cfg)
    sweep_id = resume or sweep_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(pc)
    tracker = Tracker(pc.tracking)
    sweep_run = tracker.open_run(
        identity.sweep_run_key(sweep_id),
        sweep_id,
        None,
        {"hkd.sweep_id": sweep_id, "hkd.stage": "sweep", "hkd.sweep_spec": spec.source},
    )
    tracker.log_params(
        sweep_run,
        {
            "sweep": {
                "base": json.dumps(spec.base),
                "metric": spec.metric,
                "mode": spec.mode,
                "trials": spec.trials,
                "space": json.dumps(spec.space),
            }
        },
    )
    base = context(pc, progress, tracker=tracker)
    tracker.end(base.parent_run_id)  # the base pipeline run only records lineage; stages nest under the sweep
    ctx = context(pc, progress, parent=sweep_run, tracker=tracker)
    shared = run_stages(pc, "trajectories", progress, ctx=ctx)
    traj_prefix = ctx.prefix("trajectories")
    skip = check_trial_shards(pc, f"{traj_prefix}/train")
    trial_eval = {
        "metric": spec.metric,
        "fid_n": spec.report.fid_n,
        "holdout_prefix": f"{traj_prefix}/holdout",
    }
    if spec.metric in (M.FID, M.KID):
        trial_eval["reference_key"] = reference(pc, spec.report.fid_n)[1]
    trial_ctx = {
        "sweep_id": sweep_id,
        "sweep_run_id": sweep_run,
        "base": spec.base,
        "report": dataclasses.asdict(spec.report),
        "metric": spec.metric,
        "resources": dataclasses.asdict(spec.resources),
        "traj_prefix": f"{traj_prefix}/train",
        "traj_uri": shared["trajectories"]["train"]["uri"],
        "eval": trial_eval,
        "final_reference_key": reference(pc)[1],
        "space_keys": sorted(spec.space),
        "teacher_key": shared["teacher"].get("teacher_key"),
        "skip_shards": sorted(skip),
    }
    from ray import tune

    results = tuner(spec, pc, sweep_id, tune.with_parameters(trial_fn, ctx=trial_ctx), resume).fit()
    mirror = study_mirror(spec, pc, sweep_id)
    if mirror is not None:
        mirror.push()  # the study as the sweep left it
    summary = summarize_sweep(spec, sweep_id, results, pc.run.train.total_kimg, pc)
    close_trial_runs(tracker, sweep_id, summary)
    publish(tracker, sweep_run, spec, sweep_id, summary, pc, base_cfg)
    summary["champion"] = register_sweep_best(
        tracker, summary, pc.tracking.register_model, lambda uri: load_model(pc, uri)[0]
    )
    tracker.end(sweep_run)
    summary.update(
        {"_sweep_run_id": sweep_run, "_tracking_uri": tracker.uri, "_experiment_id": tracker.experiment_id}
    )
    return summary


def search_alg(spec: SweepSpec, pc, sweep_id: str, mirror=None):
    """Optuna's TPE behind Tune, seeded by ``spec.seed``, over the spec's define-by-run space, its study in
    ``study_url``: the same seed and the same results give the same trials."""
    import optuna

    from orchestrator.sweep.search import ResumableOptunaSearch

    return ResumableOptunaSearch(
        space=define_by_run(spec, pc.run.hkd_config().levels),
        metric=spec.metric,
        mode=spec.mode,
        study_name=sweep_id,
        storage=optuna.storages.RDBStorage(study_url(spec, pc, sweep_id)),
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
        mirror=mirror,
    )


def tuner(spec: SweepSpec, pc, sweep_id: str, trainable, resume: str | None = None):
    """A new Tuner (Optuna's TPE seeded by ``spec.seed``, ASHA over kimg or FIFO, ``spec.mode``, the
    concurrency from ``concurrency``), or the stopped sweep's, restored from storage. ``trainable`` is the
    sweep's trial function (``trial_fn`` bound to its context) or, in the tests, a toy objective that
    reports ``{spec.metric: ..., "kimg": ...}`` as a trial does."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from orchestrator.sweep.callbacks import StoppedTrialCloserCallback

    trainable = tune.with_resources(trainable, {"cpu": 1})
    period = set_snapshot_period(spec.trials)  # often, but in proportion to the trials (above)
    log.info("sweep %s: Tune's experiment state every %s s", sweep_id, period)
    path, fs = ray_storage(pc.storage)
    tune_path = f"{path}/sweeps"
    mirror = study_mirror(spec, pc, sweep_id)
    if resume:
        if not tune.Tuner.can_restore(f"{tune_path}/{sweep_id}", storage_filesystem=fs):
            raise SweepError(
                f"--resume {sweep_id}: no sweep of that id under {store_at(pc.storage, tune_path).uri('')}/;"
                f" the ids are the MLflow sweep runs' names (tag hkd.sweep_id)"
            )
        if mirror is not None:
            mirror.pull()  # a new head (or another machine): the study from the bucket
        log.info("sweep %s: resuming from %s/%s", sweep_id, tune_path, sweep_id)
        return tune.Tuner.restore(
            f"{tune_path}/{sweep_id}",
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
    total = pc.run.train.total_kimg
    sched = spec.scheduler
    scheduler = (
        asha.scheduler(total, sched.grace_period_kimg, sched.reduction_factor)
        if sched.type == "asha"
        else FIFOScheduler()
    )
    searcher = search_alg(spec, pc, sweep_id, mirror)
    conc, sized = concurrency(spec, pc.cluster)
    log.info(
        "sweep %s: %d trials, %d at a time (from %s), metric %s (%s), study %s",
        sweep_id,
        spec.trials,
        conc,
        sized,
        spec.metric,
        spec.mode,
        mirror.uri if mirror else study_url(spec, pc, sweep_id).split("://")[0],
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.trials,
            max_concurrent_trials=conc,
        ),
        run_config=tune.RunConfig(
            name=sweep_id,
            storage_path=tune_path,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[StoppedTrialCloserCallback(pc.tracking, sweep_id)],
        ),
    )

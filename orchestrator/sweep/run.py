"""Sweeps: Ray Tune + Optuna (TPE, define-by-run) over HKD's Koopman subspace dims and scale counts.

The driver runs the shared stages once (teacher, trajectories), then a Tune function trainable per trial
drives a Ray Train V2 ``TorchTrainer`` whose rank 0 reports the sweep's metric at every checkpoint
through ``TuneReportCallback``; ASHA stops trials on those reports (time = kimg). Each trial has an MLflow
child run under the sweep's run, keyed by sweep and trial id, so a resumed sweep reopens instead of
duplicating. The Optuna study lives in a database (SQLite beside the local stack, or any SQLAlchemy URL),
the Tune experiment in S3; ``hkd sweep X.yaml --resume SWEEP_ID`` continues both.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from hkd_core import metric_names as M
from orchestrator import identity
from orchestrator.analysis.editing import load_model
from orchestrator.config import compose, from_composed, user_conf_dir
from orchestrator.services.rayfs import ray_storage
from orchestrator.services.registry import register_sweep_best
from orchestrator.services.storage import make_store, store_at
from orchestrator.services.tracking import Tracker
from orchestrator.stages import trainer, workers
from orchestrator.stages.context import dataset_inputs
from orchestrator.stages.driver import context, init_ray, run_stages
from orchestrator.stages.evaluation import REFERENCES, reference, spectrum_metrics
from orchestrator.sweep import asha
from orchestrator.sweep.closing import end_stopped_run
from orchestrator.sweep.spec import SweepError, SweepSpec, check_against_config, define_by_run, overrides_for

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]     # the checkout (its .stack/ holds the local Optuna study)


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
        source = (f"the cluster at its largest (cluster.max_cpus={cluster.max_cpus}, "
                  f"cluster.max_gpus={cluster.max_gpus})")
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

    from hkd_core.models import build_model, model_record

    trial_id = tune.get_context().get_trial_id()
    # Tune hands over Optuna's per-suggestion values too (model.subspace_dims.l1, ...): keep the config keys
    params = {k: v for k, v in params.items() if k in ctx["space_keys"]}
    r = ctx["resources"]
    over = ctx["base"] + overrides_for(params) + [f"train.checkpoint_every_kimg={ctx['report']['every_kimg']}",
                                                  f"cluster.num_workers={r['workers']}"]
    pc = from_composed(compose(over))      # composed once, here on the trial's driver; its workers get pc itself
    results = make_store(pc.storage, f"sweeps/{ctx['sweep_id']}/{trial_id}")
    if results.exists("final.json"):
        # finished before the driver went down, but Tune's snapshot did not know yet: report, don't redo
        tune.report(json.loads(results.get("final.json")))
        return
    tracker = Tracker(pc.tracking)
    run_id = tracker.open_run(identity.sweep_run_key(ctx["sweep_id"], trial_id), f"{ctx['sweep_id']}-{trial_id}",
                              ctx["sweep_run_id"],
                              {"hkd.sweep_id": ctx["sweep_id"], "hkd.trial_id": trial_id, "hkd.stage": "trial",
                               "hkd.config_hash": pc.stages()["distill"], "hkd.trajectories_uri": ctx["traj_uri"]})
    # a trial that runs (again) is not stopped: a stop recorded before the driver died, which Tune's snapshot did
    # not know of when the sweep resumed, no longer holds (the close at its end records how it ends this time)
    tracker.delete_tags(run_id, ("hkd.stopped_early", "hkd.end_reason", "hkd.stopped_at_kimg", "hkd.closed_at"))
    tracker.log_params(run_id, {**pc.run.to_dict(), "sweep": {"params": json.dumps(params, sort_keys=True)}})
    tracker.log_inputs(run_id, dataset_inputs(pc, "distill", ctx["traj_uri"]))     # the Dataset column, as a stage's
    t = trainer.make_trainer(pc, workers.distill_loop,
                             {"pipeline": pc, "run_id": run_id, "trajectories_prefix": ctx["traj_prefix"],
                              "eval": ctx["eval"], "teacher_key": ctx.get("teacher_key")},
                             f"{ctx['sweep_id']}-{trial_id}", subdir="sweeps-train",
                             workers=trainer.Workers(r["workers"], r["cpus_per_worker"], r["gpus_per_worker"]),
                             callbacks=[TuneReportCallback()], num_to_keep=1)                      # (1) to Tune
    try:
        result, _ = trainer.fit(t)
    except Exception:
        # When ASHA stops this trial, Tune tears the actor down and fit() may raise here before the process
        # goes: the driver's close_trial_runs decides from Tune's own record, so only a still-open run is marked
        if tracker.run_data(run_id).info.status == "RUNNING":
            tracker.end(run_id, "FAILED")
        raise
    state = trainer.checkpoint_state(result)
    model = build_model(pc.run.model.variant, pc.run.hkd_config())
    model.load_state_dict(state["ema"])
    model.eval()
    final = final_metrics(pc, model, ctx)
    final.update(spectrum_metrics(pc, model))       # as trained and in the canonical gauge
    tracker.log_metrics(run_id, final, int(state["nimg"]))
    buf = io.BytesIO()
    torch.save(model_record(model), buf)
    results.put("model.pt", buf.getvalue())
    tracker.set_tags(run_id, {"hkd.model_uri": results.uri("model.pt")})      # what `hkd compare SWEEP_ID` loads
    metric = ctx["metric"]
    report = {metric: final[metric], "kimg": state["nimg"] / 1000, "final": 1.0,
              **{k: v for k, v in final.items() if k.startswith(M.EVAL_PREFIX)}}
    tracker.end(run_id)
    results.put("final.json", json.dumps(report).encode())     # from here on the trial counts as done
    tune.report(report)                                                                        # (2) final value


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
        s = E.score_in_process(E.model_generator(model), E.eval_seeds(e), E.image_shape(pc.run.data), feats, ref,
                               e.kid_subset_size, e.batch_size)
        out.update({M.FID: s["fid"], M.KID: s["kid"], M.EVAL_N: float(e.n)})
    return out


def run_sweep(spec: SweepSpec, cli_overrides: list[str], resume: str | None = None, progress: bool = True,
              sweep_id: str | None = None) -> dict:
    spec = dataclasses.replace(spec, base=spec.base + list(cli_overrides))
    base_cfg = check_against_config(spec, compose)          # the YAML against the config, before any work
    pc = from_composed(base_cfg)
    sweep_id = resume or sweep_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(pc)
    tracker = Tracker(pc.tracking)
    sweep_run = tracker.open_run(identity.sweep_run_key(sweep_id), sweep_id, None,
                                 {"hkd.sweep_id": sweep_id, "hkd.stage": "sweep", "hkd.sweep_spec": spec.source})
    tracker.log_params(sweep_run, {"sweep": {"base": json.dumps(spec.base), "metric": spec.metric, "mode": spec.mode,
                                             "trials": spec.trials, "space": json.dumps(spec.space)}})
    base = context(pc, progress, tracker=tracker)
    tracker.end(base.parent_run_id)       # the base pipeline run only records lineage; stages nest under the sweep
    ctx = context(pc, progress, parent=sweep_run, tracker=tracker)
    shared = run_stages(pc, "trajectories", progress, ctx=ctx)
    traj_prefix = ctx.prefix("trajectories")
    trial_eval = {"metric": spec.metric, "fid_n": spec.report.fid_n, "holdout_prefix": f"{traj_prefix}/holdout"}
    if spec.metric in (M.FID, M.KID):
        trial_eval["reference_key"] = reference(pc, spec.report.fid_n)[1]
    trial_ctx = {"sweep_id": sweep_id, "sweep_run_id": sweep_run, "base": spec.base, "report": dataclasses.asdict(
        spec.report), "metric": spec.metric, "resources": dataclasses.asdict(spec.resources),
        "traj_prefix": f"{traj_prefix}/train", "traj_uri": shared["trajectories"]["train"]["uri"],
        "eval": trial_eval, "final_reference_key": reference(pc)[1], "space_keys": sorted(spec.space),
        "teacher_key": shared["teacher"].get("teacher_key")}
    results = _tuner(spec, pc, sweep_id, trial_ctx, resume).fit()
    mirror = study_mirror(spec, pc, sweep_id)
    if mirror is not None:
        mirror.push()                  # the study as the sweep left it
    summary = summarize_sweep(spec, sweep_id, results, pc.run.train.total_kimg, pc)
    close_trial_runs(tracker, sweep_id, summary)
    publish(tracker, sweep_run, spec, sweep_id, summary, pc, base_cfg)
    summary["champion"] = register_sweep_best(tracker, summary, pc.tracking.register_model,
                                              lambda uri: load_model(pc, uri)[0])
    tracker.end(sweep_run)
    summary.update({"_sweep_run_id": sweep_run, "_tracking_uri": tracker.uri, "_experiment_id": tracker.experiment_id})
    return summary


def _tuner(spec: SweepSpec, pc, sweep_id: str, trial_ctx: dict, resume: str | None):
    """A new Tuner (Optuna's TPE, ASHA over kimg), or the stopped sweep's, restored from storage."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from orchestrator.sweep.callbacks import StoppedTrialCloserCallback
    from orchestrator.sweep.search import ResumableOptunaSearch

    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=trial_ctx), {"cpu": 1})
    # snapshot the experiment state often, so that a killed driver loses at most a second of bookkeeping
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    path, fs = ray_storage(pc.storage)
    tune_path = f"{path}/sweeps"
    mirror = study_mirror(spec, pc, sweep_id)
    if resume:
        if not tune.Tuner.can_restore(f"{tune_path}/{sweep_id}", storage_filesystem=fs):
            raise SweepError(f"--resume {sweep_id}: no sweep of that id under {store_at(pc.storage, tune_path).uri('')}/;"
                             f" the ids are the MLflow sweep runs' names (tag hkd.sweep_id)")
        if mirror is not None:
            mirror.pull()              # a new head (or another machine): the study from the bucket
        log.info("sweep %s: resuming from %s/%s", sweep_id, tune_path, sweep_id)
        return tune.Tuner.restore(f"{tune_path}/{sweep_id}", trainable, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=fs)
    total = pc.run.train.total_kimg
    sched = spec.scheduler
    scheduler = (asha.scheduler(total, sched.grace_period_kimg, sched.reduction_factor) if sched.type == "asha"
                 else FIFOScheduler())
    searcher = ResumableOptunaSearch(space=define_by_run(spec, pc.run.hkd_config().levels), metric=spec.metric,
                                     mode=spec.mode, study_name=sweep_id,
                                     storage=optuna.storages.RDBStorage(study_url(spec, pc, sweep_id)),
                                     sampler=optuna.samplers.TPESampler(seed=spec.seed), mirror=mirror)
    conc, sized = concurrency(spec, pc.cluster)
    log.info("sweep %s: %d trials, %d at a time (from %s), metric %s (%s), study %s", sweep_id, spec.trials, conc,
             sized, spec.metric, spec.mode, mirror.uri if mirror else study_url(spec, pc, sweep_id).split("://")[0])
    return tune.Tuner(trainable, tune_config=tune.TuneConfig(
        search_alg=searcher, scheduler=scheduler, metric=spec.metric, mode=spec.mode, num_samples=spec.trials,
        max_concurrent_trials=conc),
        run_config=tune.RunConfig(name=sweep_id, storage_path=tune_path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  callbacks=[StoppedTrialCloserCallback(pc.tracking, sweep_id)]))



def close_trial_runs(tracker: Tracker, sweep_id: str, summary: dict) -> dict[str, str]:
    """End every trial's MLflow child run the way Tune's record says it ended, once Tune is done. A trial ASHA
    stopped never reaches its own ``end`` (Tune stops its actor), or its process saw the stop as an error in
    ``fit`` and marked the run FAILED; one that a resumed sweep does not continue was left open by the driver
    that died. Stopped early: status KILLED with ``hkd.stopped_early=true`` and the kimg it reached; errored:
    FAILED; a run Tune no longer knows: KILLED with ``hkd.end_reason``. Returns trial -> status for the runs
    it changed."""
    rows = {r["trial_id"]: r for r in summary["rows"]}
    runs = tracker.search(f"tags.`hkd.sweep_id` = '{sweep_id}' and tags.`hkd.stage` = 'trial'")
    closed = {}
    for run in runs:
        if run.info.status not in ("RUNNING", "FAILED"):
            continue
        trial = run.data.tags.get("hkd.trial_id", "?")
        row = rows.get(trial)
        stopped = row is not None and row["status"].startswith("stopped")
        if run.info.status == "FAILED" and not stopped:
            continue                     # a real failure (or one Tune's record cannot overrule): left as it is
        if stopped:
            end_stopped_run(tracker, run.info.run_id, row["kimg"], "sweep end")
            closed[trial] = "KILLED"
            continue
        elif row is not None and row["status"] == "error":
            tracker.set_tags(run.info.run_id, {"hkd.end_reason": "error"})
            status = "FAILED"
        elif row is not None and row["status"] == "completed":
            status = "FINISHED"          # finished, but the driver died before the run's own end reached MLflow
        else:
            tracker.set_tags(run.info.run_id, {"hkd.stopped_early": "true",
                                               "hkd.end_reason": "not continued by the sweep (--resume)"})
            status = "KILLED"
        tracker.end(run.info.run_id, status)
        closed[trial] = status
    if closed:
        log.info("sweep %s: closed %d trial runs (%s)", sweep_id, len(closed),
                 ", ".join(f"{t} {s}" for t, s in sorted(closed.items())))
    return closed


def summarize_sweep(spec: SweepSpec, sweep_id: str, results, total_kimg: float, pc) -> dict:
    rows = []
    for r in results:
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items() if k in spec.space}
        kimg = float(m.get("kimg", 0.0))
        status = "error" if r.error else ("completed" if m.get("final") else "stopped early (ASHA)")
        rows.append({"trial_id": m.get("trial_id", r.path.rsplit("/", 1)[-1] if r.path else "?"), "status": status,
                     "kimg": kimg, "metric": m.get(spec.metric), "params": params,
                     "fid": m.get(M.FID), "kid": m.get(M.KID), "eval_n": m.get(M.EVAL_N),
                     "mse_vs_teacher": m.get(M.MSE_VS_TEACHER)})
    sign = 1 if spec.mode == "min" else -1
    for r in rows:      # a completed trial whose metric is NaN or inf is no candidate: it would sort anywhere
        if r["status"] == "completed" and not _finite(r["metric"]):
            r["status"] = f"completed, {spec.metric} not finite"
    done = [r for r in rows if r["status"] == "completed"]
    done.sort(key=lambda r: (sign * r["metric"], str(r["trial_id"])))     # ties: by trial id, not by input order
    return {"sweep_id": sweep_id, "metric": spec.metric, "mode": spec.mode, "rows": rows, "ranked": done,
            "best": done[0] if done else None, "total_kimg": total_kimg}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def to_markdown(summary: dict) -> str:
    m = summary["metric"]
    lines = [f"# Sweep {summary['sweep_id']}: {m} ({summary['mode']})", "",
             f"| rank | trial | status | kimg | {m} | FID | MSE vs teacher | params |", "|---:|---|---|---:|---:|---:|---:|---|"]
    ranked = summary["ranked"] + [r for r in summary["rows"] if r not in summary["ranked"]]
    for i, r in enumerate(ranked, 1):
        f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"  # noqa: E731
        lines.append(f"| {i if r in summary['ranked'] else '-'} | {r['trial_id']} | {r['status']} | {r['kimg']:.3g} | "
                     f"{f(r['metric'])} | {f(r['fid'])} | {f(r['mse_vs_teacher'])} | "
                     f"{json.dumps(r['params'], sort_keys=True)} |")
    return "\n".join(lines) + "\n"


def best_preset(summary: dict, base_cfg: dict) -> str | None:
    """The best trial's full method config as a Hydra experiment preset (`hkd pipeline experiment=<name>`)."""
    import yaml

    best = summary["best"]
    if best is None:
        return None
    params = best["params"]
    cfg = json.loads(json.dumps(base_cfg))
    for k, v in params.items():
        node = cfg
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    core = {k: cfg[k] for k in ("data", "teacher", "trajectories", "model", "train", "eval")}
    header = (f"# @package _global_\n# Best trial of sweep {summary['sweep_id']} ({summary['metric']} = "
              f"{best['metric']:.4g}, {summary['mode']}), written by `hkd sweep`.\n")
    return header + yaml.safe_dump(core, sort_keys=False)


def publish(tracker: Tracker, run_id: str, spec: SweepSpec, sweep_id: str, summary: dict, pc, base_cfg: dict) -> None:
    """Summary table (markdown + CSV), the best config as an experiment preset, metrics on the sweep run."""
    tracker.log_text(run_id, to_markdown(summary), "summary/trials.md")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", "status", "kimg", spec.metric, "fid", "mse_vs_teacher", "params"])
    for r in summary["rows"]:
        w.writerow([r["trial_id"], r["status"], r["kimg"], r["metric"], r["fid"], r["mse_vs_teacher"],
                    json.dumps(r["params"], sort_keys=True)])
    tracker.log_text(run_id, buf.getvalue(), "summary/trials.csv")
    stopped = sum(r["status"].startswith("stopped") for r in summary["rows"])
    tracker.log_metrics(run_id, {M.SWEEP_TRIALS: len(summary["rows"]), M.SWEEP_STOPPED_EARLY: stopped,
                                 M.SWEEP_COMPLETED: len(summary["ranked"])}, 0)
    preset = best_preset(summary, base_cfg)
    if preset:
        name = f"sweep_{sweep_id.replace('-', '_')}"
        tracker.log_metrics(run_id, {M.sweep_best(spec.metric): summary["best"]["metric"]}, 0)
        tracker.log_text(run_id, preset, f"summary/experiment_{name.removeprefix('sweep_')}.yaml")
        tracker.set_tags(run_id, {"hkd.best_params": json.dumps(summary["best"]["params"], sort_keys=True)})
        make_store(pc.storage, f"sweeps/{sweep_id}").put("best_experiment.yaml", preset.encode())
        summary["preset"], summary["preset_path"] = name, str(write_preset(name, preset))


def write_preset(name: str, text: str) -> Path:
    """An experiment preset in the user's config folder ($HKD_USER_CONF, default ./conf; on Hydra's search path),
    never inside the installed package: ``hkd pipeline experiment=<name>`` then finds it."""
    from hkd_core.checkpoint import atomic_write_bytes

    path = user_conf_dir() / "experiment" / f"{name}.yaml"
    atomic_write_bytes(path, text.encode())
    return path

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

from .config import compose, from_composed
from .pipeline import context, init_ray, run_stages
from .stages import StageContext, reference
from .storage import S3Store, ray_storage
from .sweep_spec import SweepError, SweepSpec, check_against_config, define_by_run, overrides_for
from .tracking import Tracker
from . import workers

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def study_url(spec: SweepSpec) -> str:
    if spec.study_storage:
        return spec.study_storage
    folder = Path(os.environ.get("HKD_STACK_DIR", ROOT / ".stack"))
    if not folder.is_dir():
        folder = Path(os.environ.get("HKD_CACHE", Path.home() / ".cache" / "hkd"))
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def concurrency(spec: SweepSpec) -> int:
    """Trials at once: what the cluster's CPUs (and GPUs) hold, each trial being its workers plus one CPU
    for the trial's own process (which drives the trainer and the final evaluation)."""
    import ray

    if spec.max_concurrency:
        return min(spec.max_concurrency, spec.trials)
    res = ray.cluster_resources()
    r = spec.resources
    by_cpu = int(res.get("CPU", 1) // (r.workers * r.cpus_per_worker + 1))
    by_gpu = int(res.get("GPU", 0) // (r.workers * r.gpus_per_worker)) if r.gpus_per_worker else by_cpu
    return max(1, min(by_cpu, by_gpu, spec.trials))


def trial_fn(params: dict, ctx: dict) -> None:
    """One trial: distil with the sampled params on Ray Train, report to Tune, evaluate, log to MLflow."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from hkd_core.models import build_model, model_record
    from hkd_core.spectra import summarize

    trial_id = tune.get_context().get_trial_id()
    # Tune hands over Optuna's per-suggestion values too (model.subspace_dims.l1, ...): keep the config keys
    params = {k: v for k, v in params.items() if k in ctx["space_keys"]}
    spec_report, metric = ctx["report"], ctx["metric"]
    over = ctx["base"] + overrides_for(params) + [f"train.checkpoint_every_kimg={spec_report['every_kimg']}",
                                                  f"cluster.num_workers={ctx['workers']}"]
    cfg = compose(over)
    pc = from_composed(cfg)
    results = S3Store(pc.storage, f"sweeps/{ctx['sweep_id']}/{trial_id}")
    if results.exists("final.json"):
        # finished before the driver went down, but Tune's snapshot did not know yet: report, don't redo
        tune.report(json.loads(results.get("final.json")))
        return
    tracker = Tracker(pc.tracking)
    key = f"sweep/{ctx['sweep_id']}/{trial_id}"
    run_id = tracker.open_run(key, f"{ctx['sweep_id']}-{trial_id}", ctx["sweep_run_id"],
                              {"hkd.sweep_id": ctx["sweep_id"], "hkd.trial_id": trial_id, "hkd.stage": "trial",
                               "hkd.config_hash": pc.stages()["distill"], "hkd.trajectories_uri": ctx["traj_uri"]})
    tracker.log_params(run_id, {**pc.run.to_dict(), "sweep": {"params": json.dumps(params, sort_keys=True)}})
    path, fs = ray_storage(pc.storage)
    r = ctx["resources"]
    res = {"CPU": r["cpus_per_worker"]}
    if r["gpus_per_worker"]:
        res["GPU"] = r["gpus_per_worker"]
    trainer = TorchTrainer(
        workers.distill_loop,
        train_loop_config={"pipeline": cfg, "run_id": run_id, "threads": max(1, int(r["cpus_per_worker"])),
                           "trajectories_prefix": ctx["traj_prefix"], "eval": ctx["eval"]},
        scaling_config=ScalingConfig(num_workers=r["workers"], use_gpu=bool(r["gpus_per_worker"]),
                                     resources_per_worker=res),
        run_config=RunConfig(name=f"{ctx['sweep_id']}-{trial_id}", storage_path=f"{path}/sweeps-train",
                             storage_filesystem=fs, callbacks=[TuneReportCallback()],             # (1) to Tune
                             failure_config=FailureConfig(max_failures=pc.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             worker_runtime_env={"env_vars": workers.env_for_workers()}))
    result = trainer.fit()
    if result.error:
        tracker.end(run_id, "FAILED")
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(sorted(Path(d).glob("ckpt-*.pt"))[-1], map_location="cpu", weights_only=False)
    model = build_model(pc.run.model.variant, pc.run.hkd_config())
    model.load_state_dict(state["ema"])
    model.eval()
    kimg = state["nimg"] / 1000
    final = final_metrics(pc, model, ctx)
    final.update(summarize(model.spectrum()))
    tracker.log_metrics(run_id, final, int(state["nimg"]))
    buf = io.BytesIO()
    torch.save(model_record(model), buf)
    results.put("model.pt", buf.getvalue())
    report = {metric: final[metric], "kimg": kimg, "final": 1.0, **{k: v for k, v in final.items()
                                                                      if k.startswith("eval/")}}
    tracker.end(run_id)
    results.put("final.json", json.dumps(report).encode())     # from here on the trial counts as done
    tune.report(report)                                                                        # (2) final value


def final_metrics(pc, model, ctx: dict) -> dict:
    """eval.n-sample FID/KID (standard Inception) and the error against the teacher on held-out noise."""
    from hkd_core.fid import FeatureStats, InceptionFeatures, decode_reference, fid_from_stats, kid_from_features
    from hkd_core.generate import noise_for_seeds
    from hkd_core.pipeline import holdout_error
    from hkd_core.trajectories import read_manifest

    out = {}
    hold = S3Store(pc.storage, ctx["eval"]["holdout_prefix"])
    out["eval/mse_vs_teacher"] = holdout_error(model, hold, read_manifest(hold))
    if ctx.get("final_reference_key"):
        e, d = pc.run.eval, pc.run.data
        feats = InceptionFeatures(e.inception_weights, batch_size=e.batch_size)
        ref = decode_reference(S3Store(pc.storage, "fid-refs").get(ctx["final_reference_key"]))
        shape = (model.cfg.img_channels, d.resolution, d.resolution)
        seeds = torch.arange(e.n) + e.seed * 1_000_000
        with torch.no_grad():
            f = torch.cat([feats(model.sample(x_T=noise_for_seeds(seeds[i:i + e.batch_size], shape) * 80.0))
                           for i in range(0, e.n, e.batch_size)])
        out["eval/fid"] = fid_from_stats(FeatureStats.of(f), ref.stats)
        out["eval/kid"] = kid_from_features(f, ref.features, min(e.kid_subset_size, e.n))[0]
        out["eval/n"] = float(e.n)
    return out


def _reference_name(ctx: StageContext, n: int) -> str:
    """Ensure reference statistics for N images are cached in S3; return their object name."""
    from hkd_core.fid import reference_cache_name

    pc = dataclasses.replace(ctx.pc, run=dataclasses.replace(ctx.pc.run, eval=dataclasses.replace(ctx.pc.run.eval,
                                                                                                   n=n)))
    ref, _ = reference(pc)
    return reference_cache_name(ref.key)


def run_sweep(spec: SweepSpec, cli_overrides: list[str], resume: str | None = None, progress: bool = True,
              sweep_id: str | None = None) -> dict:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from .optuna_search import ResumableOptunaSearch

    spec = dataclasses.replace(spec, base=spec.base + list(cli_overrides))
    base_cfg = check_against_config(spec, compose)          # the YAML against the config, before any work
    pc = from_composed(base_cfg)
    sweep_id = resume or sweep_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(pc)
    tracker = Tracker(pc.tracking)
    sweep_run = tracker.open_run(f"sweep/{sweep_id}", sweep_id, None,
                                 {"hkd.sweep_id": sweep_id, "hkd.stage": "sweep", "hkd.sweep_spec": spec.source})
    tracker.log_params(sweep_run, {"sweep": {"base": json.dumps(spec.base), "metric": spec.metric, "mode": spec.mode,
                                             "trials": spec.trials, "space": json.dumps(spec.space)}})
    ctx = context(pc, base_cfg, progress)
    ctx.tracker.end(ctx.parent_run_id)       # the base pipeline run only records lineage; stages nest under the sweep
    ctx = StageContext(pc, base_cfg, tracker, sweep_run, ctx.lineage, progress)
    shared = run_stages(pc, base_cfg, "trajectories", progress, ctx=ctx)
    traj_prefix = f"{ctx.prefix('trajectories')}"
    trial_eval = {"metric": spec.metric, "fid_n": spec.report.fid_n, "holdout_prefix": f"{traj_prefix}/holdout"}
    if spec.metric in ("eval/fid", "eval/kid"):
        trial_eval["reference_key"] = _reference_name(ctx, spec.report.fid_n)
    final_ref = _reference_name(ctx, pc.run.eval.n)
    levels_default = pc.run.hkd_config().levels
    searcher = ResumableOptunaSearch(space=define_by_run(spec, levels_default), metric=spec.metric, mode=spec.mode,
                                     study_name=sweep_id, storage=optuna.storages.RDBStorage(study_url(spec)),
                                     sampler=optuna.samplers.TPESampler(seed=spec.seed))
    total = pc.run.train.total_kimg
    if spec.scheduler.type == "asha":
        # max_t a hair above the budget: ASHA stops a trial that reaches max_t, and a trial that trained to the
        # end must live on to evaluate itself and send its final report
        scheduler = ASHAScheduler(time_attr="kimg", max_t=total * 1.001,
                                  grace_period=min(spec.scheduler.grace_period_kimg, total),
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    conc = concurrency(spec)
    log.info("sweep %s: %d trials, %d at a time, metric %s (%s), study %s", sweep_id, spec.trials, conc, spec.metric,
             spec.mode, study_url(spec).split("://")[0])
    trial_ctx = {"sweep_id": sweep_id, "sweep_run_id": sweep_run, "base": spec.base, "report": dataclasses.asdict(
        spec.report), "metric": spec.metric, "workers": spec.resources.workers,
        "resources": dataclasses.asdict(spec.resources), "traj_prefix": f"{traj_prefix}/train",
        "traj_uri": shared["trajectories"]["train"]["uri"], "eval": trial_eval, "final_reference_key": final_ref,
        "space_keys": sorted(spec.space)}
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=trial_ctx), {"cpu": 1})
    # snapshot the experiment state often, so that a killed driver loses at most a second of bookkeeping
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    path, fs = ray_storage(pc.storage)
    tune_path = f"{path}/sweeps"
    if resume:
        if not tune.Tuner.can_restore(f"{tune_path}/{sweep_id}", storage_filesystem=fs):
            raise SweepError(f"--resume {sweep_id}: no sweep of that id under s3://{tune_path}/; the ids are the "
                             f"MLflow sweep runs' names (tag hkd.sweep_id)")
        log.info("sweep %s: resuming from %s/%s", sweep_id, tune_path, sweep_id)
        tuner = tune.Tuner.restore(f"{tune_path}/{sweep_id}", trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, metric=spec.metric, mode=spec.mode, num_samples=spec.trials,
            max_concurrent_trials=conc),
            run_config=tune.RunConfig(name=sweep_id, storage_path=tune_path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=1)))
    results = tuner.fit()
    summary = summarize_sweep(spec, sweep_id, results, total, pc)
    publish(tracker, sweep_run, spec, sweep_id, summary, pc, base_cfg)
    tracker.end(sweep_run)
    summary["_sweep_run_id"] = sweep_run
    summary["_tracking_uri"] = tracker.uri
    summary["_experiment_id"] = tracker.experiment_id
    return summary


def summarize_sweep(spec: SweepSpec, sweep_id: str, results, total_kimg: float, pc) -> dict:
    rows = []
    for r in results:
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items() if k in spec.space}
        kimg = float(m.get("kimg", 0.0))
        status = "error" if r.error else ("completed" if m.get("final") else "stopped early (ASHA)")
        rows.append({"trial_id": m.get("trial_id", r.path.rsplit("/", 1)[-1] if r.path else "?"), "status": status,
                     "kimg": kimg, "metric": m.get(spec.metric), "params": params,
                     "fid": m.get("eval/fid"), "mse_vs_teacher": m.get("eval/mse_vs_teacher")})
    sign = 1 if spec.mode == "min" else -1
    done = [r for r in rows if r["status"] == "completed" and r["metric"] is not None]
    done.sort(key=lambda r: sign * r["metric"])
    return {"sweep_id": sweep_id, "metric": spec.metric, "mode": spec.mode, "rows": rows, "ranked": done,
            "best": done[0] if done else None, "total_kimg": total_kimg}


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
    tracker.log_metrics(run_id, {"sweep/trials": len(summary["rows"]), "sweep/stopped_early": stopped,
                                 "sweep/completed": len(summary["ranked"])}, 0)
    preset = best_preset(summary, base_cfg)
    if preset:
        tracker.log_metrics(run_id, {f"sweep/best_{spec.metric.split('/')[-1]}": summary["best"]["metric"]}, 0)
        tracker.log_text(run_id, preset, f"summary/experiment_{sweep_id.replace('-', '_')}.yaml")
        tracker.set_tags(run_id, {"hkd.best_params": json.dumps(summary["best"]["params"], sort_keys=True)})
        S3Store(pc.storage, f"sweeps/{sweep_id}").put("best_experiment.yaml", preset.encode())
        local = ROOT / "orchestrator" / "conf" / "experiment"
        if os.access(local, os.W_OK):
            name = f"sweep_{sweep_id.replace('-', '_')}"
            (local / f"{name}.yaml").write_text(preset)
            summary["preset"] = name

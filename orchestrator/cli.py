"""``hkd``: the distributed HKD pipeline on Ray, tracked in MLflow, stored in S3.

    hkd preflight                                   # probe S3 (boto3 and Ray's filesystem) and MLflow
    hkd pipeline                                    # teacher -> trajectories -> distill -> evaluate
    hkd pipeline data=mnist model.levels=3 model.subspace_dims=[16,32,32]
    hkd distill experiment=smoke --dry-run          # the resolved config and the plan; runs nothing
    hkd teacher | trajectories | distill | evaluate # one stage (and the unfinished ones before it)
    hkd sweep sweeps/scale_count.yaml               # Ray Tune + Optuna + ASHA, one MLflow child run per trial
    hkd sweep sweeps/scale_count.yaml --resume scale_count-20261130-101500
    hkd study experiment=study_fmnist              # HKD, ablations, KD, KDM, teacher NFE 1/2/4/full: one table
    hkd edit --band high --mask lower --ratios 0,0.5,1   # frequency-aware editing of the config's model
    hkd compare RUN_ID SWEEP_ID STUDY_ID ...        # Koopman spectra of several runs in one figure, in MLflow
    hkd ship-teacher teacher=edm eval.n=1000 --out hkd_core/shipped/NAME   # a trained teacher, scored, shipped
    hkd data push fashion_mnist                     # the verified data file to s3://<bucket>/datasets/ (clusters)
    hkd pipeline experiment=smoke storage=fs tracking=file   # no service at all: a local folder, a local
                                                    # MLflow store (SQLite), Ray in this process

Overrides are Hydra's (``group=option``, ``key=value``); the composed config is validated before Ray
starts. Endpoints come from the environment (the local stack's ``env`` command sets them); without it,
a local stack started by ``infra/local/stack.py start`` in ``.stack/`` is found automatically.
On a cluster: ``ray job submit --working-dir . -- hkd pipeline cluster=gpu storage=s3 tracking=remote``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hkd_core.config import ConfigError

from .errors import describe

ROOT = Path(__file__).resolve().parents[1]
STAGE_CMDS = ("teacher", "trajectories", "distill", "evaluate", "pipeline")
COMMANDS = ("preflight", "sweep", "study", "edit", "compare", "ship-teacher", "data") + STAGE_CMDS


def adopt_local_stack() -> None:
    """If no endpoints are set and a local stack is running, use it (without exporting any secret)."""
    state = Path(os.environ.get("HKD_STACK_DIR", ROOT / ".stack"))
    f = state / "stack.json"
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or not f.is_file():
        return
    ports = json.loads(f.read_text()).get("ports", {})
    services = json.loads(f.read_text()).get("services", {})
    if "s3" not in services:
        return
    os.environ.setdefault("AWS_ENDPOINT_URL", f"http://127.0.0.1:{ports['s3']}")
    os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", str(state / "credentials"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{ports['mlflow']}")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in services:
        os.environ.setdefault("RAY_ADDRESS", f"127.0.0.1:{ports['ray']}")
        token = state / "ray_token"
        if json.loads(f.read_text()).get("ray_auth", "token") == "token" and token.is_file():
            os.environ.setdefault("RAY_AUTH_MODE", "token")          # the path to the token, never the token
            os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(token))
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def uses_stack(cfg: dict) -> bool:
    """Does this composed config reach for the local stack's services (S3 or an MLflow server)?"""
    return cfg.get("storage", {}).get("kind") == "s3" or cfg.get("tracking", {}).get("kind") == "server"


def compose_for_cli(overrides: list[str]) -> dict:
    """Compose; if the config uses services and none are configured, adopt a running local stack and compose
    again (its endpoints are the environment the group YAMLs read). storage=fs tracking=file adopts nothing."""
    from .config import compose

    cfg = compose(overrides)
    if uses_stack(cfg) and not (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")):
        adopt_local_stack()
        if os.environ.get("AWS_ENDPOINT_URL"):
            cfg = compose(overrides)
    return cfg


def gate_ok(pc, what: str, ray: bool = True) -> bool:
    """Preflight's cheap part (one HEAD of the bucket, one call to the tracking server and, for commands that run
    Ray work, one to the Ray head with the driver's token) before any work; on a failure one sentence on stderr
    (the caller exits 2) and nothing written anywhere."""
    from .preflight import gate
    from .storage import StorageError

    from .raycluster import driver_address

    address = driver_address(pc) if ray else None
    try:
        for line in gate(pc.storage, pc.tracking.resolved_uri(), ray_address=address):
            logging.getLogger("orchestrator.preflight").info("preflight: %s", line)
    except (StorageError, ValueError) as e:
        print(f"hkd: {what} error: {e}", file=sys.stderr)
        return False
    return True


def data_ok(pc, what: str, fid: bool = False) -> bool:
    """The config's data set loadable here: the local disk, else fetched from s3://<bucket>/datasets/ (storage.
    data_source); with ``fid``, the Inception weights too (here, or in s3://<bucket>/weights/ for every node).
    On a failure one sentence on stderr (the caller exits 2), before any stage runs."""
    from hkd_core.data import DataError
    from hkd_core.inception import WeightsError

    from .datasets import ensure_local, ensure_weights
    from .storage import StorageError

    try:
        ensure_local(pc.storage, pc.run.data.name, pc.storage.data_source, pc.run.data.root)
        if fid:
            ensure_weights(pc.storage, pc.run.eval.inception_weights)
    except (DataError, StorageError, WeightsError) as e:
        print(f"hkd: {what} error: {e}", file=sys.stderr)
        return False
    return True


def data_main(args) -> int:
    """``hkd data push DATASET [overrides]``: the verified local data file to s3://<bucket>/datasets/."""
    from hkd_core.data import DataError

    from .config import from_composed
    from .datasets import push, push_weights
    from .storage import StorageError

    words = [a for a in args.overrides if "=" not in a]
    if len(words) != 2 or words[0] != "push":
        print("hkd: data: use `hkd data push DATASET` (mnist, fashion_mnist, cifar10_jpeg) or "
              "`hkd data push inception` (the FID weights)", file=sys.stderr)
        return 2
    try:
        pc = from_composed(compose_for_cli([a for a in args.overrides if "=" in a]))
        if not gate_ok(pc, "data", ray=False):
            return 2
        if words[1] == "inception":
            uri, new = push_weights(pc.storage, pc.run.eval.inception_weights)
        else:
            uri, new = push(pc.storage, words[1], pc.run.data.root)
    except (ConfigError, DataError, StorageError) as e:
        print(f"hkd: data error: {e}", file=sys.stderr)
        return 2
    who = "every node reads them" if words[1] == "inception" else "jobs read it with no HKD_DATA_DIR"
    print(f"{words[1]}: {uri} ({'uploaded' if new else 'already there'}); {who}")
    return 0


def plan(pc, upto: str) -> dict:
    from .identity import STAGES, stage_prefix

    root = pc.storage.root_uri()
    steps = STAGES[: STAGES.index(upto) + 1]
    return {s: {"hash": pc.stages()[s], "output": f"{root}/{stage_prefix(pc, s)}/"} for s in steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.levels=2 experiment=smoke "
                                                "(for sweep: the sweep YAML first)")
    p.add_argument("--resume", metavar="SWEEP_ID", help="sweep: continue this sweep after its driver was stopped")
    p.add_argument("--id", metavar="SWEEP_ID", help="sweep: name a new sweep (default: <name>-<date>-<time>)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan; run nothing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="write the results (or preflight report) to this file")
    p.add_argument("--headline", metavar="FILE", help="pipeline/evaluate: write the headline (KID ratio, FID ratio, "
                   "floor, N, run id, config hash, commit) to this JSON file")
    p.add_argument("--name", help="--headline: the name it carries (default: 'main job' without overrides, else the "
                   "overrides)")
    g = p.add_argument_group("study")
    g.add_argument("--variants", help="study: comma-separated subset of no_koopman_no_tcons,no_tcons,one_level,hkd "
                   "(the paper's cumulative ablation rows), kd, kdm, hkd_scratch")
    g.add_argument("--teacher-nfe", help="study: teacher NFEs to score (default 1,2,4 and the trajectories' full NFE)")
    g = p.add_argument_group("edit")
    g.add_argument("--model", help="edit: s3://bucket/key, a local model.pt or models:/name/version "
                                   "(default: the distilled model of the given config)")
    g.add_argument("--band", default="high", help="edit: band to blend, by name (low/mid/high) or index (default high)")
    g.add_argument("--bands", type=int, default=3, help="edit: number of bands the modes are split into (default 3)")
    g.add_argument("--tau-mid", type=float, default=0.5, help="edit: where on the trajectory to blend (default 0.5)")
    g.add_argument("--mask", default="lower", help="edit: lower|upper|left|right|center|all (default lower)")
    g.add_argument("--ratios", default="0,0.25,0.5,0.75,1", help="edit: blend ratios r (default 0,0.25,0.5,0.75,1)")
    g.add_argument("--samples", type=int, default=64, help="edit: images to edit; the scores carry bootstrap 95 %% "
                   "intervals over them, the grid shows 3 (default 64)")
    g.add_argument("--seed", type=int, default=0, help="edit: noise seed of the images and references")
    g.add_argument("--reference", default="data", help="edit: data (test images drawn with --seed), data:I,J,... "
                   "(those indices), file:PATH[,PATH...] (image files) or sample (the model's own samples); each "
                   "enters through its own state at sigma(tau_mid) (default data)")
    g.add_argument("--band-order", default="alpha", choices=["alpha", "speed"], help="edit: bands sort modes by "
                   "alpha (band 0 decays fastest; default) or by speed |alpha| (band 0 changes most)")
    g.add_argument("--controls", type=int, default=4, help="edit: random mode sets of the band's size, the "
                   "control beside the band (default 4)")
    g = p.add_argument_group("compare")
    g.add_argument("--gauge", default="canonical", choices=["canonical", "trained"], help="compare: spectra in the "
                   "canonical gauge (default; the gauge freedom of alpha fixed, docs/results/issue24) or as trained")
    g.add_argument("--out", help="study/edit/compare: local folder for the tables and figures (default runs/...); "
                                 "ship-teacher: the shipped teacher's folder (e.g. hkd_core/shipped/<name>)")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .jobdir import settle

    settle()              # a Ray job's driver: out of Ray's unpacked working dir, which Ray may replace mid-run
    from .identity import git_sha

    git_sha()             # the commit this process starts with is the one its results record
    if args.command in ("sweep", "study", "edit", "compare"):
        adopt_local_stack()
    if args.command == "sweep":
        return sweep_main(args)
    if args.command == "study":
        return study_main(args)
    if args.command == "edit":
        return edit_main(args)
    if args.command == "compare":
        return compare_main(args)
    if args.command == "ship-teacher":
        return ship_main(args)
    if args.command == "data":
        return data_main(args)
    return stage_main(args)


def ship_main(args) -> int:
    from .config import from_composed
    from .ship import ship_teacher

    if not args.out:
        print("hkd: ship-teacher needs --out FOLDER (e.g. hkd_core/shipped/fmnist-edm)", file=sys.stderr)
        return 2
    try:
        cfg_dict = compose_for_cli(args.overrides)
        pc = from_composed(cfg_dict)
        if not gate_ok(pc, "ship-teacher") or not data_ok(pc, "ship-teacher"):
            return 2
        res = ship_teacher(pc, cfg_dict, args.out, command="hkd ship-teacher " + " ".join(args.overrides))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"hkd: ship-teacher error: {describe(e)}", file=sys.stderr)
        return 2
    print(json.dumps(res["record"], indent=1, default=float))
    print(f"shipped teacher written to {res['folder']}/ (teacher.pt, record.json, samples.png)")
    return 0


def stage_main(args) -> int:
    """preflight, and the stage commands: pipeline | teacher | trajectories | distill | evaluate."""
    from .config import from_composed

    try:
        cfg_dict = compose_for_cli(args.overrides)
        pc = from_composed(cfg_dict)
    except (ConfigError, ValueError) as e:
        print(f"hkd: config error: {e}", file=sys.stderr)
        return 2
    upto = "evaluate" if args.command == "pipeline" else args.command
    if args.dry_run:
        out = {"config": pc.to_dict(), "plan": plan(pc, upto if args.command != "preflight" else "evaluate")}
        print(json.dumps(out, indent=1))
        return 0
    if args.command == "preflight":
        from .preflight import preflight

        from .raycluster import driver_address

        results = preflight(pc.storage, pc.tracking.resolved_uri(), driver_address(pc))
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']}: {r['detail']}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return 0 if all(r["ok"] for r in results) else 1

    fid = upto == "evaluate" or pc.run.eval.curve_n > 0            # the Inception network runs somewhere
    if not gate_ok(pc, "storage") or not data_ok(pc, "data", fid):
        return 2
    from hkd_core.checkpoint import CheckpointError
    from hkd_core.shipped import ShippedTeacherError
    from hkd_core.trajectories import ShardError

    from .pipeline import run_stages

    try:
        res = run_stages(pc, cfg_dict, upto, progress=not args.no_progress)
    except (ShardError, CheckpointError, ShippedTeacherError, FileNotFoundError) as e:   # bad input data, found
        # before training (a missing teacher.checkpoint object included)
        print(f"hkd: input error: {describe(e)}", file=sys.stderr)
        return 3
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if args.headline and "evaluate" in res:
        head = {**res["evaluate"].get("headline", {}),
                "name": args.name or (" ".join(args.overrides) if args.overrides else "main job"),
                "command": " ".join(["hkd", args.command, *args.overrides])}
        Path(args.headline).write_text(json.dumps(head, indent=1, default=float) + "\n")
    print_results(res)
    return 0


def print_results(res: dict) -> None:
    print(f"\nstages skipped (already done): {', '.join(res.get('_skipped', [])) or 'none'}")
    if "evaluate" in res:
        from .headline import headline_lines

        for line in headline_lines(res["evaluate"]["metrics"]):
            print(line)
    print(f"artifacts: {res['_storage_root']}/")
    if "distill" in res and res["distill"].get("model_uri"):
        print(f"  model: {res['distill']['model_uri']}   trajectories: {res['trajectories']['train']['uri']}/")
    print_champion(res.get("evaluate", {}).get("champion"))
    print_ui(res["_tracking_uri"], res["_experiment_id"], res["_parent_run_id"])


def print_champion(champ: dict | None, what: str = "") -> None:
    """Where the registry's alias went (orchestrator/registry.py)."""
    if champ:
        print(f"registry: {champ['model']} version {champ['version']}{what} "
              + (f"is now the {champ['alias']} (models:/{champ['model']}@{champ['alias']})" if champ["moved"]
                 else f"stays a challenger ({champ['why']})"))


def print_ui(uri: str, experiment_id: str, run_id: str, extra: str = "") -> None:
    if uri.startswith("http"):
        print(f"MLflow UI: {uri}/#/experiments/{experiment_id}/runs/{run_id}{extra}")
    else:
        print(f"MLflow (a local store): mlflow ui --backend-store-uri {uri}   (run {run_id})")


def sweep_main(args) -> int:
    from .sweep_spec import SweepError, asha_rungs, check_against_config, load

    from .config import compose, from_composed

    if not args.overrides:
        print("hkd: sweep needs a sweep YAML, e.g. hkd sweep sweeps/smoke.yaml", file=sys.stderr)
        return 2
    path, overrides = args.overrides[0], args.overrides[1:]
    try:
        spec = load(path)
        import dataclasses

        spec = dataclasses.replace(spec, base=spec.base + overrides)
        base = check_against_config(spec, compose)
        pc = from_composed(base)
    except (SweepError, ConfigError) as e:
        print(f"hkd: sweep error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from .preflight import safe_url

        shown = {**dataclasses.asdict(spec), "study_storage": spec.study_storage and safe_url(spec.study_storage)}
        print(json.dumps({"sweep": shown,
                          "base_config": pc.to_dict(), "shared_stages": plan(pc, "trajectories"),
                          "asha_rungs_kimg": asha_rungs(spec, pc.run.train.total_kimg)}, indent=1, default=str))
        return 0
    if not gate_ok(pc, "sweep") or not data_ok(pc, "sweep", fid=True):
        return 2
    from .preflight import study_storage_check
    from .storage import StorageError

    try:
        done = study_storage_check(spec.study_storage, f"study_storage ({path})")
        if done:
            logging.getLogger("orchestrator.preflight").info("preflight: %s", done)
    except StorageError as e:
        print(f"hkd: sweep error: {e}", file=sys.stderr)
        return 2
    from .sweep import run_sweep, to_markdown

    try:
        summary = run_sweep(spec, [], args.resume, progress=not args.no_progress, sweep_id=args.id)
    except SweepError as e:
        print(f"hkd: sweep error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    print(to_markdown(summary))
    if summary.get("preset"):
        print(f"best config written as an experiment preset ({summary['preset_path']}): "
              f"hkd pipeline experiment={summary['preset']}")
    champ = summary.get("champion")
    print_champion(champ, f" (trial {champ['trial_id']}, the lowest FID at N = {champ['n']})" if champ else "")
    print(f"sweep id: {summary['sweep_id']} (resume with --resume {summary['sweep_id']})")
    print_ui(summary["_tracking_uri"], summary["_experiment_id"], summary["_sweep_run_id"])
    return 0


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: give comma-separated numbers, e.g. 0,0.5,1") from None


def study_main(args) -> int:
    from .study import parse_variants, run_study, variant_configs

    try:
        variants = parse_variants(args.variants)
        nfe = [int(x) for x in _floats(args.teacher_nfe, "--teacher-nfe")] if args.teacher_nfe else None
        study, cfgs = variant_configs(args.overrides, variants, nfe)
    except (ConfigError, ValueError) as e:
        print(f"hkd: study error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps({"study": study, "variants": {v: {"config": pc.to_dict(), "plan": plan(pc, "evaluate")}
                                                       for v, (pc, _) in cfgs.items()}}, indent=1, default=str))
        return 0
    if not gate_ok(next(iter(cfgs.values()))[0], "study") or not data_ok(next(iter(cfgs.values()))[0], "study", fid=True):
        return 2
    res = run_study(args.overrides, variants, nfe, progress=not args.no_progress, out=args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(res["markdown"])
    curves = ", study_curves.png (FID against kimg and training seconds)" if res.get("curve_n") else ""
    print(f"table and figures: {res['folder']}/study.md, study_fid.png{curves}")
    print_ui(res["_tracking_uri"], res["_experiment_id"], res["_study_run_id"],
             f"  (compare: filter tags.hkd.study = '{res['study']}')")
    return 0


def edit_main(args) -> int:
    from .config import compose, from_composed
    from .editing import EditArgs, run_edit

    try:
        pc = from_composed(compose(args.overrides))
        ea = EditArgs(band=args.band, tau_mid=args.tau_mid, mask=args.mask,
                      ratios=tuple(_floats(args.ratios, "--ratios")), samples=args.samples, seed=args.seed,
                      n_bands=args.bands, reference=args.reference, controls=args.controls,
                      order=args.band_order).validate()
    except (ConfigError, ValueError) as e:
        print(f"hkd: edit error: {describe(e)}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps({"edit": ea.__dict__, "model": args.model or plan(pc, "distill")["distill"]["output"] +
                          "model.pt"}, indent=1, default=str))
        return 0
    if not gate_ok(pc, "edit", ray=False) or not data_ok(pc, "edit"):
        return 2
    try:
        res = run_edit(pc, ea, args.model, args.out)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"hkd: edit error: {describe(e)}", file=sys.stderr)
        return 2
    return _print_result(args, res, f"figures: {res['folder']}/edit_grid.png, edit_tradeoff.png")


def _print_result(args, res: dict, where: str) -> int:
    """The tail of `hkd edit` / `hkd compare`: --json, the markdown table, where the figures are, the MLflow run."""
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(res["markdown"])
    print(where)
    if res.get("_tracking_uri"):
        print_ui(res["_tracking_uri"], res["_experiment_id"], res["_run_id"])
    return 0


def compare_main(args) -> int:
    """``hkd compare [overrides] RUN_OR_SWEEP...``: the arguments with '=' are Hydra overrides (the tracking and
    storage to read from), the others name runs, sweeps, studies or models."""
    from .compare import run_compare
    from .config import compose, from_composed

    overrides = [a for a in args.overrides if "=" in a]
    tokens = [a for a in args.overrides if "=" not in a]
    try:
        pc = from_composed(compose(overrides))
        if not tokens:
            raise ValueError("name at least one MLflow run id, sweep id, study id or model URI to compare")
        if not gate_ok(pc, "compare", ray=False):
            return 2
        res = run_compare(pc, tokens, args.out, gauge=args.gauge)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"hkd: compare error: {describe(e)}", file=sys.stderr)
        return 2
    return _print_result(args, res, f"figure: {res['figures'][0]}")


if __name__ == "__main__":
    sys.exit(main())

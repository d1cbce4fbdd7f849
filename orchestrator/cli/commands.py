"""``hkd``: the distributed HKD pipeline on Ray, tracked in MLflow, stored in S3.

    hkd preflight                                   # probe S3 (boto3 and Ray's filesystem), MLflow and Ray
    hkd pipeline                                    # teacher -> trajectories -> distill -> evaluate
    hkd pipeline data=mnist model.levels=3 model.subspace_dims=[16,32,32]
    hkd distill experiment=smoke --dry-run          # the resolved config and the plan; runs nothing
    hkd teacher | trajectories | distill | evaluate # one stage (and the unfinished ones before it)
    hkd config                                      # the config groups, their options, the experiment presets
    hkd sweep sweeps/scale_count.yaml               # Ray Tune + Optuna + ASHA, one MLflow child run per trial
    hkd sweep sweeps/scale_count.yaml --resume scale_count-20261130-101500
    hkd study experiment=study_fmnist              # HKD, ablations, KD, KDM, teacher NFE 1/2/4/full: one table
    hkd edit --band high --mask lower --ratios 0,0.5,1   # frequency-aware editing of the config's model
    hkd compare RUN_ID SWEEP_ID STUDY_ID ...        # Koopman spectra of several runs in one figure, in MLflow
    hkd ship-teacher teacher=edm eval.n=1000 --out hkd_core/shipped/NAME   # a trained teacher, scored, shipped
    hkd data push fashion_mnist                     # the verified data file to s3://<bucket>/datasets/ (clusters)
    hkd pipeline experiment=smoke storage=fs tracking=file   # no service at all: a local folder, a local
                                                    # MLflow store (SQLite), Ray in this process

Each command lists its own flags with `--help`. Overrides are Hydra's (``group=option``, ``key=value``); the
composed config is validated before Ray starts. Endpoints come from the environment (the local stack's ``env``
command sets them); without it, a local stack started by ``infra/local/stack.py start`` in ``.stack/`` is found
automatically. On a cluster: ``ray job submit --working-dir . -- hkd pipeline cluster=gpu storage=s3
tracking=remote``. Every command is a function of ``orchestrator.api``, which this module only parses for and
prints from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from orchestrator import api
from orchestrator.cli import output as out
from orchestrator.cli.study import add_study_flags, study_main
from orchestrator.errors import summary

STAGE_CMDS = ("teacher", "trajectories", "distill", "evaluate", "pipeline")
HELP = {
    "pipeline": "teacher -> trajectories -> distill -> evaluate, each skipped where already done",
    "teacher": "the teacher stage (adopts a shipped teacher, else trains one)",
    "trajectories": "the teacher's trajectories, sampled by Ray tasks into shards (and the stages before)",
    "distill": "the HKD model distilled on Ray Train (and the stages before)",
    "evaluate": "KID/FID against the teacher, spectra and figures (and the stages before)",
    "preflight": "probe S3 (boto3 and Ray's filesystem), MLflow and Ray; exit 1 if anything fails",
    "config": "list the config groups, their options and the experiment presets",
    "sweep": "Ray Tune + Optuna + ASHA over a sweep YAML",
    "study": "the paper's ablation study: every variant, the teacher at several NFE, one table",
    "edit": "frequency-aware editing of a model's samples with a reference",
    "compare": "the Koopman spectra and FID curves of several runs, sweeps, studies or models",
    "ship-teacher": "score a trained teacher and write it as a shipped record",
    "data": "hkd data push NAME: a verified data set (or 'inception', the FID weights) into the bucket",
}


def _base(
    name: str, overrides: str = "Hydra overrides, e.g. model.levels=2 experiment=smoke"
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"hkd {name}", description=HELP[name])
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=overrides)
    p.add_argument("--json", metavar="FILE", help="write the result to this JSON file")
    return p


def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and the plan; run nothing"
    )


def _progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")


def parser_for(name: str) -> argparse.ArgumentParser:
    """The parser of one command, with only its own flags."""
    if name in STAGE_CMDS or name == "preflight":
        p = _base(name)
        _dry_run(p)
        if name != "preflight":
            _progress(p)
        if name in ("pipeline", "evaluate"):
            p.add_argument(
                "--headline",
                metavar="FILE",
                help="write the headline (KID ratio, FID ratio, floor, N, "
                "run id, config hash, commit) to this JSON file",
            )
            p.add_argument(
                "--name",
                help="the name the headline carries (default: 'main job' without overrides, "
                "else the overrides)",
            )
        return p
    if name == "config":
        return _base(name, "ignored")
    if name == "sweep":
        p = _base(name, "the sweep YAML, then Hydra overrides added to its base")
        p.add_argument(
            "--resume", metavar="SWEEP_ID", help="continue this sweep after its driver was stopped"
        )
        p.add_argument("--id", metavar="SWEEP_ID", help="name a new sweep (default: <name>-<date>-<time>)")
        _dry_run(p)
        _progress(p)
        return p
    if name == "study":
        p = _base(name)
        add_study_flags(p)
        _dry_run(p)
        _progress(p)
        return p
    if name == "edit":
        return _edit_parser()
    if name == "compare":
        p = _base(
            name,
            "MLflow run ids, sweep ids, study ids or model URIs, and Hydra overrides (key=value: the "
            "tracking and storage to read from)",
        )
        p.add_argument(
            "--gauge",
            default="canonical",
            choices=["canonical", "trained"],
            help="spectra in the "
            "canonical gauge (default; the gauge freedom of alpha fixed, docs/results/issue24) or as trained",
        )
        p.add_argument("--out", help="local folder for the table and figures (default runs/compare-<id>)")
        return p
    if name == "ship-teacher":
        p = _base(name)
        p.add_argument(
            "--out", required=True, help="the shipped teacher's folder (e.g. hkd_core/shipped/<name>)"
        )
        return p
    if name == "data":
        return _base(
            name, "push NAME (mnist, fashion_mnist, cifar10_jpeg, or inception), then Hydra overrides"
        )
    raise KeyError(name)


def _edit_parser() -> argparse.ArgumentParser:
    from orchestrator.analysis.editing import EditArgs

    d = EditArgs()
    p = _base("edit")
    p.add_argument(
        "--model",
        help="s3://bucket/key, a local model.pt or models:/name/version (default: the "
        "distilled model of the given config)",
    )
    p.add_argument("--band", help=f"band to blend, by name (low/mid/high) or index (default {d.band})")
    p.add_argument(
        "--bands",
        type=int,
        dest="n_bands",
        help=f"number of bands the modes are split into (default {d.n_bands})",
    )
    p.add_argument("--tau-mid", type=float, help=f"where on the trajectory to blend (default {d.tau_mid})")
    p.add_argument("--mask", help=f"lower|upper|left|right|center|all (default {d.mask})")
    p.add_argument(
        "--ratios", help=f"blend ratios r, comma-separated (default {','.join(f'{r:g}' for r in d.ratios)})"
    )
    p.add_argument(
        "--samples",
        type=int,
        help=f"images to edit; the scores carry bootstrap 95 %% intervals over them, "
        f"the grid shows 3 (default {d.samples})",
    )
    p.add_argument("--seed", type=int, help=f"noise seed of the images and references (default {d.seed})")
    p.add_argument(
        "--reference",
        help="data (test images drawn with --seed), data:I,J,... (those indices), "
        "file:PATH[,PATH...] (image files) or sample (the model's own samples); each enters through its "
        f"own state at sigma(tau_mid) (default {d.reference})",
    )
    p.add_argument(
        "--band-order",
        dest="order",
        choices=["alpha", "speed"],
        help="bands sort modes by alpha (band 0 "
        f"decays fastest) or by speed |alpha| (band 0 changes most) (default {d.order})",
    )
    p.add_argument(
        "--controls",
        type=int,
        help=f"random mode sets of the band's size, the control beside the band (default {d.controls})",
    )
    p.add_argument("--out", help="local folder for the table and figures (default runs/edit-<id>)")
    _dry_run(p)
    return p


def top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in HELP:
        top = top_parser()
        if argv and argv[0] in ("-h", "--help"):
            top.print_help()
            return 0
        top.print_usage(sys.stderr)
        print(
            f"hkd: {'unknown command ' + repr(argv[0]) if argv else 'no command'}; choose one of "
            f"{', '.join(HELP)} (hkd --help)",
            file=sys.stderr,
        )
        return 2
    command = argv[0]
    try:
        args = parser_for(command).parse_intermixed_args(argv[1:])
    except SystemExit as e:  # --help (0) or a flag this command does not have (2: argparse said which)
        return int(e.code or 0)
    args.command = command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from orchestrator.identity import git_sha
    from orchestrator.services.jobdir import settle

    settle()  # a Ray job's driver: out of Ray's unpacked working dir, which Ray may replace mid-run
    git_sha()  # the commit this process starts with is the one its results record
    try:
        return RUN.get(command, stage_main)(args)
    except api.UsageError as e:
        print(f"hkd: {e.what} error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - whatever ended the work: its traceback, then one line that says what
        import traceback

        traceback.print_exc()
        where = " (the stage's MLflow run is FAILED with this reason)" if command in STAGE_CMDS else ""
        print(f"hkd: {command} failed: {summary(e)}{where}", file=sys.stderr)
        return 1


def stage_main(args) -> int:
    """The stage commands: pipeline | teacher | trajectories | distill | evaluate."""
    upto = "evaluate" if args.command == "pipeline" else args.command
    if args.dry_run:
        pc = api.load(args.overrides)
        print(json.dumps({"config": pc.to_dict(), "plan": api.plan(pc, upto)}, indent=1))
        return 0
    res = api.pipeline(args.overrides, upto, progress=not args.no_progress)
    out.write_json(args.json, res)
    if getattr(args, "headline", None):  # pipeline and evaluate have it; the other stages do not
        out.write_headline(args.headline, res, args.command, args.overrides, args.name)
    out.print_results(res)
    return 0


def preflight_main(args) -> int:
    if args.dry_run:
        pc = api.load(args.overrides)
        print(json.dumps({"config": pc.to_dict(), "plan": api.plan(pc, "evaluate")}, indent=1))
        return 0
    results = api.preflight(args.overrides)
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']}: {r['detail']}")
    if args.json:
        out.write_json(args.json, results)
    return 0 if all(r["ok"] for r in results) else 1


def config_main(args) -> int:
    opts = api.config_options()
    out.write_json(args.json, opts)
    out.print_config_options(opts)
    return 0


def sweep_main(args) -> int:
    if not args.overrides:
        raise api.UsageError("sweep needs a sweep YAML, e.g. hkd sweep sweeps/smoke.yaml", "sweep")
    path, overrides = args.overrides[0], args.overrides[1:]
    if args.dry_run:
        print(json.dumps(api.sweep_plan(path, overrides), indent=1, default=str))
        return 0
    summary = api.sweep(path, overrides, args.resume, args.id, progress=not args.no_progress)
    out.write_json(args.json, summary)
    out.print_sweep(summary)
    return 0


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise api.UsageError(
            f"{what} {text!r}: give comma-separated numbers, e.g. 0,0.5,1", what.strip("-")
        ) from None


EDIT_FLAGS = ("band", "n_bands", "tau_mid", "mask", "samples", "seed", "reference", "order", "controls")


def edit_main(args) -> int:
    given = {k: getattr(args, k) for k in EDIT_FLAGS}
    given["ratios"] = _floats(args.ratios, "--ratios")
    if args.dry_run:
        pc = api.load(args.overrides, "edit")
        ea = api.edit_args(**given)
        model = args.model or api.plan(pc, "distill")["distill"]["output"] + "model.pt"
        print(json.dumps({"edit": dataclasses.asdict(ea), "model": model}, indent=1, default=str))
        return 0
    res = api.edit(args.overrides, args.model, args.out, **given)
    out.write_json(args.json, res)
    out.print_table(res, f"figures: {res['folder']}/edit_grid.png, edit_tradeoff.png")
    return 0


def compare_main(args) -> int:
    """The arguments with '=' are Hydra overrides (the tracking and storage to read from), the others name runs,
    sweeps, studies or models."""
    overrides = [a for a in args.overrides if "=" in a]
    tokens = [a for a in args.overrides if "=" not in a]
    res = api.compare(tokens, overrides, args.out, gauge=args.gauge)
    out.write_json(args.json, res)
    out.print_table(res, f"figure: {res['figures'][0]}")
    return 0


def ship_main(args) -> int:
    res = api.ship_teacher(args.overrides, args.out)
    print(json.dumps(res["record"], indent=1, default=float))
    print(f"shipped teacher written to {res['folder']}/ (teacher.pt, record.json, samples.png)")
    return 0


def data_main(args) -> int:
    words = [a for a in args.overrides if "=" not in a]
    if len(words) != 2 or words[0] != "push":
        raise api.UsageError(
            "use `hkd data push DATASET` (mnist, fashion_mnist, cifar10_jpeg) or "
            "`hkd data push inception` (the FID weights)",
            "data",
        )
    uri, new = api.push_data(words[1], [a for a in args.overrides if "=" in a])
    who = "every node reads them" if words[1] == "inception" else "jobs read it with no HKD_DATA_DIR"
    print(f"{words[1]}: {uri} ({'uploaded' if new else 'already there'}); {who}")
    return 0


RUN = {
    "preflight": preflight_main,
    "config": config_main,
    "sweep": sweep_main,
    "study": study_main,
    "edit": edit_main,
    "compare": compare_main,
    "ship-teacher": ship_main,
    "data": data_main,
}

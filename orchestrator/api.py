"""The Python API: what every ``hkd`` command does, as functions. The command line is a thin layer over these
(``orchestrator/cli/commands.py`` parses, calls one of them, prints).

    from orchestrator import api

    res = api.pipeline(["experiment=smoke"])            # teacher -> trajectories -> distill -> evaluate
    res["evaluate"]["headline"]["kid_ratio"]
    api.plan(api.load(["model.levels=2"]))              # each stage's hash and where it writes; runs nothing
    api.sweep("sweeps/smoke.yaml", ["train.total_kimg=1"])
    api.compare(["<pipeline run id>", "<sweep id>"])    # spectra in the canonical gauge, FID curves
    api.edit(band="low", tau_mid=0.25)                  # frequency-aware editing of the config's model
    api.config_options()                                # the config groups, their options, the presets

Overrides are Hydra's (``group=option``, ``key=value``). Every function validates its input before any work and
raises ``UsageError`` (a config, an argument or a service that is not right: the CLI exits 2) or ``InputError``
(input data found bad before training: exit 3), each with one sentence that says what to do. Without endpoints
in the environment, a local stack started by ``infra/local/stack.py start`` (``.stack/``) is used when the
config reaches for services; ``storage=fs tracking=file`` needs none.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

from hkd_core.config import ConfigError
from orchestrator.errors import describe
from orchestrator.services.localstack import adopt_local_stack, uses_stack

log = logging.getLogger(__name__)
STAGES = ("teacher", "trajectories", "distill", "evaluate")


class UsageError(Exception):
    """Bad input or an unreachable service, found before any work. ``what`` is the label the CLI prints
    (``hkd: <what> error: <message>``)."""

    exit_code = 2

    def __init__(self, message: str, what: str = "config"):
        super().__init__(message)
        self.what = what


class InputError(UsageError):
    """Input data found bad before training (a corrupt shard, a checkpoint or teacher that does not fit)."""

    exit_code = 3

    def __init__(self, message: str):
        super().__init__(message, "input")


# --- the config ------------------------------------------------------------


def compose(overrides: Sequence[str] = ()) -> dict:
    """The composed config (a dict); if it uses services and none are configured, a running local stack is adopted
    and the config composed again (its endpoints are the environment the group YAMLs read)."""
    from orchestrator.config import compose as hydra_compose

    overrides = list(overrides)
    cfg = hydra_compose(overrides)
    if uses_stack(cfg) and not (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")):
        adopt_local_stack()
        if os.environ.get("AWS_ENDPOINT_URL"):
            cfg = hydra_compose(overrides)
    return cfg


def load(overrides: Sequence[str] = (), what: str = "config"):
    """The validated ``PipelineConfig`` of these overrides; a ``UsageError`` naming the key otherwise."""
    from orchestrator.config import from_composed

    try:
        return from_composed(compose(overrides))
    except (ConfigError, ValueError) as e:
        raise UsageError(str(e), what) from None


def plan(pc, upto: str = "evaluate") -> dict:
    """Each stage up to ``upto``: its hash and the storage folder it writes (what a dry run prints)."""
    from orchestrator.identity import STAGES as ORDER
    from orchestrator.identity import stage_prefix

    root = pc.storage.root_uri()
    return {
        s: {"hash": pc.stages()[s], "output": f"{root}/{stage_prefix(pc, s)}/"}
        for s in ORDER[: ORDER.index(upto) + 1]
    }


def check_services(pc, what: str = "storage", ray: bool = True) -> list[str]:
    """Preflight's cheap part before any work: one HEAD of the bucket, one call to the tracking server and, for
    work on Ray, one to the Ray head with the driver's token. Returns what was checked; ``UsageError`` on a
    failure (nothing written anywhere)."""
    from orchestrator.services.preflight import gate
    from orchestrator.services.raycluster import driver_address
    from orchestrator.services.storage import StorageError

    try:
        lines = gate(pc.storage, pc.tracking.resolved_uri(), ray_address=driver_address(pc) if ray else None)
    except (StorageError, ValueError) as e:
        raise UsageError(str(e), what) from None
    for line in lines:
        logging.getLogger("orchestrator.services.preflight").info("preflight: %s", line)
    return lines


def check_data(pc, what: str = "data", fid: bool = False) -> None:
    """The config's data set loadable here (the local disk, else s3://<bucket>/datasets/ per
    ``storage.data_source``); with ``fid``, the Inception weights too. ``UsageError`` otherwise."""
    from hkd_core.data import DataError
    from hkd_core.inception import WeightsError
    from orchestrator.services.datasets import ensure_local, ensure_weights
    from orchestrator.services.storage import StorageError

    try:
        ensure_local(pc.storage, pc.run.data.name, pc.storage.data_source, pc.run.data.root)
        if fid:
            ensure_weights(pc.storage, pc.run.eval.inception_weights)
    except (DataError, StorageError, WeightsError) as e:
        raise UsageError(str(e), what) from None


# --- the commands -----------------------------------------------------------------------------------------------


def preflight(overrides: Sequence[str] = ()) -> list[dict]:
    """Probe S3 (boto3 and Ray's filesystem), MLflow and Ray: one dict per check (name, ok, detail)."""
    from orchestrator.services.preflight import preflight as probe
    from orchestrator.services.raycluster import driver_address

    pc = load(overrides)
    return probe(pc.storage, pc.tracking.resolved_uri(), driver_address(pc))


def pipeline(overrides: Sequence[str] = (), upto: str = "evaluate", progress: bool = True) -> dict:
    """Every stage up to ``upto`` (teacher, trajectories, distill, evaluate), each skipped where its output exists
    for this config. The result holds each stage's summary (``res["evaluate"]["headline"]``), the storage root and
    the MLflow run ids."""
    from hkd_core.checkpoint import CheckpointError
    from hkd_core.shipped import ShippedTeacherError
    from hkd_core.trajectories import ShardError
    from orchestrator.stages.driver import run_stages
    from orchestrator.stages.lease import StageBusyError

    if upto not in STAGES:
        raise UsageError(f"upto={upto!r}: use one of {', '.join(STAGES)}")
    cfg = compose_checked(overrides)
    pc = load_composed(cfg)
    check_services(pc, "storage")
    check_data(pc, "data", fid=upto == "evaluate" or pc.run.eval.curve_n > 0)  # the Inception network runs
    try:
        return run_stages(pc, upto, progress=progress)
    except StageBusyError as e:  # another driver runs a stage of this config: nothing touched
        raise UsageError(str(e), "stage") from None
    except (
        ShardError,
        CheckpointError,
        ShippedTeacherError,
        FileNotFoundError,
    ) as e:  # bad input data, found
        raise InputError(describe(e)) from None  # before training


def compose_checked(overrides: Sequence[str], what: str = "config") -> dict:
    try:
        return compose(overrides)
    except (ConfigError, ValueError) as e:
        raise UsageError(str(e), what) from None


def load_composed(cfg: dict, what: str = "config"):
    from orchestrator.config import from_composed

    try:
        return from_composed(cfg)
    except (ConfigError, ValueError) as e:
        raise UsageError(str(e), what) from None


def sweep_spec(path: str, overrides: Sequence[str] = ()):
    """(the sweep's spec with ``overrides`` added to its base, its validated base config): every mistake in the
    YAML reported against the config at once, before Ray starts."""
    from orchestrator.config import compose as hydra_compose
    from orchestrator.sweep.spec import SweepError, check_against_config
    from orchestrator.sweep.spec import load as load_spec

    try:
        spec = load_spec(path, hydra_compose)  # every mistake in the file at once
        spec = dataclasses.replace(spec, base=spec.base + list(overrides))
        return spec, load_composed(check_against_config(spec, hydra_compose), "sweep")
    except (SweepError, ConfigError) as e:
        raise UsageError(str(e), "sweep") from None


def sweep_plan(path: str, overrides: Sequence[str] = ()) -> dict:
    """What ``hkd sweep --dry-run`` prints: the spec (the study storage's password hidden), the base config, the
    shared stages and ASHA's rungs."""
    from orchestrator.services.preflight import safe_url
    from orchestrator.sweep.spec import asha_rungs

    spec, pc = sweep_spec(path, overrides)
    shown = {**dataclasses.asdict(spec), "study_storage": spec.study_storage and safe_url(spec.study_storage)}
    return {
        "sweep": shown,
        "base_config": pc.to_dict(),
        "shared_stages": plan(pc, "trajectories"),
        "asha_rungs_kimg": asha_rungs(spec, pc.run.train.total_kimg),
    }


def sweep(
    path: str,
    overrides: Sequence[str] = (),
    resume: str | None = None,
    sweep_id: str | None = None,
    progress: bool = True,
) -> dict:
    """Ray Tune + Optuna + ASHA over the YAML's space, one MLflow child run per trial; ``resume`` continues a
    sweep whose driver stopped. The summary holds the trials, the best config (and its preset) and the champion."""
    from hkd_core.trajectories import ShardError
    from orchestrator.services.preflight import study_storage_check
    from orchestrator.services.storage import StorageError
    from orchestrator.stages.lease import StageBusyError
    from orchestrator.sweep.run import run_sweep
    from orchestrator.sweep.spec import SweepError

    adopt_local_stack()
    spec, pc = sweep_spec(path, overrides)
    check_services(pc, "sweep")
    check_data(pc, "sweep", fid=True)
    try:
        done = study_storage_check(spec.study_storage, f"study_storage ({path})")
        if done:
            logging.getLogger("orchestrator.services.preflight").info("preflight: %s", done)
        return run_sweep(spec, [], resume, progress=progress, sweep_id=sweep_id)
    except (SweepError, StorageError, StageBusyError) as e:
        raise UsageError(str(e), "sweep") from None
    except ShardError as e:  # a bad trajectory shard, found before any trial started
        raise InputError(describe(e)) from None


def study_plan(
    overrides: Sequence[str] = (),
    variants: Sequence[str] | str | None = None,
    teacher_nfe: Sequence[int] | None = None,
) -> tuple[str, dict]:
    """(the study's id, variant -> (its validated config, composed dict)), before anything runs."""
    from orchestrator.analysis.study import parse_variants, variant_configs

    adopt_local_stack()
    try:
        names = parse_variants(
            variants if isinstance(variants, str) or variants is None else ",".join(variants)
        )
        return variant_configs(list(overrides), names, list(teacher_nfe) if teacher_nfe is not None else None)
    except (ConfigError, ValueError) as e:
        raise UsageError(str(e), "study") from None


def study(
    overrides: Sequence[str] = (),
    variants: Sequence[str] | str | None = None,
    teacher_nfe: Sequence[int] | None = None,
    out: str | None = None,
    progress: bool = True,
) -> dict:
    """The quality study: HKD, its ablations, KD and KDM, and the teacher at several NFE, in one table."""
    from orchestrator.analysis.study import parse_variants, run_study
    from orchestrator.stages.lease import StageBusyError

    _, cfgs = study_plan(overrides, variants, teacher_nfe)
    first = next(iter(cfgs.values()))[0]
    check_services(first, "study")
    check_data(first, "study", fid=True)
    names = parse_variants(variants if isinstance(variants, str) or variants is None else ",".join(variants))
    try:
        return run_study(
            list(overrides),
            names,
            list(teacher_nfe) if teacher_nfe is not None else None,
            progress=progress,
            out=out,
        )
    except StageBusyError as e:  # another driver runs one of the study's stages
        raise UsageError(str(e), "study") from None


def study_combine(folders: Sequence[str], out: str, over_seeds: bool = False) -> dict:
    """One table from several ``hkd study --out`` folders: the parts of one study (``--merge``), or one study run
    at several ``train.seed`` values (``--seeds``: each seed's score, their mean and spread)."""
    from orchestrator.analysis.study_parts import StudyMergeError, merge_study
    from orchestrator.analysis.study_seeds import combine_study_seeds

    try:
        return (combine_study_seeds if over_seeds else merge_study)(list(folders), out)
    except StudyMergeError as e:
        raise UsageError(str(e), "study") from None


def edit_args(**given):
    """The edit's arguments: ``EditArgs``'s defaults (orchestrator/analysis/editing.py, the one place they are
    written) with what was given, validated."""
    from orchestrator.analysis.editing import EditArgs

    known = {f.name for f in dataclasses.fields(EditArgs)}
    bad = sorted(set(given) - known)
    if bad:
        raise UsageError(f"edit: unknown argument(s) {bad}; use {sorted(known)}", "edit")
    try:
        return EditArgs(
            **{k: (tuple(v) if k == "ratios" else v) for k, v in given.items() if v is not None}
        ).validate()
    except (TypeError, ValueError) as e:
        raise UsageError(describe(e), "edit") from None


def edit(overrides: Sequence[str] = (), model: str | None = None, out: str | None = None, **args) -> dict:
    """Frequency-aware editing: one band of a reference's latent blended into samples at tau_mid (``args``: the
    fields of ``EditArgs``: band, tau_mid, mask, ratios, samples, seed, n_bands, reference, controls, order), with
    same-size random mode sets and all bands beside it, scores with bootstrap intervals, figures, an MLflow run."""
    from orchestrator.analysis.editing import run_edit

    adopt_local_stack()
    pc = load(overrides, "edit")
    ea = edit_args(**args)
    check_services(pc, "edit", ray=False)
    check_data(pc, "edit")
    try:
        return run_edit(pc, ea, model, out)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise UsageError(describe(e), "edit") from None


def compare(
    tokens: Sequence[str], overrides: Sequence[str] = (), out: str | None = None, gauge: str = "canonical"
) -> dict:
    """The spectra of the runs, sweeps, studies or models that ``tokens`` name (canonical gauge by default), their
    agreement with the first, their FID curves; a table, figures and an MLflow run."""
    from orchestrator.analysis.compare import run_compare

    adopt_local_stack()
    pc = load(overrides, "compare")
    if not tokens:
        raise UsageError(
            "name at least one MLflow run id, sweep id, study id or model URI to compare", "compare"
        )
    check_services(pc, "compare", ray=False)
    try:
        return run_compare(pc, list(tokens), out, gauge=gauge)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise UsageError(describe(e), "compare") from None


def ship_teacher(overrides: Sequence[str], out: str) -> dict:
    """Score the config's trained teacher and write it as a shipped record (teacher.pt, record.json, samples.png)
    into ``out``."""
    from orchestrator.stages.ship import ship_teacher as ship

    if not out:
        raise UsageError("ship-teacher needs --out FOLDER (e.g. hkd_core/shipped/fmnist-edm)", "ship-teacher")
    cfg = compose_checked(overrides, "ship-teacher")
    pc = load_composed(cfg, "ship-teacher")
    check_services(pc, "ship-teacher")
    check_data(pc, "ship-teacher")
    try:
        return ship(pc, out, command="hkd ship-teacher " + " ".join(overrides))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise UsageError(describe(e), "ship-teacher") from None


def push_data(name: str, overrides: Sequence[str] = ()) -> tuple[str, bool]:
    """The verified local data file (``name``: a data set, or ``inception`` for the FID weights) to
    s3://<bucket>/datasets/ (or weights/): (its URI, whether it was uploaded now)."""
    from hkd_core.data import DataError
    from orchestrator.services.datasets import push, push_weights
    from orchestrator.services.storage import StorageError

    pc = load(overrides, "data")
    check_services(pc, "data", ray=False)
    try:
        if name == "inception":
            return push_weights(pc.storage, pc.run.eval.inception_weights)
        return push(pc.storage, name, pc.run.data.root)
    except (ConfigError, DataError, StorageError) as e:
        raise UsageError(str(e), "data") from None


def config_options() -> dict:
    """The config groups (``group=option``), each with its options and the first comment line of each option's
    YAML, the default option, and the experiment presets (packaged and the user's, ``$HKD_USER_CONF``)."""
    from orchestrator.config import options

    return options()

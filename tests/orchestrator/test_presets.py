"""Every shipped experiment preset and sweep YAML composes, validates and plans in --dry-run; group YAMLs carry
only what differs from the dataclass defaults (one source of defaults); sweeps write presets to the user's
folder, which is on Hydra's search path."""

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import CONF_DIR, compose, defaults

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml"))
GROUP_FILES = sorted(p for p in CONF_DIR.glob("*/*.yaml") if p.parent.name != "experiment")


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_shipped_presets_and_sweeps_are_found():
    assert {"smoke", "fmnist_small", "cifar_gpu", "study_fmnist", "study_cifar_gpu"} <= set(PRESETS)
    assert {"smoke.yaml", "scale_count.yaml", "subspace_dims.yaml"} <= set(SWEEPS)
    assert not [p for p in PRESETS if p.startswith("sweep_")], "generated presets belong in the user's folder"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_plans_in_dry_run(name, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HKD_USER_CONF", str(tmp_path))
    command = "study" if name.startswith("study") else "pipeline"
    assert main([command, f"experiment={name}", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    configs = [v["config"] for v in out["variants"].values()] if command == "study" else [out["config"]]
    text = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())
    for cfg in configs:
        leaves = _leaves(cfg)
        for key, value in _leaves({k: v for k, v in text.items() if k != "defaults"}).items():
            if key in ("train.states_per_traj", "eval.teacher_nfe") and command == "study":
                continue  # a study's variants set these themselves
            assert leaves[key] == value, (name, key)  # every key the preset names reaches the config
    if command == "pipeline":
        assert list(out["plan"]) == ["teacher", "trajectories", "distill", "evaluate"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_yaml_composes_and_plans_in_dry_run(name, capsys):
    assert main(["sweep", str(ROOT / "sweeps" / name), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["shared_stages"]) == ["teacher", "trajectories"] and out["sweep"]["trials"] >= 1


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_group_yamls_carry_only_what_differs_from_the_dataclass_defaults(path):
    text = path.read_text()
    node = yaml.safe_load(text) or {}
    if path.parent.name != "experiment":
        node.pop("defaults", None)  # a group option's choice of another group's option (data -> its teacher)
    # a group option is its group's keys, or (`# @package _global_`) whole sections
    sections = node if text.startswith("# @package _global_") else {path.parent.name: node}
    for section, keys in sections.items():
        if section == "defaults":  # an experiment's choices of group options, not keys
            continue
        base = defaults()[section]
        for key, value in keys.items():
            assert key in base, f"{path}: {section}.{key} is not a config key"
            if isinstance(value, str) and value.startswith("${"):
                continue  # read from the environment: not a default
            assert value != base[key], f"{path}: {section}.{key}={value!r} repeats the dataclass default"


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_group_option_sets_only_its_own_section(path):
    """Only an experiment preset may span sections: a group option that set another group's keys would make
    that group's defaults depend on which option of this one was picked (teacher=edm once set data.limit)."""
    assert "@package" not in path.read_text(), f"{path}: a group option sets only {path.parent.name}.*"
    choices = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
    # what it may do besides: choose another group's option (data=cifar10_jpeg its teacher), which the command
    # line and an experiment still override
    assert all(
        c == "_self_" or (isinstance(c, dict) and next(iter(c)).startswith("override /")) for c in choices
    )


@pytest.mark.parametrize("teacher, limit, init", [("edm", None, "teacher"), ("empirical", 5000, "none")])
def test_the_teachers_auto_keys_resolve_by_the_teacher_and_yield_to_a_value_given(teacher, limit, init):
    """data.limit and model.init default to auto, which each teacher resolves before anything hashes the config;
    a value given on the command line is kept."""
    from orchestrator.config import load

    pc = load([f"teacher={teacher}"])
    assert (pc.run.data.limit, pc.run.model.init) == (limit, init)
    given = load([f"teacher={teacher}", "data.limit=700", "model.init=none"])
    assert (given.run.data.limit, given.run.model.init) == (700, "none")
    assert given.stages()["teacher"] != pc.stages()["teacher"]
    assert defaults()["data"]["limit"] == defaults()["model"]["init"] == "auto"


def test_a_wrong_data_limit_word_names_the_key_and_the_choices():
    from hkd_core.config import ConfigError
    from orchestrator.config import load

    with pytest.raises(ConfigError, match=r"data\.limit='all'.*null.*auto"):
        load(["data.limit=all"])


def test_a_preset_in_the_user_folder_is_found_by_name(tmp_path, monkeypatch):
    from orchestrator.sweep.results import write_preset

    monkeypatch.setenv("HKD_USER_CONF", str(tmp_path))
    path = write_preset("sweep_mine", "# @package _global_\ntrain:\n  lr: 0.0042\n")
    assert path == tmp_path / "experiment" / "sweep_mine.yaml"
    assert compose(["experiment=sweep_mine"])["train"]["lr"] == 0.0042
    assert not (CONF_DIR / "experiment" / "sweep_mine.yaml").exists()  # never into the installed package


def test_cifar10_chooses_its_own_teacher_and_a_teacher_given_still_wins():
    """data=cifar10_jpeg composes the teacher trained for it here (sigma_data 0.5, width 32, one block; what
    the shipped CIFAR teacher's record holds), not the Fashion-MNIST teacher's settings; teacher=... on the
    command line, or an experiment's own choice, overrides it."""
    from orchestrator.config import load

    cifar = load(["data=cifar10_jpeg"]).run.teacher
    assert (cifar.kind, cifar.channels, cifar.blocks, cifar.attn_resolutions, cifar.sigma_data) == (
        "edm",
        32,
        1,
        [],
        0.5,
    )
    assert load([]).run.teacher.sigma_data == 0.66  # Fashion-MNIST keeps its own
    assert load(["data=cifar10_jpeg", "teacher=empirical"]).run.teacher.kind == "empirical"
    assert load(["data=cifar10_jpeg", "teacher=edm"]).run.teacher.sigma_data == 0.66
    assert load(["experiment=cifar_gpu"]).run.teacher.channels == 128
    assert load(["experiment=smoke", "data=cifar10_jpeg"]).run.teacher.kind == "empirical"


# What a GPU preset may change from cifar_cpu: sizes (of the teacher and its training budget, of the student, the
# data generated, the training and the evaluation), the device and the workers. Anything else differing would be
# another code path.
SIZES = {
    "teacher": {
        "channels",
        "blocks",
        "attn_resolutions",
        "total_kimg",
        "max_train_s",
        "batch_size",
        "lr",
        "ema_halflife_kimg",
        "log_every_kimg",
        "checkpoint_every_kimg",
    },
    "model": {"preset"},
    "trajectories": {"num", "holdout", "shard_size", "batch_size"},
    "train": {
        "total_kimg",
        "batch_size",
        "lr_rampup_kimg",
        "lambda1_anneal_kimg",
        "ema_halflife_kimg",
        "log_every_kimg",
        "checkpoint_every_kimg",
        "states_per_traj",  # 4 states per trajectory: what a GPU affords (the paper's)
    },
    "eval": {"n", "batch_size", "teacher_nfe"},
    "cluster": "all",
}
# study_cifar_gpu's own design, as study_fmnist's: rows matched in size, the paper's ablation without the
# latent-consistency term
STUDY_DESIGN = {"model.grow_blocks", "train.latent_weight"}


def _differences(a: dict, b: dict) -> set[str]:
    la, lb = _leaves(a), _leaves(b)
    return {k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k)}


def _allowed(key: str) -> bool:
    section, _, name = key.partition(".")
    allowed = SIZES.get(section, set())
    return allowed == "all" or name in allowed


def test_the_gpu_presets_take_cifar_cpus_path_changing_only_sizes_device_and_workers():
    from orchestrator.config import load

    cpu = load(["experiment=cifar_cpu"])
    assert (
        cpu.run.data.name == "cifar10_jpeg"
        and cpu.run.teacher.kind == "edm"
        and cpu.run.model.init == "teacher"
    )
    assert not cpu.cluster.use_gpu
    gpu = load(["experiment=cifar_gpu"])
    assert gpu.cluster.use_gpu and gpu.run.model.preset == "cifar"
    other = {k for k in _differences(cpu.run.to_dict(), gpu.run.to_dict()) if not _allowed(k)}
    assert not other, f"cifar_gpu leaves cifar_cpu's path at {sorted(other)}"

    fmnist = load(["experiment=study_fmnist"]).run.to_dict()
    study = load(["experiment=study_cifar_gpu"])
    assert study.cluster.use_gpu and study.run.teacher == cpu.run.teacher  # the CIFAR teacher trained here
    other = {k for k in _differences(cpu.run.to_dict(), study.run.to_dict()) if not _allowed(k)}
    assert other == STUDY_DESIGN, f"study_cifar_gpu leaves cifar_cpu's path at {sorted(other - STUDY_DESIGN)}"
    assert all(_leaves(study.run.to_dict())[k] == _leaves(fmnist)[k] for k in STUDY_DESIGN)


def test_cifar_cpu_takes_its_first_steps_on_rgb_images():
    """cifar_cpu's first steps in this process, as its stages take them (the pipeline itself runs for 20 minutes;
    orchestrator/first_steps.py, which scripts/gpu_check.py runs for cifar_gpu on a GPU): CIFAR-10's JPEGs as
    three channels, its teacher (the shipped weights when they exist, else the configured network as
    initialised), Heun trajectories of it, the student started from the teacher's U-Net, a few steps of its
    training with the preset's recipe and its one-step samples."""
    from hkd_core.data import has_local_copy
    from orchestrator.first_steps import first_steps

    if not has_local_copy("cifar10_jpeg"):
        pytest.skip("CIFAR-10 (JPEG) is not on this machine: ../shared/data/cifar10_jpeg_files.tar.gz")
    r = first_steps(["experiment=cifar_cpu"])
    assert (
        r["data"]["images"] == [32, 3, 32, 32] and r["data"]["classes_seen"] > 3
    )  # the classes, not one folder
    assert r["teacher"]["params"] == 732_611  # the c32 teacher the screen chose (docs/results/issue27)
    assert r["teacher"]["trajectories"] == [16, 3, 3, 32, 32]
    assert r["student"]["tensors_from_teacher"] > 0  # started from the teacher's U-Net
    assert r["student"]["steps"] == 4 and len(r["student"]["losses"]) == 4
    assert r["student"]["one_step"] == [4, 3, 32, 32]

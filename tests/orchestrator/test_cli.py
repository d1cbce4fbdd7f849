"""The command line: a parser per command with only its own flags, `hkd config`, and the Python API it calls."""

from __future__ import annotations

import json

import pytest

from orchestrator import api
from orchestrator.analysis.editing import EditArgs
from orchestrator.cli import main
from orchestrator.cli.commands import HELP, parser_for


def test_each_command_has_its_own_help(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(name in top for name in HELP)
    assert main(["edit", "--help"]) == 0
    edit = capsys.readouterr().out
    assert edit != top and "--tau-mid" in edit and "--gauge" not in edit and "--variants" not in edit
    assert main(["compare", "--help"]) == 0
    assert "--gauge" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["pipeline", "--band", "high"],
        ["sweep", "x.yaml", "--gauge", "trained"],
        ["compare", "--variants", "hkd"],
        ["edit", "--resume", "s1"],
    ],
)
def test_a_flag_of_another_command_is_refused(argv, capsys):
    assert main(argv) == 2
    assert f"unrecognized arguments: {argv[-2]}" in capsys.readouterr().err


def test_no_or_an_unknown_command_says_what_there_is(capsys):
    assert main([]) == 2 and "no command" in capsys.readouterr().err
    assert main(["pipelin"]) == 2
    assert "unknown command 'pipelin'; choose one of pipeline, teacher" in capsys.readouterr().err


def test_edit_defaults_come_from_editargs_alone(capsys):
    """The flags default to None and the dataclass fills what was not given: one place for the defaults; the help
    shows the dataclass's values."""
    p = parser_for("edit")
    args = p.parse_intermixed_args([])
    assert all(
        getattr(args, k) is None for k in ("band", "tau_mid", "mask", "ratios", "samples", "n_bands", "order")
    )
    assert api.edit_args() == EditArgs()
    assert api.edit_args(band="low", tau_mid=0.25, ratios=[0, 1]) == EditArgs(
        band="low", tau_mid=0.25, ratios=(0.0, 1.0)
    )
    assert f"(default {EditArgs().tau_mid})" in p.format_help()
    with pytest.raises(api.UsageError, match=r"--tau-mid 1.5 must lie in \[0, 1\]") as e:
        api.edit_args(tau_mid=1.5)
    assert e.value.what == "edit" and e.value.exit_code == 2


def test_hkd_config_lists_groups_options_defaults_and_presets(tmp_path, monkeypatch, capsys):
    user = tmp_path / "conf" / "experiment"
    user.mkdir(parents=True)
    (user / "mine.yaml").write_text("# @package _global_\n# my own preset\ntrain: {total_kimg: 1}\n")
    monkeypatch.setenv("HKD_USER_CONF", str(tmp_path / "conf"))
    out = tmp_path / "opts.json"
    assert main(["config", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    opts = json.loads(out.read_text())
    g = opts["groups"]
    assert g["storage"]["default"] == "local" and {"fs", "local", "s3"} <= set(g["storage"]["options"])
    assert g["teacher"]["default"] == "edm" and "empirical" in g["teacher"]["options"]
    assert {"smoke", "fmnist_small", "study_fmnist", "mine"} <= set(opts["presets"])
    assert opts["presets"]["mine"].startswith("my own preset")  # the Hydra directive is skipped
    assert "  * local " in text and "    fs " in text and "mine" in text


def test_the_api_refuses_bad_input_before_any_work():
    with pytest.raises(api.UsageError, match="model.variant='gan' is not allowed") as e:
        api.pipeline(["model.variant=gan"])
    assert e.value.what == "config"
    with pytest.raises(
        api.UsageError, match="upto='fit': use one of teacher, trajectories, distill, evaluate"
    ):
        api.pipeline([], upto="fit")
    with pytest.raises(api.UsageError, match="name at least one MLflow run id") as e:
        api.compare([], ["storage=fs", "tracking=file"])
    assert e.value.what == "compare"
    plan = api.plan(api.load(["experiment=smoke", "storage=fs", "tracking=file"]), "distill")
    assert list(plan) == ["teacher", "trajectories", "distill"] and all(
        len(p["hash"]) == 12 for p in plan.values()
    )

"""A Ray job's driver leaves Ray's unpacked working directory for its own copy (issue 25): the folder Ray replaces
mid-run (WorkingDirPlugin.create unpacks with overwrite=True) can then go without the driver noticing."""

import importlib
import os
import shutil
import sys

from orchestrator.services.jobdir import in_ray_working_dir, settle


def test_the_driver_moves_to_a_private_copy_and_survives_the_original_going(tmp_path, monkeypatch):
    pkg_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    (pkg_dir / "jobpkg").mkdir(parents=True)
    (pkg_dir / "jobpkg" / "__init__.py").write_text("")
    (pkg_dir / "jobpkg" / "later.py").write_text("VALUE = 42\n")
    (pkg_dir / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    here = os.getcwd()
    monkeypatch.setattr(sys, "path", [str(pkg_dir)] + sys.path)
    monkeypatch.setenv("PYTHONPATH", f"{pkg_dir}{os.pathsep}/elsewhere")
    os.chdir(pkg_dir)
    try:
        import jobpkg  # imported from Ray's folder, as a job's modules are

        copy = settle(tmp_path / "private")
        assert copy is not None and copy.name == "_ray_pkg_abc" and not in_ray_working_dir(copy)
        shutil.rmtree(pkg_dir)  # what Ray's unpacking with overwrite=True does first
        assert os.getcwd() == str(copy) and (copy / "pyproject.toml").is_file()
        assert str(copy) in sys.path and str(pkg_dir) not in sys.path
        assert os.environ["PYTHONPATH"] == f"{copy}{os.pathsep}/elsewhere"
        assert importlib.import_module("jobpkg.later").VALUE == 42  # a lazy import after the folder went
        assert jobpkg.__path__[0] == str(copy / "jobpkg")
    finally:
        os.chdir(here)
        sys.modules.pop("jobpkg", None)
        sys.modules.pop("jobpkg.later", None)


def test_outside_a_ray_job_nothing_moves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settle(tmp_path / "private") is None and os.getcwd() == str(tmp_path)
    assert not (tmp_path / "private").exists()


def test_the_submit_command_packs_the_checkout_less_what_a_job_never_needs(tmp_path):
    import json

    from orchestrator.services.jobdir import JOB_EXCLUDES, submit_command

    cmd = submit_command(["hkd", "pipeline", "--", "x"], tmp_path, {"HKD_DATA_DIR": ""})
    assert cmd[1:3] == ["job", "submit"] and cmd[0].endswith("ray")
    assert cmd[cmd.index("--working-dir") + 1] == str(tmp_path)
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert env == {"excludes": JOB_EXCLUDES, "env_vars": {"HKD_DATA_DIR": ""}} and ".venv" in JOB_EXCLUDES
    assert cmd[cmd.index("--") + 1 :] == ["hkd", "pipeline", "--", "x"]  # the entrypoint after the first "--"
    assert "env_vars" not in json.loads(submit_command(["a"], tmp_path)[6])

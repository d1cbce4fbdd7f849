"""Every OSError the CLI prints names its path, or says why there is none (issue 25)."""

import os

from orchestrator.errors import describe


def test_an_os_error_names_its_path():
    try:
        open("/nonexistent/hkd/file.pt")
    except FileNotFoundError as e:
        assert describe(e) == "No such file or directory: /nonexistent/hkd/file.pt"
    assert describe(ValueError("plain")) == "plain"


def test_a_vanished_current_directory_is_named(tmp_path, monkeypatch):
    gone = tmp_path / "working_dir_files" / "_ray_pkg_abc"
    gone.mkdir(parents=True)
    here = os.getcwd()
    os.chdir(gone)
    monkeypatch.setenv("PWD", str(gone))
    try:
        gone.rmdir()
        try:
            os.getcwd()
        except FileNotFoundError as e:
            text = describe(e)
        assert str(gone) in text and "no longer exists" in text
    finally:
        os.chdir(here)


def test_an_os_error_without_a_path_says_where_it_was_raised():
    try:
        raise OSError(5, "Input/output error")
    except OSError as e:
        text = describe(e)
    assert text.startswith("Input/output error (no path given; raised at ") and "test_errors.py" in text

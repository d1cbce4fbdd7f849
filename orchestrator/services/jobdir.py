"""A Ray job's driver works in its own copy of the job's working directory (issue 25).

`ray job submit --working-dir .` starts the driver inside Ray's unpacked copy of that directory on the head
(``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``). That folder is not the driver's: Ray's
runtime-env agent unpacks it again whenever it sets up a new worker for the job on that node after the package
fell out of its URI cache, and unpacking *replaces* it (``WorkingDirPlugin.create`` calls
``download_and_unpack_package(..., overwrite=True)``, which removes the folder first). With rank 0 on another
node, the head's only users of the package are short-lived, so this happens mid-run: the driver's current
directory vanishes under it, and the next thing that asks for it (MLflow's ``log_model`` calls ``Path.cwd()``)
fails with a bare "[Errno 2] No such file or directory"; a lazy import from the working directory would fail
the same way.

``settle()`` runs first thing in the CLI: in such a folder it copies the folder to a private temporary one and
moves the process there (its current directory, ``sys.path``, ``PYTHONPATH`` and the ``__path__`` of packages
imported from it), so nothing in the driver depends on a folder that Ray may replace. Outside a Ray job it
does nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def in_ray_working_dir(path: Path) -> bool:
    parts = path.parts
    return any(a == "runtime_resources" and b == "working_dir_files" for a, b in zip(parts, parts[1:]))


def _moved(value: str, old: str, new: str) -> str:
    return new + value[len(old) :] if value == old or value.startswith(old + os.sep) else value


def settle(root: str | os.PathLike | None = None) -> Path | None:
    """Move a Ray job's driver out of Ray's unpacked working directory into a private copy; returns the copy
    (None where there was nothing to do). ``root``: the temporary folder to copy into (default: the system's)."""
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        return None
    if not in_ray_working_dir(cwd):
        return None
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="hkd-job-", dir=root)) / cwd.name
    shutil.copytree(cwd, dest, symlinks=True)
    old, new = str(cwd), str(dest)
    os.chdir(dest)
    os.environ["PWD"] = new
    sys.path[:] = [_moved(p, old, new) for p in sys.path]
    if os.environ.get("PYTHONPATH"):
        os.environ["PYTHONPATH"] = os.pathsep.join(
            _moved(p, old, new) for p in os.environ["PYTHONPATH"].split(os.pathsep)
        )
    for mod in list(sys.modules.values()):
        paths = getattr(mod, "__path__", None)
        if paths is not None and not isinstance(paths, str):
            try:
                moved = [_moved(p, old, new) for p in paths]
            except TypeError:
                continue
            if moved != list(paths):
                try:
                    paths[:] = moved
                except TypeError:
                    mod.__path__ = moved
    log.info(
        "ray job: the driver works in a private copy of its working directory, %s (Ray may replace %s)",
        dest,
        cwd,
    )
    return dest


# What a job's working dir never needs: Ray uploads the rest of the checkout as the job's package (the same list
# as the README's `ray job submit` line)
JOB_EXCLUDES = [".venv", ".stack", "runs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info"]


def submit_command(entrypoint: list[str], working_dir: str | Path, env_vars: dict | None = None) -> list[str]:
    """The `ray job submit` command line that runs ``entrypoint`` with ``working_dir`` (less JOB_EXCLUDES) as the
    job's package and ``env_vars`` in its environment; the ``ray`` beside this interpreter. The caller sets
    RAY_ADDRESS (and the token) in the environment it runs it with."""
    import json

    runtime_env = {"excludes": JOB_EXCLUDES, **({"env_vars": env_vars} if env_vars else {})}
    ray = str(Path(sys.executable).parent / "ray")
    head = [
        ray,
        "job",
        "submit",
        "--working-dir",
        str(working_dir),
        "--runtime-env-json",
        json.dumps(runtime_env),
    ]
    return [*head, "--", *entrypoint]

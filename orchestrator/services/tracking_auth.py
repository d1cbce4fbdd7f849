"""A tracking server with basic authentication: the user name and password come from a file that
``$HKD_MLFLOW_CREDENTIALS`` names, read into this process's environment where MLflow's client looks; only the
file's path ever travels (to Ray workers, in job specs), never the password."""

from __future__ import annotations

import os
from pathlib import Path

CREDENTIALS_ENV = "HKD_MLFLOW_CREDENTIALS"


def use_credentials_file() -> str | None:
    """A tracking server with basic authentication: its user name and password from the file that
    ``$HKD_MLFLOW_CREDENTIALS`` names (MLflow's own format, ``[mlflow]`` with ``mlflow_tracking_username`` and
    ``mlflow_tracking_password``; on a cluster a Secret mounted at the same path on every node), put into this
    process's environment where MLflow's client reads them. Only the path travels to Ray workers
    (raycluster.env_for_workers), never the password; credentials already in the environment win. Returns the
    user name, or None when there is no file to read."""
    path = os.environ.get(CREDENTIALS_ENV)
    if not path:
        return None
    import configparser

    f = Path(path).expanduser()
    cp = configparser.ConfigParser()
    if not f.is_file() or not cp.read(f) or "mlflow" not in cp:
        raise ValueError(
            f"{CREDENTIALS_ENV}={path}: no such file, or no [mlflow] section in it; write "
            f"mlflow_tracking_username and mlflow_tracking_password under [mlflow], or unset it"
        )
    sec = cp["mlflow"]
    user, password = sec.get("mlflow_tracking_username"), sec.get("mlflow_tracking_password")
    if not user or not password:
        raise ValueError(
            f"{CREDENTIALS_ENV}={path}: [mlflow] needs both mlflow_tracking_username and "
            f"mlflow_tracking_password"
        )
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return os.environ["MLFLOW_TRACKING_USERNAME"]

"""A client's view of the local stack (infra/local/stack.py): where no endpoint is set and a stack runs,
its S3, MLflow and Ray endpoints are used, its credentials by file path and its Ray token by path; no secret is
exported or printed."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def adopt_local_stack() -> None:
    """If no endpoints are set and a local stack is running, use it (without exporting any secret)."""
    state = Path(os.environ.get("HKD_STACK_DIR", ROOT / ".stack"))
    f = state / "stack.json"
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or not f.is_file():
        return
    info = json.loads(f.read_text())
    ports, services = info.get("ports", {}), info.get("services", {})
    if "s3" not in services:
        return
    os.environ.setdefault("AWS_ENDPOINT_URL", f"http://127.0.0.1:{ports['s3']}")
    os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", str(state / "credentials"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{ports['mlflow']}")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in services:
        os.environ.setdefault("RAY_ADDRESS", f"127.0.0.1:{ports['ray']}")
        token = state / "ray_token"
        if info.get("ray_auth", "token") == "token" and token.is_file():
            os.environ.setdefault("RAY_AUTH_MODE", "token")  # the path to the token, never the token
            os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(token))
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def uses_stack(cfg: dict) -> bool:
    """Does this composed config reach for the local stack's services (S3 or an MLflow server)?"""
    return cfg.get("storage", {}).get("kind") == "s3" or cfg.get("tracking", {}).get("kind") == "server"

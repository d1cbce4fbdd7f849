"""Does the Ray head a driver will join answer, and take its token? One TCP connection and one GCS call, in
well under a second, where ``ray.init`` would retry for 20 to 40 s and raise a bare ``ConnectionError``
(``hkd preflight`` and the gate of every command call it; each failure is one sentence)."""

from __future__ import annotations

import time

from orchestrator.services.storage import StorageError


def ray_target(address: str | None) -> str | None:
    """The Ray GCS address a driver will join, when it can be checked from here: None for an in-process Ray
    (no address), ``auto`` (found on this node by Ray itself) and Ray Client addresses (``ray://``)."""
    if not address or address == "auto" or address.startswith("ray://"):
        return None
    return address.split("://")[-1]


def ray_unreachable(address: str, err: object) -> str:
    return (
        f"Ray unreachable: nothing answers at {address} (cluster.address / RAY_ADDRESS: {err}); start the head "
        f"(python infra/local/stack.py start, or `ray start --head`) or fix the address"
    )


def ray_token_refused(address: str, where: str, mode: str) -> str:
    return (
        f"Ray refused this driver's token: the head at {address} runs with token authentication and the token "
        f"from {where} (RAY_AUTH_MODE={mode}) is missing or wrong; use the cluster's token (the local stack's "
        f"is .stack/ray_token)"
    )


def ray_check(address: str, timeout_s: float = 3.0) -> str:
    """Does the Ray head at ``address`` (host:port of its GCS) answer, and accept this driver's token? One TCP
    connection and one GCS call, in well under a second; ``ray.init`` itself retries a wrong address or a
    refused token for 20 to 40 s and then raises a bare ``ConnectionError``. Returns what it checked; raises
    StorageError with one sentence."""
    import os
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StorageError(
            f"bad Ray address {address!r} (cluster.address / RAY_ADDRESS): use host:port of the "
            f"head's GCS, e.g. 127.0.0.1:6379, or leave it unset for a Ray in this process"
        )
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise StorageError(ray_unreachable(address, e)) from None
    mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    try:
        from ray._raylet import GcsClient  # Ray's own GCS client (not a public API: skipped if it moves)
    except ImportError:
        return f"Ray at {address} answers ({time.monotonic() - t0:.2f} s; token not checked)"
    try:
        GcsClient(address=address).internal_kv_get(b"hkd-preflight", namespace=None, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - one sentence for the user
        text = str(e)
        if (
            type(e).__name__ == "AuthenticationError"
            or "InvalidAuthToken" in text
            or "Unauthenticated" in text
        ):
            where = os.environ.get("RAY_AUTH_TOKEN_PATH") or (
                "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else "~/.ray/auth_token"
            )
            raise StorageError(ray_token_refused(address, where, mode)) from None
        raise StorageError(
            f"Ray at {address} did not answer as a Ray head ({type(e).__name__}: {text[:200]}); "
            f"check cluster.address / RAY_ADDRESS"
        ) from None
    return f"Ray at {address} answers (auth {mode}, {time.monotonic() - t0:.2f} s)"

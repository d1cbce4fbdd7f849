"""Retrying the object store: which errors are transient (a dropped connection, a timeout, throttling, a 5xx),
``retry`` with jittered back-off until a deadline, and a counter of the retries botocore makes inside a client's
own calls (logged as the run's storage retries)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}


def is_transient(err: BaseException) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(
        err,
        (
            EndpointConnectionError,
            ConnectionClosedError,
            ReadTimeoutError,
            ConnectTimeoutError,
            ConnectionError,
        ),
    ):
        return True
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _TRANSIENT_CODES or status >= 500
    name = type(err).__name__
    return name in ("ProtocolError", "NewConnectionError", "IncompleteRead")


def retry(
    fn: Callable[[], T],
    what: str,
    deadline_s: float,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Call fn until it succeeds, retrying transient errors with jittered back-off until the deadline."""
    t0 = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            attempt += 1
            if not is_transient(e) or time.monotonic() - t0 > deadline_s:
                raise
            delay = min(8.0, 0.25 * 2 ** min(attempt, 6)) * (0.5 + random.random())
            log.warning(
                "%s failed (%s: %s); retry %d in %.1f s", what, type(e).__name__, str(e)[:200], attempt, delay
            )
            if on_retry:
                on_retry(attempt, e)
            time.sleep(delay)


def count_botocore_retries(client) -> dict:
    """A counter of the retries botocore makes inside this client's calls: every response (a success, or the
    error it finally gave up with) carries ResponseMetadata.RetryAttempts."""
    counter = {"retries": 0}

    def after(parsed=None, **_):
        counter["retries"] += int(((parsed or {}).get("ResponseMetadata") or {}).get("RetryAttempts", 0) or 0)

    def after_error(exception=None, **_):
        resp = getattr(exception, "response", None) or {}
        counter["retries"] += int((resp.get("ResponseMetadata") or {}).get("RetryAttempts", 0) or 0)

    client.meta.events.register("after-call.s3", after)
    client.meta.events.register("after-call-error.s3", after_error)
    return counter

"""Errors as a user should read them: an OSError always names its path (issue 25).

``str(FileNotFoundError())`` raised by ``os.getcwd()`` is "[Errno 2] No such file or directory": no path, nothing
to act on. ``describe`` adds what is known: the error's own file name(s); else, when the current directory has
gone (a Ray job's driver sits in Ray's unpacked copy of its working directory), that; else where it was raised.
"""

from __future__ import annotations

import os
import traceback


def describe(err: BaseException) -> str:
    """The error's message, with the path an OSError is about (or why there is none)."""
    if not isinstance(err, OSError):
        return str(err)
    what = err.strerror or str(err)
    if err.filename is not None:
        where = str(err.filename) + (f" -> {err.filename2}" if err.filename2 is not None else "")
        return f"{what}: {where}"
    try:
        os.getcwd()
    except FileNotFoundError:
        return (
            f"{what}: the current directory {os.environ.get('PWD', '(unknown)')} no longer exists (something "
            f"removed it while this process was in it)"
        )
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    return f"{what} (no path given; raised at {frames[-1].filename}:{frames[-1].lineno})" if frames else what


def summary(err: BaseException) -> str:
    """One line for an exception that ended a command: for an error that wraps others (Ray Train's
    ``WorkerGroupError`` carries the workers' tracebacks as text), the innermost ``SomeError: message`` line;
    else ``describe``'s sentence."""
    import re

    lines = [ln.strip() for ln in str(err).splitlines()]
    inner = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): \S", ln)]
    return inner[-1] if inner else f"{type(err).__name__}: {describe(err)}"

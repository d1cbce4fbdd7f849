"""One driver per stage and config at a time: a lease beside the stage's output (``<stage>-<hash>/_RUNNING.json``).

Two drivers that start the same stage for the same config (two terminals, a job submitted twice, a study and a
pipeline sharing a teacher) would write the same folder, reopen the same MLflow run and resume each other's Ray
Train checkpoints. The first to take the lease runs the stage; the second stops at once with one sentence that
names the holder and says what to do (its result is reused once it is done). The holder renews the lease every
``HEARTBEAT_S``; a lease whose driver ran on this machine and has exited is taken over at once, and one not
renewed for ``STALE_S`` (its driver's machine is gone) after that; each with a warning.

Object stores have no create-if-absent here, so taking the lease is write, wait, read back: of two drivers that
write within the same instant, only the one whose write landed last reads its own token back; the other stops.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

log = logging.getLogger(__name__)
LEASE = "_RUNNING.json"
HEARTBEAT_S = 20.0
STALE_S = 120.0
SETTLE_S = 0.25  # between writing the lease and reading it back


def _alive(pid) -> bool:
    """Is process ``pid`` running on this machine? (True when it cannot be told: another user's process.)"""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


class StageBusyError(RuntimeError):
    """Another driver holds the stage's lease."""


class StageLease:
    """The lease of one stage's folder (``store``); ``Leases`` takes several at once."""

    def __init__(self, store, stage: str, token: str, since: float):
        self.store, self.stage, self.token, self.since = store, stage, token, since

    def read(self) -> dict | None:
        try:
            return json.loads(self.store.get(LEASE)) if self.store.exists(LEASE) else None
        except (ValueError, FileNotFoundError):
            return None  # removed between the two calls, or half a file: nobody's

    def write(self) -> None:
        held = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": self.since,
            "heartbeat": time.time(),
            "stage": self.stage,
        }
        self.store.put(LEASE, json.dumps(held).encode())

    def busy(self, held: dict, age: float, stale_s: float) -> StageBusyError:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
        return StageBusyError(
            f"{self.stage}: another driver is running this stage for this config (host {held.get('host')}, pid "
            f"{held.get('pid')}, since {started}, last heard from {age:.0f} s ago; lease {self.store.uri(LEASE)}). "
            f"Wait for it to finish and run again: its result is reused. If that driver is gone, its lease lapses "
            f"{max(0.0, stale_s - age):.0f} s from now, or delete the lease file."
        )

    def check(self, stale_s: float) -> None:
        """Refuse if another driver holds the lease, is alive as far as this machine can tell, and was heard
        from within ``stale_s``."""
        held = self.read()
        if not held or held.get("token") == self.token:
            return
        age = time.time() - float(held.get("heartbeat", 0))
        if held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
            # the holder ran on this machine and its process is gone (kill -9, a lost terminal): no need to wait
            log.warning(
                "%s: taking the stage over from driver pid %s on this machine, which has exited",
                self.stage,
                held.get("pid"),
            )
            return
        if age < stale_s:
            raise self.busy(held, age, stale_s)
        log.warning(
            "%s: taking the stage over from a driver not heard from for %.0f s (host %s, pid %s)",
            self.stage,
            age,
            held.get("host"),
            held.get("pid"),
        )

    def mine(self) -> bool:
        held = self.read()
        return bool(held) and held.get("token") == self.token

    def release(self) -> None:
        if self.mine():
            self.store.delete(LEASE)


class Leases:
    """``with Leases({"distill": store, ...}):`` holds the leases of the stages a driver is about to run: taken
    together (one wait to read them back), renewed by one thread, each given back by ``release(stage)`` when
    its stage is done, the rest on exit. Taking them raises ``StageBusyError`` before anything was opened."""

    def __init__(
        self,
        stores: dict,
        heartbeat_s: float = HEARTBEAT_S,
        stale_s: float = STALE_S,
        settle_s: float = SETTLE_S,
    ):
        token, since = uuid.uuid4().hex, time.time()
        self.held = {stage: StageLease(store, stage, token, since) for stage, store in stores.items()}
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.held:
            return
        for lease in self.held.values():
            lease.check(self.stale_s)
        for lease in self.held.values():
            lease.write()
        time.sleep(self.settle_s)
        lost = [lease for lease in self.held.values() if not lease.mine()]
        if lost:
            err = lost[0].busy(lost[0].read() or {}, 0.0, self.stale_s)
            self.release_all()
            raise err
        self._beat = threading.Thread(target=self._renew, name="stage-leases", daemon=True)
        self._beat.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                for lease in list(self.held.values()):
                    try:
                        lease.write()
                    except Exception as e:  # noqa: BLE001 - a missed beat is not the stage's failure
                        log.warning("%s: could not renew the stage's lease (%s)", lease.stage, str(e)[:200])

    def release(self, stage: str) -> None:
        with self._lock:
            lease = self.held.pop(stage, None)
            if lease is not None:
                lease.release()

    def release_all(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=self.heartbeat_s + 5)
        for stage in list(self.held):
            self.release(stage)

    def __enter__(self) -> Leases:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release_all()

"""Process helpers of the local stack and the clusters built beside it (infra/local/): free ports, health checks,
spawning a service in its own session, stopping all of it. Standard library only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on this machine now (each leaves room for a server that also opens port + 10000,
    as weed's gRPC does)."""
    import socket

    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind((HOST, 0))
        p = s.getsockname()[1]
        if p + 10000 < 65536 and p not in ports:
            ports.append(p)
        socks.append(s)
    for s in socks:
        s.close()
    return ports


def http_status(url: str, timeout: float = 2.0, headers: dict | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def port_taken(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers bind: a port in TIME_WAIT after our own stop is free; one that a program listens on is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def wait(check, what: str, timeout_s: float, log: Path, pid: int | None = None) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if check() and (pid is None or alive(pid)):  # our process answers, not whatever holds the port
            print(f"stack: {what} ready in {time.monotonic() - t0:.1f} s")
            return
        if pid is not None and not alive(pid):
            break  # it exited: no point waiting out the timeout
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else "(no log)"
    state = (
        "exited" if pid is not None and not alive(pid) else f"did not become healthy within {timeout_s:.0f} s"
    )
    raise SystemExit(f"stack: {what} {state}; last log lines ({log}):\n{tail}")


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie counts as dead
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def spawn(cmd: list[str], log: Path, env: dict) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )  # its own process group, so stop can end all of it
    return p.pid


def session_members(sid: int) -> list[int]:
    """Processes in session ``sid`` (what a service started with start_new_session spawned)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def stop_pid(name: str, pid: int, grace_s: float = 20.0) -> None:
    """SIGTERM the service's whole session (its children too), then SIGKILL what is left."""
    if not alive(pid) and not session_members(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for member in session_members(pid) or [pid]:
            try:
                os.kill(member, sig)
            except OSError:
                pass
        t0 = time.monotonic()
        while session_members(pid) and time.monotonic() - t0 < grace_s:
            time.sleep(0.2)
        if not session_members(pid):
            break
    print(f"stack: stopped {name} (pid {pid})")

#!/usr/bin/env python3
"""A Ray cluster of several nodes on this one machine: a head and worker nodes, each a ``ray start --block``
process of its own, for the multi-node tests, the two-node benchmark, and trying the cluster path by hand.

    python infra/local/cluster.py start --dir D [--nodes 3,2] [--first-ip 127.0.0.2]   # CPUs per node
    python infra/local/cluster.py env --dir D       # exports for submitters: RAY_ADDRESS, the token's path
    python infra/local/cluster.py add-node --cpus 2 --dir D   # one more worker node (the cluster grows)
    python infra/local/cluster.py kill-node 1 --dir D   # kill -9 of node 1's raylet (a lost node)
    python infra/local/cluster.py stop --dir D

Each node binds its own loopback address (127.0.0.2 for the head, 127.0.0.3, ... for the others): Ray replaces
127.0.0.1 by the machine's network address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that variable
a second node cannot join, so the nodes here never set it. Every port comes from the free ones, so a cluster
runs beside the local stack's one-node head. Each node has its own ``--temp-dir`` (under a short /tmp/hkdc-*
folder: Ray's socket paths must stay under 108 bytes), HOME and ``HKD_CACHE`` under ``D/node<i>/``; worker
node ``i`` also carries the custom resource ``node<i>`` (one unit) so work can be
pinned to it. Token authentication is on (``D/ray_token``, 0600, never printed): the nodes and every submitter
get ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``. Nodes are stopped by process group, never with
``ray stop`` (which ends every Ray on the machine).

Storage and tracking come from the environment ``start`` is given (``eval "$(python infra/local/stack.py env)"``
first): the nodes share no folder for data, checkpoints or trajectories, only S3 and MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402  (the local stack's process helpers)
import stack  # noqa: E402

# what the stack's environment sets for a one-node Ray on 127.0.0.1 and a multi-node one must not inherit
DROP = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "HKD_DATA_DIR", "RAY_AUTH_TOKEN", "HKD_STACK_DIR")


def node_ip(first_ip: str, i: int) -> str:
    a, b, c, d = (int(x) for x in first_ip.split("."))
    if a != 127 or d + i > 254:
        raise SystemExit(
            f"cluster: --first-ip {first_ip} must be a loopback address 127.x.y.z with room for {i + 1} nodes"
        )
    return f"{a}.{b}.{c}.{d + i}"


class LocalCluster:
    """A head (node 0) and worker nodes on consecutive loopback addresses; state in ``<dir>/cluster.json``."""

    def __init__(self, state: Path):
        self.dir = Path(state)
        f = self.dir / "cluster.json"
        self.st = json.loads(f.read_text()) if f.is_file() else {"nodes": []}
        self.base = dict(os.environ)  # the environment new nodes start from (start() sets it)

    # ---- what clients need -------------------------------------------------------------------------------
    @property
    def token_path(self) -> Path:
        return stack.ray_token(self.dir)

    @property
    def gcs(self) -> str:
        return f"{self.st['nodes'][0]['ip']}:{self.st['ports']['gcs']}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.st['nodes'][0]['ip']}:{self.st['ports']['dashboard']}"

    def client_env(self) -> dict:
        """For ``ray job submit`` and the state API: the head's dashboard and the token's path."""
        return {
            "RAY_ADDRESS": self.dashboard,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }

    def _get(self, path: str):
        import urllib.request

        req = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": "Bearer " + self.token_path.read_text().strip()}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        """The nodes the head's GCS sees alive: [{node_id, node_ip, resources_total, ...}] (Ray's state API)."""
        try:
            rows = self._get("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []
        return [r for r in rows if r.get("state") == "ALIVE"]

    # ---- start and stop ----------------------------------------------------------------------------------
    def _save(self) -> None:
        tmp = self.dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(self.st, indent=1))
        os.replace(tmp, self.dir / "cluster.json")

    def _node_env(self, i: int, base: dict) -> dict:
        home = self.dir / f"node{i}"
        env = {k: v for k, v in base.items() if k not in DROP}
        env.update(
            HOME=str(home),
            HKD_CACHE=str(home / "cache"),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}",
        )  # jobs run `hkd`
        # a lost node is declared dead after 3 failed health checks 1 s apart (Ray's default: 5, 3 s apart): on
        # loopback a killed raylet refuses at once, and a busy one still has each check's 10 s timeout
        env.setdefault("RAY_health_check_period_ms", "1000")
        env.setdefault("RAY_health_check_failure_threshold", "3")
        return env

    def start(
        self, cpus: list[int], first_ip: str = "127.0.0.2", env: dict | None = None, timeout_s: float = 300
    ) -> LocalCluster:
        """Start the head with ``cpus[0]`` CPUs and one worker node per further entry; wait until the head sees
        them all alive."""
        if any(procs.alive(n.get("pid")) for n in self.st["nodes"]):
            raise SystemExit(f"cluster: {self.dir} already runs a cluster; stop it first")
        self.dir.mkdir(parents=True, exist_ok=True)
        base = dict(env if env is not None else os.environ)
        names = ["gcs", "dashboard", "client"] + [
            f"{k}{i}"
            for i in range(len(cpus))
            for k in ("nm", "om", "agent", "agent_grpc", "metrics", "renv")
        ]
        # Ray's socket paths live under --temp-dir and must stay under 108 bytes: a short folder of its own
        self.st = {
            "ports": dict(zip(names, procs.free_ports(len(names)))),
            "nodes": [],
            "tmp": tempfile.mkdtemp(prefix="hkdc-"),
        }
        self.st["first_ip"] = first_ip
        self.base = base
        for i, n_cpu in enumerate(cpus):
            self._start_node(i, n_cpu)
            if i == 0:
                procs.wait(
                    lambda: self._head_up(),
                    f"Ray head on {self.gcs} (dashboard {self.dashboard})",
                    timeout_s,
                    Path(self.st["nodes"][0]["log"]),
                    self.st["nodes"][0]["pid"],
                )
        self._wait_nodes(timeout_s)
        return self

    def _start_node(self, i: int, n_cpu: int) -> None:
        p = self.st["ports"]
        if f"nm{i}" not in p:  # a node added later: ports of its own
            p.update(
                zip(
                    [f"{k}{i}" for k in ("nm", "om", "agent", "agent_grpc", "metrics", "renv")],
                    procs.free_ports(6),
                )
            )
        ip = node_ip(self.st["first_ip"], i)
        home = self.dir / f"node{i}"
        (home / "cache").mkdir(parents=True, exist_ok=True)
        cmd = [
            stack._bin("ray"),
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--num-cpus={n_cpu}",
            f"--temp-dir={Path(self.st['tmp']) / f'n{i}'}",
            "--disable-usage-stats",
            f"--node-manager-port={p[f'nm{i}']}",
            f"--object-manager-port={p[f'om{i}']}",
            f"--dashboard-agent-listen-port={p[f'agent{i}']}",
            f"--dashboard-agent-grpc-port={p[f'agent_grpc{i}']}",
            f"--metrics-export-port={p[f'metrics{i}']}",
            f"--runtime-env-agent-port={p[f'renv{i}']}",
        ]
        if i == 0:
            # --num-cpus=0 on the head (as cluster guides advise): it schedules, and every task and Train worker
            # runs on the other nodes
            cmd += [
                "--head",
                f"--port={p['gcs']}",
                "--include-dashboard=true",
                f"--dashboard-host={ip}",
                f"--dashboard-port={p['dashboard']}",
                f"--ray-client-server-port={p['client']}",
            ]
        else:
            cmd += [f"--address={self.gcs}", f"--resources={json.dumps({f'node{i}': 1})}"]
        log = home / "ray.log"
        self.st["nodes"].append(
            {
                "ip": ip,
                "cpus": n_cpu,
                "pid": procs.spawn(cmd, log, self._node_env(i, self.base)),
                "log": str(log),
            }
        )
        self._save()

    def _wait_nodes(self, timeout_s: float) -> None:
        want = {n["ip"] for n in self.st["nodes"]}
        procs.wait(
            lambda: {r["node_ip"] for r in self.alive_nodes()} >= want,
            f"{len(want)} Ray nodes ({', '.join(sorted(want))})",
            timeout_s,
            Path(self.st["nodes"][-1]["log"]),
            self.st["nodes"][-1]["pid"],
        )

    def add_node(self, n_cpu: int, timeout_s: float = 300) -> str:
        """One more worker node (the cluster grows, as an autoscaler grows it); returns its address."""
        i = len(self.st["nodes"])
        self._start_node(i, n_cpu)
        self._wait_nodes(timeout_s)
        return self.st["nodes"][i]["ip"]

    def _head_up(self) -> bool:
        try:
            self._get("/api/version")
            return True
        except (OSError, ValueError):
            return False

    def raylet_pid(self, i: int) -> int | None:
        """The pid of node ``i``'s raylet (a member of that node's process group)."""
        for pid in procs.session_members(self.st["nodes"][i]["pid"]):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"/raylet"):
                return pid
        return None

    def kill_raylet(self, i: int) -> float:
        """kill -9 of node ``i``'s raylet, as a lost machine looks to the head; returns the time of the kill."""
        pid = self.raylet_pid(i)
        if pid is None:
            raise RuntimeError(f"node {i} ({self.st['nodes'][i]['ip']}) has no raylet running")
        os.kill(pid, signal.SIGKILL)
        return time.time()

    def stop_node(self, i: int) -> None:
        procs.stop_pid(f"ray node {i} ({self.st['nodes'][i]['ip']})", self.st["nodes"][i]["pid"], grace_s=5)

    def stop(self) -> None:
        for i in reversed(range(len(self.st["nodes"]))):
            self.stop_node(i)
        if self.st.get("tmp"):
            shutil.rmtree(self.st["tmp"], ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["start", "env", "status", "add-node", "kill-node", "stop"])
    ap.add_argument(
        "node", nargs="?", type=int, help="kill-node: the node's index (1 = the first worker node)"
    )
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument(
        "--nodes",
        default="2,2",
        help="CPUs of the head, then of each worker node (default 2,2; a head "
        "of 0 CPUs, as on clusters, puts all work on the others)",
    )
    ap.add_argument("--cpus", type=int, default=2, help="add-node: the new node's CPUs (default 2)")
    ap.add_argument(
        "--first-ip", default="127.0.0.2", help="the head's loopback address; workers take the next"
    )
    a = ap.parse_args(argv)
    c = LocalCluster(a.dir)
    if a.action == "start":
        c.start([int(x) for x in a.nodes.split(",")], a.first_ip)
        print(f"cluster: {len(c.st['nodes'])} nodes, head {c.gcs}, dashboard {c.dashboard}")
    elif a.action == "env":
        print("\n".join(f"export {k}={v}" for k, v in c.client_env().items()))
    elif a.action == "status":
        print(
            json.dumps(
                [
                    {"ip": r["node_ip"], "node_id": r["node_id"], "head": r.get("is_head_node")}
                    for r in c.alive_nodes()
                ],
                indent=1,
            )
        )
    elif a.action == "add-node":
        print(f"cluster: added a node on {c.add_node(a.cpus)} with {a.cpus} CPUs")
    elif a.action == "kill-node":
        if not a.node:
            ap.error("kill-node needs the index of a worker node (1, 2, ...)")
        c.kill_raylet(a.node)
        print(f"cluster: killed the raylet of node {a.node} ({c.st['nodes'][a.node]['ip']})")
    else:
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

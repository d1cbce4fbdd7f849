#!/usr/bin/env python3
"""The local stack on 127.0.0.1: a SeaweedFS S3 server, an MLflow server (SQLite, artifacts in S3), a Ray head.

    python infra/local/stack.py start [--ray] [--s3-port 8333] [--mlflow-port 5000] [--ray-port 6379]
    python infra/local/stack.py status
    python infra/local/stack.py env          # shell exports for clients: eval "$(python infra/local/stack.py env)"
    python infra/local/stack.py stop [--service s3|mlflow|ray]   # all, or one (start brings it back)

State lives in ``--dir`` (default ``$HKD_STACK_DIR`` or ``.stack/`` in the checkout): data, logs, PIDs,
and ``credentials`` (an S3 access key pair generated at first start, mode 0600, never printed: clients get
``AWS_SHARED_CREDENTIALS_FILE`` pointing at it; dev-only keys for this local server). The Ray head runs
with token authentication (``--ray-auth token``, the default): its token is generated into ``ray_token``
(0600) and clients get ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``, never the token itself. Every
server binds 127.0.0.1. ``start`` is idempotent: services
already healthy are left alone. ``stop`` ends what ``start`` started, by PID (process group).
Standard library only, so it runs before the project's packages are importable; the ``weed``, ``mlflow``
and ``ray`` executables are taken from the same virtual environment as this Python.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import alive, free_ports, http_status, port_taken, spawn, stop_pid, wait  # noqa: E402

__all__ = ["free_ports"]  # one of this module's helpers too (the tests and the cluster tools use it)

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
BUCKET = "hkd"
# Every fixed port each server opens, so that a second stack (the tests') can run beside the default one.
DEFAULTS = {
    "s3": 8333,
    "master": 9333,
    "volume": 9340,
    "filer": 8888,
    "mlflow": 5000,
    "ray": 6379,
    "dashboard": 8265,
    "agent": 52365,
    "client": 10001,
}


def default_dir() -> Path:
    return Path(os.environ.get("HKD_STACK_DIR", ROOT / ".stack")).expanduser().resolve()


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(
            f"stack: `{name}` not found next to {sys.executable} or on PATH; run infra/setup.sh first"
        )
    return found


def require_free(st: dict, names: list[str], grpc: bool = False) -> None:
    """Refuse to start a service on a port another program holds (else the health check may take that program's
    answer for ours): one sentence naming the port and the flag that moves it. ``grpc``: SeaweedFS also opens
    each port + 10000."""
    for name in names:
        port = st["ports"][name]
        for p, what in ((port, ""), (port + 10000, f" (its gRPC port, --{name}-port + 10000)"))[
            : 2 if grpc else 1
        ]:
            if port_taken(p):
                raise SystemExit(
                    f"stack: port {p} on {HOST}{what} for {name} is taken by another program; stop that "
                    f"program or start the stack with --{name}-port <a free port>"
                )


def credentials(state: Path) -> dict:
    """The local server's key pair: generated once, stored 0600 in the state folder."""
    f = state / "credentials"
    if not f.is_file():
        state.mkdir(parents=True, exist_ok=True)
        creds = {
            "aws_access_key_id": "hkd" + secrets.token_hex(8),
            "aws_secret_access_key": secrets.token_hex(24),
        }
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("[default]\n" + "".join(f"{k} = {v}\n" for k, v in creds.items()))
    out = {}
    for line in f.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def ray_token(state: Path) -> Path:
    """The Ray head's auth token: generated once, stored 0600 in the state folder."""
    f = state / "ray_token"
    if not f.is_file():
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return f


def ray_auth_env(state: Path, st: dict) -> dict:
    if st.get("ray_auth", "token") == "token":
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token(state))}
    return {"RAY_AUTH_MODE": "disabled"}


def _ray_up(state: Path, st: dict) -> bool:
    """The dashboard answers (with the token, under token auth: without it the answer is 401)."""
    headers = {}
    if st.get("ray_auth", "token") == "token":
        headers["Authorization"] = "Bearer " + ray_token(state).read_text().strip()
    return http_status(f"http://{HOST}:{st['ports']['dashboard']}/api/version", headers=headers) == 200


def load_state(state: Path) -> dict:
    f = state / "stack.json"
    return json.loads(f.read_text()) if f.is_file() else {"services": {}}


def save_state(state: Path, d: dict) -> None:
    tmp = state / "stack.json.tmp"
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, state / "stack.json")


def endpoints(st: dict) -> dict:
    ports = st["ports"]
    return {
        "s3": f"http://{HOST}:{ports['s3']}",
        "mlflow": f"http://{HOST}:{ports['mlflow']}",
        "ray": f"{HOST}:{ports['ray']}" if "ray" in st["services"] else None,
        "dashboard": f"http://{HOST}:{ports['dashboard']}" if "ray" in st["services"] else None,
    }


def client_env(state: Path, st: dict) -> dict:
    """What a client of this stack needs in its environment."""
    credentials(state)
    ep = endpoints(st)
    # The keys stay in the 0600 credentials file (boto3, pyarrow and MLflow all read it through
    # AWS_SHARED_CREDENTIALS_FILE), so no secret ever sits in an environment listing or a log.
    # fmt: off
    env = {"AWS_ENDPOINT_URL": ep["s3"], "AWS_SHARED_CREDENTIALS_FILE": str(state / "credentials"),
           "AWS_PROFILE": "default", "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_S3_ENDPOINT_URL": ep["s3"], "MLFLOW_TRACKING_URI": ep["mlflow"], "HKD_S3_BUCKET": BUCKET,
           "MLFLOW_DISABLE_TELEMETRY": "true",     # MLflow >= 3.2 reports usage by default; not from this stack
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HKD_STACK_DIR": str(state)}
    # fmt: on
    if ep["ray"]:
        env["RAY_ADDRESS"] = ep["ray"]
        env.update(ray_auth_env(state, st))
    return env


def start_s3(state: Path, st: dict) -> None:
    p = st["ports"]
    if alive(st["services"].get("s3", {}).get("pid")) and http_status(f"http://{HOST}:{p['s3']}/") == 403:
        print("stack: s3 already running")
        return
    require_free(st, ["s3", "master", "volume", "filer"], grpc=True)
    creds = credentials(state)
    cfg = state / "s3.json"
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        # fmt: off
        json.dump({"identities": [{"name": "hkd", "credentials": [
            {"accessKey": creds["aws_access_key_id"], "secretKey": creds["aws_secret_access_key"]}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, fh)
        # fmt: on
    data = state / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    (state / "logs" / "seaweedfs").mkdir(parents=True, exist_ok=True)
    # -logdir is a global flag: it goes before the subcommand
    # fmt: off
    cmd = [_bin("weed"), f"-logdir={state / 'logs' / 'seaweedfs'}", "mini", f"-dir={data}", f"-ip={HOST}",
           f"-ip.bind={HOST}", f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
           f"-filer.port={p['filer']}",
           f"-s3.config={cfg}", f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
           "-s3.port.lance=0", "-master.telemetry=false"]          # no anonymous statistics sent anywhere
    # fmt: on
    log = state / "logs" / "s3.log"
    st["services"]["s3"] = {"pid": spawn(cmd, log, dict(os.environ)), "log": str(log)}
    save_state(state, st)
    # 403 to an anonymous request: the server is up and enforcing auth
    pid = st["services"]["s3"]["pid"]
    up = lambda: http_status(f"http://{HOST}:{p['s3']}/") == 403
    wait(up, f"S3 (SeaweedFS) on {HOST}:{p['s3']}", 60, log, pid)
    wait(lambda: _bucket_ready(state, st), f"bucket s3://{BUCKET}", 60, log, pid)


def _bucket_ready(state: Path, st: dict) -> bool:
    """The bucket answers an authenticated listing (boto3, if this Python has it; else trust -bucket)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return True
    creds = credentials(state)
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoints(st)["s3"],
            aws_access_key_id=creds["aws_access_key_id"],
            aws_secret_access_key=creds["aws_secret_access_key"],
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        s3.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
        return True
    except Exception:
        return False


# The server's SQLAlchemy pool: MLflow's 5 + 10 ran out at 64 concurrent trials on SQLite (400 "QueuePool limit
# ... reached"); 32 + 64 held them (docs/results/issue28).
SQLITE_POOL = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "32", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "64"}


def mlflow_server_env(environ) -> dict:
    """The server's environment: the caller's (its own pool size wins), the pool above, no jobs, no tracking URI."""
    env = {**SQLITE_POOL, **environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_mlflow(state: Path, st: dict) -> None:
    p = st["ports"]
    if (
        alive(st["services"].get("mlflow", {}).get("pid"))
        and http_status(f"http://{HOST}:{p['mlflow']}/health") == 200
    ):
        print("stack: mlflow already running")
        return
    require_free(st, ["mlflow"])
    (state / "mlflow").mkdir(parents=True, exist_ok=True)
    env = mlflow_server_env({**os.environ, **client_env(state, st)})
    # fmt: off
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{BUCKET}/mlflow-artifacts", "--host", HOST, "--port", str(p["mlflow"]),
           "--workers", "1"]
    # fmt: on
    log = state / "logs" / "mlflow.log"
    st["services"]["mlflow"] = {"pid": spawn(cmd, log, env), "log": str(log)}
    save_state(state, st)
    wait(
        lambda: http_status(f"http://{HOST}:{p['mlflow']}/health") == 200,
        f"MLflow on {HOST}:{p['mlflow']}",
        90,
        log,
        st["services"]["mlflow"]["pid"],
    )


def head_data_dir(root: Path, environ) -> Path | None:
    """The data folder the Ray head hands its jobs as HKD_DATA_DIR: the caller's own $HKD_DATA_DIR, else the
    shared/data folder beside the checkout (or inside it) where hkd_core looks, else None (then a job finds
    the data set in the bucket, after `hkd data push`, or says how to put it there)."""
    if environ.get("HKD_DATA_DIR"):
        return Path(environ["HKD_DATA_DIR"]).expanduser().resolve()
    for d in (root.parent / "shared" / "data", root / "shared" / "data"):
        if d.is_dir():
            return d.resolve()
    return None


def start_ray(state: Path, st: dict, num_cpus: int | None) -> None:
    p = st["ports"]
    if alive(st["services"].get("ray", {}).get("pid")) and _ray_up(state, st):
        print("stack: ray already running")
        return
    require_free(st, ["ray", "dashboard", "agent", "client"])
    env = {**os.environ, **client_env(state, st), **ray_auth_env(state, st)}
    env.pop("RAY_ADDRESS", None)
    # One machine, one disk: a job submitted to this head (its driver runs in Ray's copy of the working
    # directory, where no shared/data sits beside it) reads the data sets from the checkout's shared/data.
    data = head_data_dir(ROOT, os.environ)
    if data:
        env["HKD_DATA_DIR"] = str(data)
    # jobs submitted to this head run `hkd` and `python` from this virtual environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # fmt: off
    cmd = [_bin("ray"), "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={p['ray']}",
           f"--dashboard-host={HOST}", f"--dashboard-port={p['dashboard']}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={p['agent']}", f"--ray-client-server-port={p['client']}",
           "--disable-usage-stats", f"--temp-dir={state / 'ray'}"]
    # fmt: on
    num_cpus = num_cpus or st.get("ray_num_cpus")
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
        st["ray_num_cpus"] = num_cpus
    log = state / "logs" / "ray.log"
    st["services"]["ray"] = {"pid": spawn(cmd, log, env), "log": str(log)}
    save_state(state, st)
    wait(
        lambda: _ray_up(state, st),
        f"Ray head on {HOST}:{p['ray']} (dashboard :{p['dashboard']})",
        120,
        log,
        st["services"]["ray"]["pid"],
    )
    if data:
        print(f"stack: jobs on this Ray head read data sets from {data} (HKD_DATA_DIR)")


def stop(state: Path, only: str | None = None) -> None:
    """Stop every service, or only one (its data stays; ``start`` brings it back on the same ports)."""
    st = load_state(state)
    # By process group only: `ray stop` would end every Ray on the machine, other stacks' included.
    for name in ("ray", "mlflow", "s3"):
        svc = st["services"].get(name)
        if svc and svc.get("pid") and only in (None, name):
            # Ray keeps nothing on disk that a stop could spoil, and some of its processes sit out SIGTERM: 5 s
            stop_pid(name, svc["pid"], grace_s=5.0 if name == "ray" else 20.0)
            if only:
                svc["pid"] = None  # kept in the listing so `env` and `start` still know the service
    if only is None:
        st["services"] = {}
    save_state(state, st)


def status(state: Path) -> dict:
    st = load_state(state)
    out = {}
    for name, svc in st.get("services", {}).items():
        out[name] = {"pid": svc["pid"], "alive": alive(svc["pid"])}
    if "ports" in st:
        out["endpoints"] = endpoints(st)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["start", "stop", "status", "env"])
    ap.add_argument("--dir", type=Path, default=None, help="state folder (default $HKD_STACK_DIR or .stack/)")
    ap.add_argument("--ray", action="store_true", help="also start a Ray head (ray start --head)")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs the Ray head offers")
    ap.add_argument(
        "--ray-auth",
        choices=["token", "disabled"],
        default=None,
        help="Ray token authentication (default token; the token is generated into <dir>/ray_token)",
    )
    ap.add_argument(
        "--service",
        choices=["s3", "mlflow", "ray"],
        default=None,
        help="stop: only this service (start restarts what is not running)",
    )
    for name, port in DEFAULTS.items():
        ap.add_argument(f"--{name}-port", type=int, default=None, help=f"default {port}")
    args = ap.parse_args(argv)
    state = (args.dir or default_dir()).resolve()
    state.mkdir(parents=True, exist_ok=True)
    st = load_state(state)
    if args.command == "start":
        ports = {**DEFAULTS, **st.get("ports", {})}
        for name in DEFAULTS:
            v = getattr(args, f"{name}_port")
            if v:
                ports[name] = v
        st["ports"] = ports
        if args.ray_auth:
            st["ray_auth"] = args.ray_auth
        save_state(state, st)
        start_s3(state, st)
        start_mlflow(state, st)
        if args.ray or "ray" in st["services"]:
            start_ray(state, st, args.num_cpus)
        ep = endpoints(st)
        print(
            f"stack: S3 {ep['s3']} (bucket {BUCKET})  MLflow UI {ep['mlflow']}"
            + (f"  Ray {ep['ray']} (dashboard {ep['dashboard']})" if ep["ray"] else "")
        )
        print(f'stack: for clients: eval "$({sys.executable} {Path(__file__)} env --dir {state})"')
    elif args.command == "stop":
        stop(state, args.service)
    elif args.command == "status":
        print(json.dumps(status(state), indent=1))
    elif args.command == "env":
        if "ports" not in st:
            raise SystemExit(f"stack: not started yet (no stack.json in {state})")
        for k, v in client_env(state, st).items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

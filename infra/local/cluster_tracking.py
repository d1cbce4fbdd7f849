#!/usr/bin/env python3
"""A tracking server built as a cluster runs it, on this machine: PostgreSQL (MLflow's backend store, its auth
database and Optuna's studies) and ``mlflow server --app-name basic-auth`` on it, artifacts proxied to the
local stack's S3, ``--allowed-hosts`` set. The rehearsal of ``infra/kuberay/mlflow.yaml`` (same server, same
flags) that the tests run against.

    python infra/local/cluster_tracking.py start [--dir DIR] [--stack-dir .stack] [--pg-port P] [--mlflow-port P]
    python infra/local/cluster_tracking.py env      # exports for clients (no secret: paths to 0600 files)
    python infra/local/cluster_tracking.py stop

Needs the local stack's S3 (``infra/local/stack.py start``) and Debian's ``postgresql`` package (its
``initdb``/``pg_ctl``; ``apt-get install postgresql``: .ci/run installs it). As root, PostgreSQL runs as the
``postgres`` user (it refuses root) in a data folder it owns under /tmp. Secrets are generated at the first
start into ``DIR`` with mode 0600 and never printed: ``pgpass`` (libpq's password file: clients get
``PGPASSFILE``), ``mlflow_credentials`` (an MLflow user for the clients: ``HKD_MLFLOW_CREDENTIALS``) and the
server's own ``basic_auth.ini`` (the admin). Every server binds 127.0.0.1. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402  (ports, spawning, waiting, stopping)
import stack  # noqa: E402

HOST = stack.HOST
DB_USER = "hkd"
DATABASES = ("mlflow", "mlflow_auth", "optuna")
AUTH_CACHE_TTL_S = 60  # basic_auth.ini's auth_cache_ttl_seconds (MLflow's default 0: no cache)
CLIENT_USER = "hkd-client"


def default_dir() -> Path:
    return stack.default_dir() / "cluster-tracking"


def pg_bin(name: str) -> str:
    """initdb/pg_ctl/psql: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest first)."""
    found = shutil.which(name) if name == "psql" else None
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = found or shutil.which(name)
    if not found:
        raise SystemExit(
            f"cluster-tracking: PostgreSQL's `{name}` not found (PATH, /usr/lib/postgresql/*/bin); "
            f"install Debian's postgresql package: apt-get install postgresql"
        )
    return found


def _secret_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if not runuser:
        raise SystemExit(
            "cluster-tracking: running as root needs `runuser` (util-linux) to start PostgreSQL as "
            "the postgres user"
        )
    return [runuser, "-u", "postgres", "--"]


def secrets_of(state: Path) -> dict:
    f = state / "secrets.json"
    if not f.is_file():
        state.mkdir(parents=True, exist_ok=True)
        # fmt: off
        _secret_file(f, json.dumps({"db": secrets.token_hex(16), "admin": secrets.token_hex(16),
                                    "client": secrets.token_hex(16), "flask": secrets.token_hex(24)}))
        # fmt: on
    return json.loads(f.read_text())


def db_url(st: dict, db: str, password: bool = False, sec: dict | None = None) -> str:
    """The SQLAlchemy URL of one database; without ``password`` (what clients and listings get) libpq takes it
    from PGPASSFILE."""
    auth = f"{DB_USER}:{sec['db']}" if password and sec else DB_USER
    return f"postgresql+psycopg://{auth}@{HOST}:{st['ports']['pg']}/{db}"


def start_postgres(state: Path, st: dict) -> None:
    sec = secrets_of(state)
    port = st["ports"]["pg"]
    if procs.alive(st["services"].get("pg", {}).get("pid")):
        print("cluster-tracking: postgresql already running")
        return
    stack.require_free({"ports": {"pg": port}}, ["pg"])
    data = Path(st.get("pg_data") or tempfile.mkdtemp(prefix="hkd-pg-"))
    st["pg_data"] = str(data)
    as_pg = _as_postgres()
    if as_pg:
        shutil.chown(data, "postgres", "postgres")
    log = state / "logs" / "postgresql.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if not (data / "PG_VERSION").exists():
        fd, pw = tempfile.mkstemp(prefix="hkd-pg-pw-")  # outside the data folder: initdb wants it empty
        with os.fdopen(fd, "w") as fh:
            fh.write(sec["db"] + "\n")
        try:
            if as_pg:
                shutil.chown(pw, "postgres", "postgres")
            # the superuser is the project's own user, with a password (scram) over TCP and on the local socket
            # fmt: off
            r = subprocess.run(as_pg + [pg_bin("initdb"), "-D", str(data), "-U", DB_USER, "--auth-local=scram-sha-256",
                                        "--auth-host=scram-sha-256", f"--pwfile={pw}", "-E", "UTF8"],
                               capture_output=True, text=True, timeout=120)
            # fmt: on
        finally:
            os.unlink(pw)
        if r.returncode:
            raise SystemExit(f"cluster-tracking: initdb failed in {data}:\n{(r.stdout + r.stderr)[-1500:]}")
    with open(log, "ab") as out:
        # fmt: off
        subprocess.run(as_pg + [pg_bin("pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(data / "server.log"),
                                "-o", f"-h {HOST} -p {port} -k {data}", "start"],
                       check=True, stdout=out, stderr=subprocess.STDOUT, timeout=90)
        # fmt: on
    pid = int((data / "postmaster.pid").read_text().split()[0])
    st["services"]["pg"] = {"pid": pid, "log": str(data / "server.log")}
    stack.save_state(state, st)
    _secret_file(state / "pgpass", f"{HOST}:{port}:*:{DB_USER}:{sec['db']}\n")
    env = {**os.environ, "PGPASSFILE": str(state / "pgpass")}
    for db in DATABASES:
        # fmt: off
        r = subprocess.run([pg_bin("psql"), "-h", HOST, "-p", str(port), "-U", DB_USER, "-d", "postgres", "-tAc",
                            f"SELECT 1 FROM pg_database WHERE datname = '{db}'"], env=env, capture_output=True,
                           text=True, timeout=30, check=True)
        # fmt: on
        if r.stdout.strip() != "1":
            # fmt: off
            subprocess.run([pg_bin("psql"), "-h", HOST, "-p", str(port), "-U", DB_USER, "-d", "postgres", "-qc",
                            f'CREATE DATABASE "{db}"'], env=env, check=True, timeout=30, capture_output=True)
            # fmt: on
    print(f"cluster-tracking: PostgreSQL on {HOST}:{port} ready (databases {', '.join(DATABASES)})")


def start_mlflow(state: Path, st: dict, stack_dir: Path) -> None:
    sec = secrets_of(state)
    port = st["ports"]["mlflow"]
    if (
        procs.alive(st["services"].get("mlflow", {}).get("pid"))
        and procs.http_status(f"http://{HOST}:{port}/health") == 200
    ):
        print("cluster-tracking: mlflow already running")
        return
    stack.require_free({"ports": {"mlflow": port}}, ["mlflow"])
    sst = stack.load_state(stack_dir)
    if "s3" not in sst.get("services", {}):
        raise SystemExit(
            f"cluster-tracking: the local stack's S3 is not running ({stack_dir}); start it first: "
            f"python infra/local/stack.py start"
        )
    ini = state / "basic_auth.ini"
    _secret_file(
        ini,
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {db_url(st, 'mlflow_auth')}\n"
        "admin_username = admin\n"
        f"admin_password = {sec['admin']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a credential checked once is trusted for a minute: without the cache every request pays a scrypt
        # hash (0.15 s of CPU here), which held MLflow on PostgreSQL to 93 metric values/s with 4 trials
        # (docs/results/issue28); a revoked password can go on working for at most this long
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n",
    )
    _secret_file(
        state / "mlflow_credentials",
        f"[mlflow]\nmlflow_tracking_username = {CLIENT_USER}\nmlflow_tracking_password = {sec['client']}\n",
    )
    env = {
        **os.environ,
        **stack.client_env(stack_dir, sst),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": sec["flask"],
        "PGPASSFILE": str(state / "pgpass"),
        # the backend store's URL carries no password (libpq reads PGPASSFILE): nothing secret on a command line
        "MLFLOW_BACKEND_STORE_URI": db_url(st, "mlflow"),
    }
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    allowed = ",".join(dict.fromkeys([f"{HOST}:{port}", f"{HOST}", *st.get("allowed_hosts", [])]))
    # fmt: off
    cmd = [stack._bin("mlflow"), "server", "--app-name", "basic-auth",
           "--artifacts-destination", f"s3://{stack.BUCKET}/mlflow-artifacts-cluster", "--host", HOST,
           "--port", str(port), "--workers", "2", "--allowed-hosts", allowed]
    # fmt: on
    log = state / "logs" / "mlflow.log"
    st["services"]["mlflow"] = {"pid": procs.spawn(cmd, log, env), "log": str(log)}
    stack.save_state(state, st)
    procs.wait(
        lambda: procs.http_status(f"http://{HOST}:{port}/health") == 200,
        f"MLflow (PostgreSQL, basic auth) on {HOST}:{port}",
        120,
        log,
        st["services"]["mlflow"]["pid"],
    )
    add_client_user(st, sec)


def add_client_user(st: dict, sec: dict) -> None:
    """The clients' user, not an admin: it manages the experiments and registered models it creates (MLflow's
    auth gives a resource's creator MANAGE) and reads the rest (default_permission READ). Created once through
    the auth REST API as the admin; its password only in the 0600 mlflow_credentials file."""
    import base64
    import urllib.error
    import urllib.request

    base = f"http://{HOST}:{st['ports']['mlflow']}"
    admin = {
        "Authorization": "Basic " + base64.b64encode(f"admin:{sec['admin']}".encode()).decode(),
        "Content-Type": "application/json",
    }

    def post(path: str, body: dict) -> int:
        req = urllib.request.Request(
            base + path, data=json.dumps(body).encode(), headers=admin, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    code = post("/api/2.0/mlflow/users/create", {"username": CLIENT_USER, "password": sec["client"]})
    if code not in (200, 400):  # 400: RESOURCE_ALREADY_EXISTS on a restart
        raise SystemExit(f"cluster-tracking: creating the client user failed (HTTP {code})")


def client_env(state: Path, st: dict) -> dict:
    return {
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{st['ports']['mlflow']}",
        "HKD_MLFLOW_CREDENTIALS": str(state / "mlflow_credentials"),
        "PGPASSFILE": str(state / "pgpass"),
        "HKD_OPTUNA_STORAGE": db_url(st, "optuna"),
    }


def stop(state: Path) -> None:
    st = stack.load_state(state)
    svc = st["services"].get("mlflow")
    if svc and svc.get("pid"):
        procs.stop_pid("mlflow", svc["pid"])
    if st.get("pg_data") and st["services"].get("pg"):
        subprocess.run(
            _as_postgres() + [pg_bin("pg_ctl"), "-D", st["pg_data"], "-m", "fast", "-w", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
        print("cluster-tracking: stopped postgresql")
    st["services"] = {}
    stack.save_state(state, st)


def purge(state: Path) -> None:
    """Stop, then remove the database folder (under /tmp) and the state folder."""
    stop(state)
    st = stack.load_state(state)
    if st.get("pg_data"):
        shutil.rmtree(st["pg_data"], ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["start", "stop", "purge", "env", "status"])
    ap.add_argument(
        "--dir", type=Path, default=None, help="state folder (default <stack dir>/cluster-tracking)"
    )
    ap.add_argument(
        "--stack-dir", type=Path, default=None, help="the local stack's folder (its S3 holds artifacts)"
    )
    ap.add_argument("--pg-port", type=int, default=None, help="default 5432")
    ap.add_argument("--mlflow-port", type=int, default=None, help="default 5001")
    ap.add_argument(
        "--allowed-hosts",
        default="",
        help="more host names the server answers to (comma-separated; 127.0.0.1:<port> always)",
    )
    a = ap.parse_args(argv)
    stack_dir = (a.stack_dir or stack.default_dir()).resolve()
    state = (a.dir or stack_dir / "cluster-tracking").resolve()
    state.mkdir(parents=True, exist_ok=True)
    st = stack.load_state(state)
    if a.command == "start":
        st["ports"] = {
            "pg": a.pg_port or st.get("ports", {}).get("pg", 5432),
            "mlflow": a.mlflow_port or st.get("ports", {}).get("mlflow", 5001),
        }
        if a.allowed_hosts:
            st["allowed_hosts"] = [h for h in a.allowed_hosts.split(",") if h]
        st.setdefault("services", {})
        stack.save_state(state, st)
        t0 = time.monotonic()
        start_postgres(state, st)
        start_mlflow(state, st, stack_dir)
        print(
            f"cluster-tracking: MLflow http://{HOST}:{st['ports']['mlflow']} (basic auth) on PostgreSQL "
            f"{HOST}:{st['ports']['pg']}, up in {time.monotonic() - t0:.1f} s"
        )
        print(f'cluster-tracking: for clients: eval "$({sys.executable} {Path(__file__)} env --dir {state})"')
    elif a.command == "stop":
        stop(state)
    elif a.command == "purge":
        purge(state)
    elif a.command == "status":
        # fmt: off
        print(json.dumps({k: {"pid": v["pid"], "alive": procs.alive(v["pid"])} for k, v in
                          st.get("services", {}).items()}, indent=1))
        # fmt: on
    elif a.command == "env":
        if "ports" not in st:
            raise SystemExit(f"cluster-tracking: not started yet (no stack.json in {state})")
        for k, v in client_env(state, st).items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

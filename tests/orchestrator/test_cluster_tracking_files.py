"""The cluster's tracking server as infra/local/cluster_tracking.py writes it: MLflow on PostgreSQL with basic
auth, allowed hosts, and no secret in any file it leaves readable (the server itself runs in
tests/integration/test_cluster_tracking.py)."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_cluster_tracking_server_runs_on_postgres_with_auth_allowed_hosts_and_no_secret_in_the_file():
    """infra/kuberay/mlflow.yaml (issue 25): `mlflow server` with the basic-auth app, PostgreSQL as backend store
    (its URL without a password: libpq's PGPASSWORD from a Secret), artifacts proxied to S3, --allowed-hosts
    naming the Service in-cluster and port-forward's 127.0.0.1; the auth config's keys are ones MLflow's
    auth app reads (its own default file), with its users in PostgreSQL too; every password from a Secret; the
    Ray pods mount the jobs' MLflow credentials file and name it in HKD_MLFLOW_CREDENTIALS."""
    import configparser

    text = (ROOT / "infra/kuberay/mlflow.yaml").read_text()
    docs = {
        (d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text.replace("${HKD_IMAGE}", "img"))
    }
    dep = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    c = dep["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert c["command"] == ["mlflow", "server"] and args["app-name"] == "basic-auth"
    assert args["artifacts-destination"].startswith("s3://")
    svc = docs[("Service", "mlflow")]["spec"]["ports"][0]["port"]
    hosts = args["allowed-hosts"].split(",")
    assert {f"mlflow:{svc}", f"mlflow.hkd.svc.cluster.local:{svc}", f"127.0.0.1:{svc}"} <= set(hosts)
    env = {e["name"]: e for e in c["env"]}
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert (
        uri.startswith("postgresql+psycopg://") and ":" not in uri.split("//")[1].split("@")[0]
    )  # no password
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    ini = configparser.ConfigParser()
    ini.read_string(docs[("ConfigMap", "hkd-mlflow-auth")]["data"]["basic_auth.ini"])
    import mlflow.server.auth as auth
    from mlflow.server.auth.config import AuthConfig

    default = configparser.ConfigParser()
    default.read(Path(auth.__file__).parent / "basic_auth.ini")
    known = set(default["mlflow"]) | set(AuthConfig._fields)  # what MLflow's read_auth_config reads
    assert set(ini["mlflow"]) <= known, set(ini["mlflow"]) - known
    # checked credentials cached: without it every request pays a scrypt hash (docs/results/issue28)
    assert int(ini["mlflow"]["auth_cache_ttl_seconds"]) > 0
    assert (
        ini["mlflow"]["database_uri"].startswith("postgresql+psycopg://")
        and "admin_password" not in ini["mlflow"]
    )
    pg = docs[("StatefulSet", "hkd-postgres")]["spec"]["template"]["spec"]["containers"][0]
    assert "secretKeyRef" in {e["name"]: e for e in pg["env"]}["POSTGRES_PASSWORD"]["valueFrom"]
    assert not re.search(r"(?i)password\s*[:=]\s*[\"']?[A-Za-z0-9]{8,}", text.split("apiVersion", 1)[1]), (
        "a literal password in the manifest"
    )
    for path in ("infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml"):
        for pod in re.findall(r"HKD_MLFLOW_CREDENTIALS, value: (\S+)\}", (ROOT / path).read_text()):
            assert pod == "/etc/hkd/mlflow/credentials"
        assert (ROOT / path).read_text().count("mountPath: /etc/hkd/mlflow") == 2, path  # head and workers

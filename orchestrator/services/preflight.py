"""``hkd preflight``: write, read and list a probe through each client (boto3, Ray's filesystem, MLflow's
artifact store) and say in one sentence what failed and what to do.

``gate`` is its cheap part, which every command that touches S3 or MLflow runs first (before Ray starts, in
about a second): one HEAD of the bucket and one call to the tracking server. A refused key, a bucket that
does not exist (a typo, unless ``storage.create_bucket=true``) or a server that does not answer then fails
with one sentence, exit code 2, and nothing written anywhere."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable

from orchestrator.services.raycheck import ray_check, ray_target
from orchestrator.services.rayfs import ray_storage
from orchestrator.services.storage import (
    S3Store,
    StorageConfig,
    StorageError,
    credentials_source,
    make_client,
    make_store,
)


class MissingBucket(StorageError):
    pass


def bucket_exists(client, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise MissingBucket(f"NoSuchBucket: {bucket}") from None
        raise


def classify(err: BaseException, cfg: StorageConfig) -> str:
    """One sentence naming the failure and what to do (the endpoint, the bucket and where the keys came from)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = cfg.resolved_endpoint() or "the AWS default endpoint"
    text = str(err)
    if (
        isinstance(err, (EndpointConnectionError, ConnectionError))
        or "Could not connect" in text
        or "Connection refused" in text
        or "connection refused" in text.lower()
    ):
        return (
            f"endpoint unreachable: nothing answers at {endpoint} (storage.endpoint_url); start the S3 server "
            f"(python infra/local/stack.py start) or fix the URL"
        )
    if isinstance(err, NoCredentialsError):
        return "no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage.credentials_file"
    code = ""
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
    if (
        code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken")
        or "AccessDenied" in text
        or "InvalidAccessKeyId" in text
        or "SignatureDoesNotMatch" in text
        or "403" in text
    ):
        return (
            f"bad credentials: {endpoint} refused the access key for s3://{cfg.bucket} "
            f"({code or 'access denied'}); the keys came from {credentials_source(cfg)}: fix them there, or "
            f"point storage.credentials_file (AWS_SHARED_CREDENTIALS_FILE) at the right file"
        )
    if (
        isinstance(err, MissingBucket)
        or code in ("NoSuchBucket",)
        or "NoSuchBucket" in text
        or "bucket does not exist" in text.lower()
    ):
        return (
            f"missing bucket: s3://{cfg.bucket} does not exist at {endpoint} (storage.bucket); check the "
            f"name, or create it with storage.create_bucket=true"
        )
    return f"{type(err).__name__}: {text[:300]}"


def preflight(
    cfg: StorageConfig, tracking_uri: str | None = None, ray_address: str | None = None
) -> list[dict]:
    """Write, read and list a probe through boto3, through Ray's pyarrow filesystem and (if a tracking URI is
    given) through MLflow's artifact store; ask the Ray head (if the driver joins one) with the driver's token.
    Returns one dict per check: name, ok, detail."""
    probe = f"_preflight/{uuid.uuid4().hex}.txt"
    body = b"hkd preflight probe"
    results = []
    if ray_target(ray_address):
        try:
            results.append({"name": "ray", "ok": True, "detail": ray_check(ray_target(ray_address))})
        except StorageError as e:
            results.append({"name": "ray", "ok": False, "detail": str(e)})
    if cfg.kind == "fs":
        return results + _preflight_fs(cfg, probe, body, tracking_uri)

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            results.append({"name": name, "ok": True, "detail": fn()})
        except Exception as e:  # noqa: BLE001 - reported to the user
            results.append({"name": name, "ok": False, "detail": classify(e, cfg)})

    def via_boto3() -> str:
        store = S3Store(dataclasses.replace(cfg, retry_deadline_s=0, max_attempts=1))
        bucket_exists(store.client, cfg.bucket)  # some servers create a bucket on first PUT: ask first
        store.put(probe, body)
        assert store.get(probe) == body, "read back different bytes"
        assert probe in store.list("_preflight/"), "probe missing from the listing"
        store.delete(probe)
        return f"write/read/list/delete {store.uri(probe)}"

    def via_pyarrow() -> str:
        import pyarrow.fs

        path, fs = ray_storage(cfg)
        target = f"{path}/{probe}"
        with fs.open_output_stream(target) as f:
            f.write(body)
        with fs.open_input_stream(target) as f:
            assert f.read() == body, "read back different bytes"
        listed = fs.get_file_info(pyarrow.fs.FileSelector(target.rsplit("/", 1)[0]))
        assert any(i.path == target for i in listed), "probe missing from the listing"
        fs.delete_file(target)
        return f"write/read/list/delete s3://{target} (Ray storage_path)"

    check("s3 (boto3)", via_boto3)
    if results[-1]["ok"]:
        check("ray storage (pyarrow)", via_pyarrow)
    if tracking_uri:
        from orchestrator.services.tracking import artifact_probe

        server = tracking_server_check(tracking_uri)
        results.append(server)
        if server["ok"]:
            check("mlflow artifacts", lambda: artifact_probe(tracking_uri, body))
    return results


def gate(
    cfg: StorageConfig,
    tracking_uri: str | None = None,
    timeout_s: float = 3.0,
    ray_address: str | None = None,
) -> list[str]:
    """The cheap part of preflight, before any work: the bucket answers to these keys (one HEAD; a missing
    bucket is created only with ``storage.create_bucket=true``), the tracking server answers (one GET), and the
    Ray head a driver will join answers and takes its token (``ray_target``; one GCS call).
    Returns what it did (for the log); raises StorageError with one sentence on the first failure."""
    done = []
    if cfg.kind == "s3":
        t0 = time.monotonic()
        client = make_client(
            dataclasses.replace(
                cfg,
                connect_timeout_s=min(cfg.connect_timeout_s, timeout_s),
                read_timeout_s=min(cfg.read_timeout_s, 2 * timeout_s),
            ),
            max_attempts=1,
        )
        try:
            bucket_exists(client, cfg.bucket)
            done.append(
                f"s3://{cfg.bucket} at {cfg.resolved_endpoint() or 'AWS'} answers "
                f"({time.monotonic() - t0:.2f} s)"
            )
        except MissingBucket as e:
            if not cfg.create_bucket:
                raise StorageError(classify(e, cfg)) from None
            try:
                client.create_bucket(Bucket=cfg.bucket)
            except Exception as err:  # noqa: BLE001 - one sentence for the user
                raise StorageError(classify(err, cfg)) from None
            done.append(
                f"s3://{cfg.bucket} created at {cfg.resolved_endpoint() or 'AWS'} (storage.create_bucket)"
            )
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - one sentence for the user
            raise StorageError(classify(e, cfg)) from None
    if tracking_uri:
        r = tracking_server_check(tracking_uri, timeout_s)
        if not r["ok"]:
            raise StorageError(r["detail"])
        done.append(r["detail"])
    if ray_target(ray_address):  # last: the only check that imports ray
        done.append(ray_check(ray_target(ray_address), timeout_s))
    return done


def tracking_server_check(uri: str, timeout_s: float = 5.0) -> dict:
    """Is an MLflow server answering at ``uri``? Asked once with a short timeout, because MLflow's own client
    retries a refused connection with backoff for minutes before it gives up."""
    import urllib.error
    import urllib.request

    name = "mlflow server"
    if not uri.startswith(("http://", "https://")):
        return {"name": name, "ok": True, "detail": f"{uri} (a local store: nothing to reach)"}
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
            r.read()
        health = "answers"
    except urllib.error.HTTPError as e:  # it answered: a server that has no /health is still a server
        health = f"answers (HTTP {e.code} on /health)"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return {
            "name": name,
            "ok": False,
            "detail": f"tracking server unreachable: nothing answers at {uri} (tracking.uri / MLFLOW_TRACKING_URI: "
            f"{reason}); start it (python infra/local/stack.py start) or fix the URL",
        }
    refused = tracking_auth_check(uri, timeout_s)
    if refused:
        return {"name": name, "ok": False, "detail": refused}
    return {"name": name, "ok": True, "detail": f"{uri} {health}"}


def tracking_auth_check(uri: str, timeout_s: float = 5.0) -> str | None:
    """One read through the REST API with the credentials this process would use (MLFLOW_TRACKING_USERNAME and
    _PASSWORD, the file $HKD_MLFLOW_CREDENTIALS names, or MLFLOW_TRACKING_TOKEN): a server with basic auth
    answers 401 to none or wrong ones, and MLflow >= 3.5 answers 403 "Invalid Host header" to a host name that
    its --allowed-hosts does not list. Returns the one sentence for a refusal, None when the read went through."""
    import base64
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    from orchestrator.services.tracking_auth import CREDENTIALS_ENV, use_credentials_file

    try:
        use_credentials_file()
    except ValueError as e:
        return f"tracking credentials: {e}"
    headers = {}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as r:
            r.read()
        return None
    except urllib.error.HTTPError as e:
        body = e.read(2000).decode("utf-8", "replace")
        host = urllib.parse.urlsplit(uri).netloc
        if e.code == 403 and "host" in body.lower():
            return (
                f"tracking server refused the host name {host}: its --allowed-hosts does not list it (MLflow >= "
                f"3.5); add {host} to the server's --allowed-hosts (infra/kuberay/mlflow.yaml) or reach it by a "
                f"name it lists"
            )
        if e.code == 401:
            given = f"user {user!r}" if user else "no credentials"
            return (
                f"tracking server at {uri} refused {given} (HTTP 401: it runs with basic authentication); set "
                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or point {CREDENTIALS_ENV} at a file "
                f"with them (what the cluster's nodes use)"
            )
        if e.code == 403:
            return (
                f"tracking server at {uri} refused user {user!r} read access (HTTP 403); grant it READ or "
                f"higher on the experiments (MLflow's auth API) or use another user"
            )
        return None  # any other answer: a server that is there and let us in (404: no Default)
    except (urllib.error.URLError, OSError):
        return None  # it answered /health a moment ago: the stages' retries handle a blip


def _preflight_fs(cfg: StorageConfig, probe: str, body: bytes, tracking_uri: str | None) -> list[dict]:
    """storage=fs: the folder is writable (and so is Ray's), and the tracking store answers."""
    results = []
    try:
        store = make_store(cfg)
        store.put(probe, body)
        assert store.get(probe) == body, "read back different bytes"
        store.delete(probe)
        results.append(
            {"name": "storage (fs)", "ok": True, "detail": f"write/read/delete {store.uri(probe)}"}
        )
    except (OSError, AssertionError) as e:
        results.append(
            {
                "name": "storage (fs)",
                "ok": False,
                "detail": f"storage.root {cfg.resolved_root()} is not writable ({e}); choose another folder",
            }
        )
    if tracking_uri:
        results.append(tracking_server_check(tracking_uri))
    return results


def safe_url(url: str) -> str:
    """An SQLAlchemy URL with its password masked (for messages and listings)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: show nothing of it that could be a secret
        return url.split("@")[-1] if "@" in url else url


def study_storage_check(url: str | None, where: str = "study_storage", timeout_s: float = 3.0) -> str | None:
    """A sweep's Optuna study on a database server (``study_storage: postgresql+psycopg://user@host/db``): one
    connection and ``SELECT 1``, so that a wrong password or a server that does not answer is one sentence
    before Ray starts. The password may sit in the URL or, kept out of files and listings, in libpq's password
    file (PGPASSFILE, default ~/.pgpass). Returns what it checked (None for SQLite or no URL); raises
    StorageError."""
    if not url or url.startswith("sqlite"):
        return None
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    try:
        u = make_url(url)
        args = {"connect_timeout": max(1, int(timeout_s))} if u.get_backend_name() == "postgresql" else {}
        engine = create_engine(u, connect_args=args, poolclass=NullPool)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as e:
        raise StorageError(
            f"{where}: {safe_url(url)} is not a database URL this driver can use ({e}); e.g. "
            f"postgresql+psycopg://hkd@db-host:5432/optuna (psycopg comes with the cluster extra)"
        ) from None
    t0 = time.monotonic()
    try:
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
    except SQLAlchemyError as e:
        first = (
            str(getattr(e, "orig", e)).strip().splitlines()[0]
            if str(getattr(e, "orig", e)).strip()
            else str(e)
        )
        if "password authentication failed" in first or "no password supplied" in first:
            raise StorageError(
                f"{where}: {safe_url(url)} refused user {u.username!r} ({first}); fix the password "
                f"in the URL or in libpq's password file (PGPASSFILE, default ~/.pgpass)"
            ) from None
        raise StorageError(
            f"{where}: cannot open the Optuna study database {safe_url(url)} ({first}); start the "
            f"server or fix the URL"
        ) from None
    finally:
        engine.dispose()
    return f"study storage {safe_url(url)} answers ({time.monotonic() - t0:.2f} s)"

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
from typing import Callable

from .storage import S3Store, StorageConfig, StorageError, credentials_source, make_client, make_store, \
    ray_storage


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
    if isinstance(err, (EndpointConnectionError, ConnectionError)) or "Could not connect" in text \
            or "Connection refused" in text or "connection refused" in text.lower():
        return (f"endpoint unreachable: nothing answers at {endpoint} (storage.endpoint_url); start the S3 server "
                f"(python infra/local/stack.py start) or fix the URL")
    if isinstance(err, NoCredentialsError):
        return "no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage.credentials_file"
    code = ""
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken") or \
            "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "403" in text:
        return (f"bad credentials: {endpoint} refused the access key for s3://{cfg.bucket} "
                f"({code or 'access denied'}); the keys came from {credentials_source(cfg)}: fix them there, or "
                f"point storage.credentials_file (AWS_SHARED_CREDENTIALS_FILE) at the right file")
    if isinstance(err, MissingBucket) or code in ("NoSuchBucket",) or "NoSuchBucket" in text \
            or "bucket does not exist" in text.lower():
        return (f"missing bucket: s3://{cfg.bucket} does not exist at {endpoint} (storage.bucket); check the "
                f"name, or create it with storage.create_bucket=true")
    return f"{type(err).__name__}: {text[:300]}"


def preflight(cfg: StorageConfig, tracking_uri: str | None = None, ray_address: str | None = None) -> list[dict]:
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
        bucket_exists(store.client, cfg.bucket)    # some servers create a bucket on first PUT: ask first
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
        from .tracking import artifact_probe

        server = tracking_server_check(tracking_uri)
        results.append(server)
        if server["ok"]:
            check("mlflow artifacts", lambda: artifact_probe(tracking_uri, body))
    return results


def gate(cfg: StorageConfig, tracking_uri: str | None = None, timeout_s: float = 3.0,
         ray_address: str | None = None) -> list[str]:
    """The cheap part of preflight, before any work: the bucket answers to these keys (one HEAD; a missing
    bucket is created only with ``storage.create_bucket=true``), the tracking server answers (one GET), and the
    Ray head a driver will join answers and takes its token (``ray_target``; one GCS call).
    Returns what it did (for the log); raises StorageError with one sentence on the first failure."""
    done = []
    if cfg.kind == "s3":
        t0 = time.monotonic()
        client = make_client(dataclasses.replace(cfg, connect_timeout_s=min(cfg.connect_timeout_s, timeout_s),
                                                 read_timeout_s=min(cfg.read_timeout_s, 2 * timeout_s)),
                             max_attempts=1)
        try:
            bucket_exists(client, cfg.bucket)
            done.append(f"s3://{cfg.bucket} at {cfg.resolved_endpoint() or 'AWS'} answers "
                        f"({time.monotonic() - t0:.2f} s)")
        except MissingBucket as e:
            if not cfg.create_bucket:
                raise StorageError(classify(e, cfg)) from None
            try:
                client.create_bucket(Bucket=cfg.bucket)
            except Exception as err:  # noqa: BLE001 - one sentence for the user
                raise StorageError(classify(err, cfg)) from None
            done.append(f"s3://{cfg.bucket} created at {cfg.resolved_endpoint() or 'AWS'} (storage.create_bucket)")
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - one sentence for the user
            raise StorageError(classify(e, cfg)) from None
    if tracking_uri:
        r = tracking_server_check(tracking_uri, timeout_s)
        if not r["ok"]:
            raise StorageError(r["detail"])
        done.append(r["detail"])
    if ray_target(ray_address):        # last: the only check that imports ray
        done.append(ray_check(ray_target(ray_address), timeout_s))
    return done


def ray_target(address: str | None) -> str | None:
    """The Ray GCS address a driver will join, when it can be checked from here: None for an in-process Ray
    (no address), ``auto`` (found on this node by Ray itself) and Ray Client addresses (``ray://``)."""
    if not address or address == "auto" or address.startswith("ray://"):
        return None
    return address.split("://")[-1]


def ray_unreachable(address: str, err: object) -> str:
    return (f"Ray unreachable: nothing answers at {address} (cluster.address / RAY_ADDRESS: {err}); start the head "
            f"(python infra/local/stack.py start, or `ray start --head`) or fix the address")


def ray_token_refused(address: str, where: str, mode: str) -> str:
    return (f"Ray refused this driver's token: the head at {address} runs with token authentication and the token "
            f"from {where} (RAY_AUTH_MODE={mode}) is missing or wrong; use the cluster's token (the local stack's "
            f"is .stack/ray_token)")


def ray_check(address: str, timeout_s: float = 3.0) -> str:
    """Does the Ray head at ``address`` (host:port of its GCS) answer, and accept this driver's token? One TCP
    connection and one GCS call, in well under a second; ``ray.init`` itself retries a wrong address or a
    refused token for 20 to 40 s and then raises a bare ``ConnectionError``. Returns what it checked; raises
    StorageError with one sentence."""
    import os
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StorageError(f"bad Ray address {address!r} (cluster.address / RAY_ADDRESS): use host:port of the "
                           f"head's GCS, e.g. 127.0.0.1:6379, or leave it unset for a Ray in this process")
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise StorageError(ray_unreachable(address, e)) from None
    mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    try:
        from ray._raylet import GcsClient          # Ray's own GCS client (not a public API: skipped if it moves)
    except ImportError:
        return f"Ray at {address} answers ({time.monotonic() - t0:.2f} s; token not checked)"
    try:
        GcsClient(address=address).internal_kv_get(b"hkd-preflight", namespace=None, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - one sentence for the user
        text = str(e)
        if type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in text or "Unauthenticated" in text:
            where = os.environ.get("RAY_AUTH_TOKEN_PATH") or ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN")
                                                              else "~/.ray/auth_token")
            raise StorageError(ray_token_refused(address, where, mode)) from None
        raise StorageError(f"Ray at {address} did not answer as a Ray head ({type(e).__name__}: {text[:200]}); "
                           f"check cluster.address / RAY_ADDRESS") from None
    return f"Ray at {address} answers (auth {mode}, {time.monotonic() - t0:.2f} s)"


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
        return {"name": name, "ok": True, "detail": f"{uri} answers"}
    except urllib.error.HTTPError as e:       # it answered: a server that has no /health is still a server
        return {"name": name, "ok": True, "detail": f"{uri} answers (HTTP {e.code} on /health)"}
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return {"name": name, "ok": False,
                "detail": f"tracking server unreachable: nothing answers at {uri} (tracking.uri / MLFLOW_TRACKING_URI: "
                          f"{reason}); start it (python infra/local/stack.py start) or fix the URL"}


def _preflight_fs(cfg: StorageConfig, probe: str, body: bytes, tracking_uri: str | None) -> list[dict]:
    """storage=fs: the folder is writable (and so is Ray's), and the tracking store answers."""
    results = []
    try:
        store = make_store(cfg)
        store.put(probe, body)
        assert store.get(probe) == body, "read back different bytes"
        store.delete(probe)
        results.append({"name": "storage (fs)", "ok": True, "detail": f"write/read/delete {store.uri(probe)}"})
    except (OSError, AssertionError) as e:
        results.append({"name": "storage (fs)", "ok": False,
                        "detail": f"storage.root {cfg.resolved_root()} is not writable ({e}); choose another folder"})
    if tracking_uri:
        results.append(tracking_server_check(tracking_uri))
    return results

"""S3-compatible object storage: one config for boto3, Ray's ``storage_path`` and MLflow alike.

``S3Store`` implements hkd_core's ``BlobStore`` (put/get/exists/size/uri) on a bucket and prefix. A PUT
is atomic in S3 (an object appears whole or not at all; multipart uploads appear only on completion).

Retries, in two layers:
- **botocore's own** (``retries={"mode": "adaptive", "total_max_attempts": storage.max_attempts}``): throttling,
  5xx and dropped connections, with its exponential back-off and adaptive mode's client-side rate limiting
  when the server throttles. Each S3Store counts them from ``ResponseMetadata.RetryAttempts``.
- **an outer deadline** (``retry``, ``storage.retry_deadline_s``), kept for a reason botocore cannot cover:
  its budget is a number of attempts with back-off capped at 20 s, while an S3 server that restarts (or a
  network that drops for a minute) is an outage in seconds. The outer loop retries what botocore gave up on
  until the deadline, and says so in the log (the checkpoint uploader prints each retry), so a store that is
  down for a minute costs time, not work.
``preflight`` writes, reads and lists a probe through each client and says exactly what failed.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hkd_core.blobstore import LocalStore
from orchestrator.services.retries import count_botocore_retries, retry

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(RuntimeError):
    """The store cannot be used as configured; the message says which key, URI or credential to fix."""


@dataclass
class StorageConfig:
    kind: str = "s3"  # s3 | fs (a local folder: one machine, no services; see storage/fs.yaml)
    root: str | None = None  # fs: the folder; None: $HKD_CACHE/store (default ~/.cache/hkd/store)
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333; None: $AWS_ENDPOINT_URL_S3, then
    # $AWS_ENDPOINT_URL, else AWS itself
    bucket: str = "hkd"
    prefix: str = "runs"  # every object of this project lives under s3://bucket/prefix/
    create_bucket: bool = False  # a bucket that does not exist is refused (a typo), unless this is true
    data_source: str = "auto"  # data sets: auto (the local disk, else s3://bucket/datasets/) | local | s3
    region: str = "us-east-1"
    credentials_file: str | None = (
        None  # an AWS-style INI file; None: $AWS_SHARED_CREDENTIALS_FILE or env keys
    )
    profile: str = "default"
    retry_deadline_s: float = 120.0  # keep retrying transient errors this long (the outer loop)
    max_attempts: int = 5  # botocore's attempts per call (adaptive mode), inside the outer loop
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def root_uri(self) -> str:
        if self.kind == "fs":
            return str(self.resolved_root() / self.prefix.strip("/")).rstrip("/")
        return f"s3://{self.bucket}/{self.prefix.strip('/')}".rstrip("/")

    def resolved_root(self) -> Path:
        if self.root:
            return Path(self.root).expanduser().resolve()
        from hkd_core.data import cache_dir

        return cache_dir().resolve() / "store"


def credentials_source(cfg: StorageConfig) -> str:
    """Where the S3 keys come from, in words (never the keys): for messages about refused credentials."""
    if cfg.credentials_file:
        env = os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
        via = (
            ", set from AWS_SHARED_CREDENTIALS_FILE"
            if env and Path(env).expanduser() == Path(cfg.credentials_file).expanduser()
            else ""
        )
        return f"the file {Path(cfg.credentials_file).expanduser()} [{cfg.profile}] (storage.credentials_file{via})"
    if os.environ.get("AWS_SHARED_CREDENTIALS_FILE"):
        return (
            f"the file {os.environ['AWS_SHARED_CREDENTIALS_FILE']} "
            f"[{os.environ.get('AWS_PROFILE', cfg.profile)}] (AWS_SHARED_CREDENTIALS_FILE)"
        )
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    return "the AWS SDK's default chain (~/.aws, an instance or pod role)"


def read_credentials(cfg: StorageConfig) -> tuple[str | None, str | None]:
    """Keys from the configured file, else $AWS_SHARED_CREDENTIALS_FILE, else the environment."""
    path = cfg.credentials_file or os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise StorageError(
                f"storage.credentials_file {p} does not exist; point it at an AWS-style credentials "
                f"file or unset it to use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        ini = configparser.ConfigParser()
        ini.read(p)
        profile = os.environ.get("AWS_PROFILE", cfg.profile) if not cfg.credentials_file else cfg.profile
        if profile not in ini or "aws_access_key_id" not in ini[profile]:
            raise StorageError(f"{p} has no [{profile}] section with aws_access_key_id (storage.profile)")
        return ini[profile]["aws_access_key_id"], ini[profile].get("aws_secret_access_key")
    return os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")


class S3Store:
    """A BlobStore on ``s3://bucket/prefix/<sub>``; keys are relative to that folder."""

    def __init__(self, cfg: StorageConfig, sub: str = ""):
        self.cfg = cfg
        self.base = "/".join(p.strip("/") for p in (cfg.prefix, sub) if p.strip("/"))
        self.client, self.counter = shared_client(cfg, cfg.max_attempts)  # one client per store root
        self.retries = 0  # the outer loop's retries
        self._retries_before = self.counter["retries"]

    @property
    def botocore_retries(self) -> int:
        """Retries botocore made inside calls on this store's client since the store was made
        (ResponseMetadata.RetryAttempts, summed; stores on the same client in other threads count too)."""
        return self.counter["retries"] - self._retries_before

    def key(self, key: str) -> str:
        return f"{self.base}/{key}" if self.base else key

    def uri(self, key: str = "") -> str:
        return f"s3://{self.cfg.bucket}/{self.key(key)}".rstrip("/")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def count(attempt, err):
            self.retries += 1

        return retry(fn, what, self.cfg.retry_deadline_s, count)

    def put(self, key: str, data: bytes) -> None:
        self._call(
            f"PUT {self.uri(key)}",
            lambda: self.client.put_object(Bucket=self.cfg.bucket, Key=self.key(key), Body=data),
        )

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Large files go up as a multipart upload, which becomes visible only once complete."""
        self._call(
            f"upload {path} -> {self.uri(key)}",
            lambda: self.client.upload_file(str(path), self.cfg.bucket, self.key(key)),
        )

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        from hkd_core.trajectories import ShardError

        try:
            return self._call(
                f"GET {self.uri(key)}",
                lambda: self.client.get_object(Bucket=self.cfg.bucket, Key=self.key(key))["Body"].read(),
            )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ShardError(f"{self.uri(key)} does not exist") from None
            raise

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        self._call(
            f"download {self.uri(key)}",
            lambda: self.client.download_file(self.cfg.bucket, self.key(key), str(path)),
        )

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self._call(
                f"HEAD {self.uri(key)}",
                lambda: self.client.head_object(Bucket=self.cfg.bucket, Key=self.key(key)),
            )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def md5(self, key: str) -> str | None:
        """The object's MD5 as S3 reports it (the ETag of a single PUT) without reading it; None where the
        ETag is no MD5 (a multipart upload's)."""
        h = self._head(key)
        etag = str((h or {}).get("ETag", "")).strip('"')
        return etag.lower() if len(etag) == 32 and "-" not in etag else None

    def size(self, key: str) -> int:
        h = self._head(key)
        if h is None:
            raise FileNotFoundError(self.uri(key))
        return int(h["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``, relative to this store's folder."""
        out: list[str] = []
        full = self.key(prefix)
        token = None
        while True:
            kw = {"Bucket": self.cfg.bucket, "Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"LIST {self.uri(prefix)}", lambda: self.client.list_objects_v2(**kw))
            strip = len(self.base) + 1 if self.base else 0
            out += [o["Key"][strip:] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self._call(
            f"DELETE {self.uri(key)}",
            lambda: self.client.delete_object(Bucket=self.cfg.bucket, Key=self.key(key)),
        )


class FsStore(LocalStore):
    """storage=fs: the same interface as S3Store on a local folder (``<root>/<prefix>/<sub>``), for runs without
    services on one machine. Writes are atomic (a temporary file renamed into place)."""

    def __init__(self, cfg: StorageConfig, sub: str = ""):
        self.cfg, self.retries = cfg, 0
        super().__init__(Path(cfg.root_uri()) / sub.strip("/") if sub.strip("/") else Path(cfg.root_uri()))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.put(key, Path(path).read_bytes())

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.get(key))

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix
        folder = base if base.is_dir() else base.parent
        if not folder.is_dir():
            return []
        keys = [p.relative_to(self.root).as_posix() for p in folder.rglob("*") if p.is_file()]
        return sorted(k for k in keys if k.startswith(prefix) and ".tmp" not in Path(k).name)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


def make_store(cfg: StorageConfig, sub: str = "") -> S3Store | FsStore:
    """The configured store (storage.kind) on ``<root>/<prefix>/<sub>``."""
    return FsStore(cfg, sub) if cfg.kind == "fs" else S3Store(cfg, sub)


def store_at(cfg: StorageConfig, path: str) -> S3Store | LocalStore:
    """A store on one of Ray's storage paths (``bucket/key...`` on S3, a folder with storage=fs)."""
    if cfg.kind == "fs":
        return LocalStore(path)
    bucket, _, key = path.partition("/")
    return S3Store(dataclasses.replace(cfg, bucket=bucket, prefix=key))


def read_uri(cfg: StorageConfig, uri: str, what: str = "") -> bytes:
    """The bytes of ``s3://bucket/key`` (this config's endpoint and credentials) or of a local file; a missing
    one is a FileNotFoundError that names ``what`` (the key or flag it came from) and the URI."""
    label = f"{what} {uri}" if what else uri
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        store = S3Store(dataclasses.replace(cfg, bucket=bucket, prefix=""))
        if not key or not store.exists(key):
            raise FileNotFoundError(f"{label}: no such object")
        return store.get(key)
    if "://" in uri:
        raise FileNotFoundError(f"{label}: only s3:// URIs and local paths can be read")
    p = Path(uri).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{label}: no such file")
    return p.read_bytes()


def make_client(cfg: StorageConfig, max_attempts: int = 3):
    """A new boto3 S3 client for this config (its endpoint, region, credentials, retries and timeouts)."""
    import boto3
    from botocore.config import Config

    endpoint = cfg.resolved_endpoint()
    key, secret = read_credentials(cfg)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=cfg.region,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(
            retries={"mode": "adaptive", "total_max_attempts": max_attempts},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            s3={"addressing_style": "path"},
            signature_version="s3v4",
        ),
    )


_CLIENTS: dict[tuple, tuple] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client(cfg: StorageConfig, max_attempts: int) -> tuple:
    """(client, its botocore retry counter): one per process and per what makes a client differ (endpoint,
    region, credentials, retries, timeouts), reused by every store on it. boto3 clients are thread-safe; a
    forked process makes its own (the pid is part of the key). The credentials enter the key as a digest."""
    key, secret = read_credentials(cfg)
    digest = hashlib.sha256(f"{key}\0{secret}".encode()).hexdigest()
    ident = (
        os.getpid(),
        cfg.resolved_endpoint(),
        cfg.region,
        digest,
        max_attempts,
        cfg.connect_timeout_s,
        cfg.read_timeout_s,
    )
    with _CLIENTS_LOCK:
        if ident not in _CLIENTS:
            client = make_client(cfg, max_attempts)
            _CLIENTS[ident] = (client, count_botocore_retries(client))
        return _CLIENTS[ident]

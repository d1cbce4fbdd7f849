"""Ray's storage path on S3: (storage_path, storage_filesystem) for Ray Train and Tune, a pyarrow S3 filesystem
built without keys (Ray pickles it into its state) whose retry strategy survives that pickling."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.services.storage import StorageConfig, read_credentials

log = logging.getLogger(__name__)


def ray_storage(cfg: StorageConfig):
    """(storage_path, storage_filesystem) for ray.train.RunConfig: an explicit pyarrow S3 filesystem (so the
    endpoint is never the public cloud by accident) WITHOUT keys in it.

    Ray pickles the filesystem into its run and experiment state (the session folder on disk, and S3): a
    filesystem built with access_key/secret_key would carry the secret there. Built without them, pyarrow
    takes credentials from the AWS SDK's chain in each process: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or
    AWS_SHARED_CREDENTIALS_FILE + AWS_PROFILE, which this sets from storage.credentials_file/profile and
    which ``raycluster.env_for_workers`` hands to every worker (the file's path, never the keys)."""
    if cfg.kind == "fs":  # a local folder: Ray writes there itself
        path = cfg.resolved_root() / cfg.prefix.strip("/") / "ray"
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    endpoint = cfg.resolved_endpoint()
    key, _ = read_credentials(cfg)  # fails here, clearly, if the configured file is missing or empty
    if cfg.credentials_file:
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(Path(cfg.credentials_file).expanduser())
        os.environ["AWS_PROFILE"] = cfg.profile
    elif os.environ.get("AWS_SHARED_CREDENTIALS_FILE") and cfg.profile != "default":
        os.environ.setdefault("AWS_PROFILE", cfg.profile)
    if key is None:
        log.info(
            "no S3 keys in the environment or a credentials file: pyarrow falls back to the AWS SDK's chain "
            "(an instance or pod role)"
        )
    kw = {"region": cfg.region}
    if endpoint:
        u = urlparse(endpoint)
        kw.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    fs = retrying_s3_filesystem(RAY_FS_ATTEMPTS, kw)
    return f"{cfg.bucket}/{cfg.prefix.strip('/')}/ray".replace("//", "/"), fs


# The AWS SDK's default strategy waits 25 ms * 2^k before retry k: 12 attempts ride out about 100 s of
# outage for every write Ray makes itself (Train's checkpoint snapshot, Tune's experiment state).
RAY_FS_ATTEMPTS = 12


_FS_CLASS = None


def retrying_s3_filesystem(max_attempts: int, kw: dict):
    """A pyarrow S3FileSystem(**kw) retrying max_attempts times, also after pickling (module-level, so that
    pickle finds it in every process)."""
    global _FS_CLASS
    if _FS_CLASS is None:
        _FS_CLASS = _retrying_fs_class()
    return _FS_CLASS(max_attempts=max_attempts, **kw)


def _retrying_fs_class():
    import pyarrow.fs

    class _RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
        """pyarrow's S3FileSystem whose retry strategy survives pickling. Ray pickles the storage filesystem
        to its controller, workers and Tune; a plain S3FileSystem loses ``retry_strategy`` on the way (its
        __reduce__ leaves it out) and falls back to 3 quick attempts, so a store that blips for a few seconds
        failed Ray Train's controller on its next snapshot write."""

        def __init__(self, *, max_attempts: int = RAY_FS_ATTEMPTS, **kw):
            super().__init__(
                retry_strategy=pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts), **kw
            )
            self._hkd_args = (max_attempts, kw)

        def __reduce__(self):
            return retrying_s3_filesystem, self._hkd_args

    _RetryingS3FileSystem.__name__ = _RetryingS3FileSystem.__qualname__ = "RetryingS3FileSystem"
    return _RetryingS3FileSystem

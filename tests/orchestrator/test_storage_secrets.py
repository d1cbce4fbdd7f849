"""Ray pickles its storage filesystem into run and experiment state (on disk and in S3): it must not carry keys."""

import pickle

from orchestrator.services.rayfs import ray_storage
from orchestrator.services.storage import StorageConfig


def test_ray_storage_filesystem_pickles_without_the_keys(tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.write_text(
        "[default]\naws_access_key_id = AKIDEXAMPLE123\naws_secret_access_key = s3cr3t-value-xyz\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/elsewhere")  # restored after the test
    path, fs = ray_storage(
        StorageConfig(endpoint_url="http://127.0.0.1:9", bucket="b", prefix="p", credentials_file=str(creds))
    )
    blob = pickle.dumps(fs)
    assert path == "b/p/ray" and b"s3cr3t-value-xyz" not in blob and b"AKIDEXAMPLE123" not in blob
    assert b"127.0.0.1:9" in blob  # the endpoint travels, the keys don't
    import os

    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(creds)  # where every process finds them


def test_ray_storage_filesystem_keeps_its_retries_through_pickling(monkeypatch):
    """Ray ships the filesystem to its controller and workers by pickle. Ours is rebuilt on the other side by
    ``retrying_s3_filesystem(max_attempts, kw)``, which always passes the retry strategy: the attempts survive
    any number of round trips. (What this costs or saves in seconds against a closed port, beside pyarrow's own
    class, is measured by benchmarks/s3_retry_pickling.py, not asserted here.)"""
    import pyarrow.fs

    from orchestrator.services.rayfs import RAY_FS_ATTEMPTS, retrying_s3_filesystem

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    _, fs = ray_storage(StorageConfig(endpoint_url="http://127.0.0.1:1", bucket="b", prefix="p"))
    assert fs._hkd_args[0] == RAY_FS_ATTEMPTS
    back = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(fs))))
    assert isinstance(back, pyarrow.fs.S3FileSystem) and type(back) is type(fs) and back == fs
    assert (
        back._hkd_args
        == fs._hkd_args
        == (RAY_FS_ATTEMPTS, {"region": "us-east-1", "endpoint_override": "127.0.0.1:1", "scheme": "http"})
    )
    fn, args = back.__reduce__()
    assert fn is retrying_s3_filesystem and args == (RAY_FS_ATTEMPTS, fs._hkd_args[1])
    seen = []
    monkeypatch.setattr(
        pyarrow.fs,
        "AwsDefaultS3RetryStrategy",
        lambda max_attempts: (
            seen.append(max_attempts) or pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
        ),
    )
    pickle.loads(pickle.dumps(fs))  # the rebuilt object asks for exactly these attempts
    assert seen == [RAY_FS_ATTEMPTS]

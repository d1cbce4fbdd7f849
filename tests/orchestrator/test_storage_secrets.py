"""Ray pickles its storage filesystem into run and experiment state (on disk and in S3): it must not carry keys."""
import pickle

from orchestrator.storage import StorageConfig, ray_storage


def test_ray_storage_filesystem_pickles_without_the_keys(tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIDEXAMPLE123\naws_secret_access_key = s3cr3t-value-xyz\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/elsewhere")          # restored after the test
    path, fs = ray_storage(StorageConfig(endpoint_url="http://127.0.0.1:9", bucket="b", prefix="p",
                                         credentials_file=str(creds)))
    blob = pickle.dumps(fs)
    assert path == "b/p/ray" and b"s3cr3t-value-xyz" not in blob and b"AKIDEXAMPLE123" not in blob
    assert b"127.0.0.1:9" in blob                                            # the endpoint travels, the keys don't
    import os

    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(creds)          # where every process finds them


def test_ray_storage_filesystem_keeps_its_retries_through_pickling(monkeypatch):
    """Ray ships the filesystem to its controller and workers by pickle; pyarrow's own S3FileSystem drops
    retry_strategy there (3 quick attempts remain, and a store that blips fails Ray Train's controller).
    Ours comes back with the same retries: against a closed port a write fails only after 25 ms * 2^k
    back-offs, i.e. seconds, not milliseconds."""
    import time

    import pyarrow.fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    _, fs = ray_storage(StorageConfig(endpoint_url="http://127.0.0.1:1", bucket="b", prefix="p"))
    back = pickle.loads(pickle.dumps(fs))
    assert isinstance(back, pyarrow.fs.S3FileSystem) and back == fs and back._hkd_args == fs._hkd_args
    plain = pickle.loads(pickle.dumps(pyarrow.fs.S3FileSystem(
        endpoint_override="127.0.0.1:1", scheme="http", region="us-east-1",
        retry_strategy=pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=8))))
    quick = pickle.loads(pickle.dumps(type(fs)(max_attempts=8, endpoint_override="127.0.0.1:1", scheme="http",
                                               region="us-east-1")))

    def fail_time(f) -> float:
        t0 = time.monotonic()
        try:
            with f.open_output_stream("b/p/x.json") as out:
                out.write(b"x")
        except OSError:
            return time.monotonic() - t0
        raise AssertionError("wrote to a closed port")

    # ours keeps 8 attempts (25 ms * 2^k back-offs: about 6 s); pyarrow's comes back with its 3 default ones
    # (1.5-2 s, depending on the machine's load)
    slow, fast = fail_time(quick), fail_time(plain)
    assert slow - fast > 2.5 and slow > 4.0, (slow, fast)

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

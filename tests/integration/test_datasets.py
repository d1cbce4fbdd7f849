"""Data sets in S3: `hkd data push` uploads the verified file under its content address; a job whose driver has
no copy on its disk reads it from there; an altered object is refused, naming it. Against the stack's SeaweedFS
and its `ray start --head`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hkd_core.data import DATASETS, SHA256, DataError, find_data_file
from orchestrator.services.datasets import dataset_key, ensure_local, push
from orchestrator.services.storage import StorageConfig

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _pushable() -> str:
    name = next((n for n in ("mnist", "fashion_mnist") if find_data_file(n) is not None), None)
    if name is None:
        pytest.skip("no mnist.npz or fashion_mnist.npz on this machine to push (shared/data, $HKD_DATA_DIR)")
    return name


def _hkd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_push_uploads_the_verified_file_under_its_content_address_once(local_stack, s3):
    name = _pushable()
    key = dataset_key(name)
    assert key == f"datasets/{name}-{SHA256[DATASETS[name].file]}.npz"
    r = _hkd("data", "push", name)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith(f"{name}: s3://hkd/{key} (")
    head = s3.head_object(Bucket="hkd", Key=key)
    assert head["ContentLength"] == find_data_file(name).stat().st_size
    again = _hkd("data", "push", name)
    assert again.returncode == 0 and "(already there)" in again.stdout
    bad = _hkd("data", "push", "svhn")
    assert bad.returncode == 2 and "unknown data set 'svhn'" in bad.stderr


def test_a_job_without_the_data_on_its_disk_reads_it_from_s3(local_stack, s3, run_tag, job_command):
    """`ray job submit` of a stage that loads images: the job's driver runs in Ray's copy of the working
    directory, with HKD_DATA_DIR emptied, so no local copy is found; it fetches the pushed file (and says so)."""
    name = _pushable()
    assert _hkd("data", "push", name).returncode == 0
    dash = f"http://127.0.0.1:{local_stack['ports']['dashboard']}"
    cmd = job_command(
        [
            "hkd",
            "trajectories",
            "experiment=smoke",
            f"data={name}",
            f"storage.prefix=itdata-{run_tag}",
            f"tracking.experiment=it-{run_tag}",
            f"name=s3data-{run_tag}",
            "--no-progress",
        ],
        env_vars={"HKD_DATA_DIR": "", "HKD_CACHE": f"/tmp/hkd-job-{run_tag}"},
    )
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": dash}, timeout=900
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-4000:]
    assert f"data: {DATASETS[name].file} fetched from s3://hkd/{dataset_key(name)}" in out
    assert Path(f"/tmp/hkd-job-{run_tag}/datasets/{DATASETS[name].file}").is_file()


def test_an_altered_object_is_refused_naming_it(local_stack, s3, tmp_path, monkeypatch):
    name = _pushable()
    bucket = f"hkd-data-{uuid.uuid4().hex[:6]}"
    s3.create_bucket(Bucket=bucket)
    cfg = StorageConfig(endpoint_url=local_stack["env"]["AWS_ENDPOINT_URL"], bucket=bucket)
    uri, new = push(cfg, name)
    assert new and uri == f"s3://{bucket}/{dataset_key(name)}"
    monkeypatch.setenv("HKD_CACHE", str(tmp_path))
    monkeypatch.delenv("HKD_DATA_DIR", raising=False)
    folder = ensure_local(cfg, name, "s3")  # source=s3: the bucket's copy, even with a local one
    assert folder == tmp_path / "datasets" and os.environ["HKD_DATA_DIR"] == str(folder)
    assert find_data_file(name) == folder / DATASETS[name].file
    body = bytearray(s3.get_object(Bucket=bucket, Key=dataset_key(name))["Body"].read())
    body[5000] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=dataset_key(name), Body=bytes(body))
    (folder / DATASETS[name].file).unlink()
    with pytest.raises(
        DataError,
        match=rf"{uri} does not match its sha256 .*: altered or truncated in the bucket; "
        rf"push it again \(hkd data push {name}\)",
    ):
        ensure_local(cfg, name, "s3")
    assert not (folder / DATASETS[name].file).exists() and not list(
        folder.glob("*.part")
    )  # nothing half-written


def test_inception_weights_from_the_bucket_on_a_node_without_them(local_stack, s3, tmp_path, monkeypatch):
    """`hkd data push inception` puts this machine's converted weights under their sha256; a process whose node
    has none (empty cache, no HKD_INCEPTION_WEIGHTS, empty torch hub) fetches and checks them; an altered copy is
    refused naming it; a bucket without them says where it looked and what to do."""
    import torch

    from hkd_core.inception import FILE_NAME, WeightsError, weights_digest, weights_path
    from orchestrator.services.datasets import ensure_weights, push_weights, weights_key

    here = weights_path()  # this machine's (the test process's) copy
    bucket = f"hkd-w-{uuid.uuid4().hex[:6]}"
    s3.create_bucket(Bucket=bucket)
    cfg = StorageConfig(endpoint_url=local_stack["env"]["AWS_ENDPOINT_URL"], bucket=bucket)
    uri, new = push_weights(cfg)
    assert new and uri == f"s3://{bucket}/{weights_key(weights_digest(here))}"
    assert push_weights(cfg) == (uri, False)  # once
    monkeypatch.setenv("HKD_CACHE", str(tmp_path / "node"))
    monkeypatch.delenv("HKD_INCEPTION_WEIGHTS", raising=False)
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(WeightsError):
            weights_path()  # the node has none of its own
        assert ensure_weights(cfg, fetch=False) == uri  # the driver's check: there, not fetched
        got = ensure_weights(cfg)
        assert got == tmp_path / "node" / "inception" / FILE_NAME and weights_digest(got) == weights_digest(
            here
        )
        assert weights_path() == got  # found locally from now on
        got.unlink()
        key = weights_key(weights_digest(here))
        body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        body[1000] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        with pytest.raises(
            WeightsError, match=rf"{uri} does not match the sha256 in its name: altered or truncated"
        ):
            ensure_weights(cfg)
        assert not got.exists() and not list(got.parent.glob("*.part"))
        s3.delete_object(Bucket=bucket, Key=key)
        with pytest.raises(
            WeightsError,
            match=rf"no FID Inception weights found in .*, nor in s3://{bucket}/weights/\. "
            r"Run `python -m hkd_core weights` once .* then `hkd data push inception`",
        ):
            ensure_weights(cfg)
    finally:
        torch.hub.set_dir(old_hub)

"""S3 storage and preflight against the real SeaweedFS and MLflow servers."""

import dataclasses
import subprocess

import pytest

from orchestrator.services.preflight import preflight
from orchestrator.services.storage import S3Store, StorageConfig

pytestmark = pytest.mark.integration


def _cfg(local_stack, **kw) -> StorageConfig:
    return dataclasses.replace(
        StorageConfig(endpoint_url=local_stack["env"]["AWS_ENDPOINT_URL"], prefix="it"), **kw
    )


def _listening() -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state, from the kernel's tables (no `ss` binary needed)."""
    import ipaddress
    from pathlib import Path

    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        p = Path(table)
        if not p.is_file():
            continue
        for line in p.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw if width == 16 else raw[:4])
            if getattr(addr, "ipv4_mapped", None) is not None:  # ::ffff:127.0.0.1, a v4 socket on a v6 one
                addr = addr.ipv4_mapped
            out.append((str(addr), int(port_hex, 16)))
    return out


def test_servers_bind_loopback_only(local_stack):
    ports = set(local_stack["ports"].values())
    listening = [(a, p) for a, p in _listening() if p in ports]
    assert {p for _, p in listening} >= {local_stack["ports"]["s3"], local_stack["ports"]["mlflow"]}, (
        listening
    )
    assert all(a == "127.0.0.1" for a, _ in listening), listening


def test_store_round_trip_and_listing(local_stack):
    store = S3Store(_cfg(local_stack), "roundtrip")
    store.put("a/one.bin", b"x" * 1000)
    store.put("a/two.bin", b"y")
    assert store.get("a/one.bin") == b"x" * 1000 and store.size("a/two.bin") == 1
    assert sorted(store.list("a/")) == ["a/one.bin", "a/two.bin"]
    assert store.exists("a/one.bin") and not store.exists("a/three.bin")
    assert store.uri("a/one.bin") == "s3://hkd/it/roundtrip/a/one.bin"


def test_trajectory_shards_stream_from_s3(local_stack):
    """hkd_core's shard format on S3: the same reader, the same corruption check."""
    import torch

    from hkd_core.generate import generate_trajectories
    from hkd_core.teachers import GaussianTeacher
    from hkd_core.trajectories import ShardError, TrajectoryDataset, load_all

    store = S3Store(_cfg(local_stack), "shards")
    m = generate_trajectories(store, GaussianTeacher(), 10, (1, 4, 4), steps=3, shard_size=4, progress=False)
    states, _ = load_all(store, m)
    assert states.shape == (10, 4, 1, 4, 4) and states.dtype == torch.float16
    by_rank = [
        {it["seed"]: it["states"] for it in TrajectoryDataset(store, m, rank=r, world_size=2)} for r in (0, 1)
    ]
    assert by_rank[0] and by_rank[1] and not by_rank[0].keys() & by_rank[1].keys()  # disjoint ranks ...
    assert sorted([*by_rank[0], *by_rank[1]]) == list(range(10))  # ... covering every seed
    for r in by_rank:  # streamed = stored, bit for bit
        assert all(torch.equal(x, states[seed]) for seed, x in r.items())
    data = bytearray(store.get(m.shards[0].key))
    data[-10] ^= 1
    store.put(m.shards[0].key, bytes(data))
    with pytest.raises(ShardError, match=r"s3://hkd/it/shards/shard-000000.npz is corrupt"):
        list(TrajectoryDataset(store, m, shuffle=False))


def test_preflight_passes_on_the_stack(local_stack):
    results = preflight(_cfg(local_stack), local_stack["env"]["MLFLOW_TRACKING_URI"])
    assert [r["name"] for r in results] == [
        "s3 (boto3)",
        "ray storage (pyarrow)",
        "mlflow server",
        "mlflow artifacts",
    ]
    assert all(r["ok"] for r in results), results


def test_preflight_names_each_failure(local_stack, tmp_path, free_port):
    dead = free_port()
    r = preflight(_cfg(local_stack, endpoint_url=f"http://127.0.0.1:{dead}", connect_timeout_s=1))
    assert not r[0]["ok"] and r[0]["detail"].startswith(
        f"endpoint unreachable: nothing answers at http://127.0.0.1:{dead}"
    )

    bad = tmp_path / "bad-credentials"
    bad.write_text("[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n")
    r = preflight(_cfg(local_stack, credentials_file=str(bad)))
    assert not r[0]["ok"] and r[0]["detail"].startswith("bad credentials:"), r

    r = preflight(_cfg(local_stack, bucket="no-such-bucket"))
    assert not r[0]["ok"] and r[0]["detail"].startswith(
        "missing bucket: s3://no-such-bucket does not exist"
    ), r

    # a dead tracking server: said by one request of our own, not after MLflow's client's backoff (how long it
    # takes: benchmarks/time_to_fail.py, 0.48 s above the process's floor)
    r = preflight(_cfg(local_stack), f"http://127.0.0.1:{dead}")
    server = next(x for x in r if x["name"] == "mlflow server")
    assert not server["ok"] and server["detail"].startswith(
        f"tracking server unreachable: nothing answers at http://127.0.0.1:{dead}"
    ), r
    assert "mlflow artifacts" not in [x["name"] for x in r]


def test_preflight_command_exit_codes(local_stack):
    import sys

    ok = subprocess.run(
        [sys.executable, "-m", "orchestrator", "preflight"], capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("ok  ") == 5, (
        ok.stdout
    )  # ray (the stack's head, with its token), s3, pyarrow, mlflow x2
    assert "ok   ray: Ray at 127.0.0.1:" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "orchestrator", "preflight", "storage.bucket=missing-bucket"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "FAIL s3 (boto3): missing bucket: s3://missing-bucket" in bad.stdout

import json

import pytest
import torch

from hkd_core.generate import generate_trajectories, noise_for_seeds
from hkd_core.sampler import karras_sigmas, sample_heun
from hkd_core.teachers import GaussianTeacher
from hkd_core.trajectories import (
    LocalStore,
    ShardError,
    TrajectoryDataset,
    check_shards,
    load_all,
    read_manifest,
    without_shards,
)


def _write(tmp_path, n=10, shard_size=4, steps=3):
    """n trajectories of the Gaussian teacher through the library's own writer (hkd_core.generate), and the same
    trajectories sampled here from the same seeds' noise, to compare against."""
    teacher = GaussianTeacher()
    store = LocalStore(tmp_path / "traj")
    manifest = generate_trajectories(
        store, teacher, n, (1, 4, 4), steps=steps, shard_size=shard_size, batch_size=3, progress=False
    )
    sig = karras_sigmas(steps)
    tr = sample_heun(teacher.denoise, noise_for_seeds(torch.arange(n), (1, 4, 4)) * sig[0], sig)
    return store, manifest, tr


def test_round_trip(tmp_path):
    store, manifest, tr = _write(tmp_path)
    assert [s.n for s in manifest.shards] == [4, 4, 2] and manifest.num_trajectories == 10
    m2 = read_manifest(store)
    assert m2.shape == [1, 4, 4] and m2.teacher["kind"] == "gaussian" and m2.sigmas == manifest.sigmas
    states, sigmas = load_all(store)
    assert states.dtype == torch.float16 and states.shape == (10, 4, 1, 4, 4)
    torch.testing.assert_close(states.float(), tr.states.transpose(0, 1).half().float())
    ds = TrajectoryDataset(store, shuffle=False)
    items = list(ds)
    assert [it["seed"] for it in items] == list(range(10))
    assert torch.equal(items[3]["states"], states[3])


def test_ranks_read_disjoint_shards_covering_everything(tmp_path):
    store, manifest, _ = _write(tmp_path, n=12, shard_size=2)
    seen = []
    for rank in range(3):
        seeds = [it["seed"] for it in TrajectoryDataset(store, rank=rank, world_size=3, seed=5)]
        assert len(seeds) == 4
        seen += seeds
    assert sorted(seen) == list(range(12))
    # another epoch reshuffles, still a partition
    ds = TrajectoryDataset(store, rank=0, world_size=1, seed=5, epochs=2)
    seeds = [it["seed"] for it in ds]
    assert sorted(seeds[:12]) == sorted(seeds[12:]) == list(range(12)) and seeds[:12] != seeds[12:]


def test_a_stream_started_at_k_continues_the_uninterrupted_sequence_without_reading_passed_shards(tmp_path):
    """start=k (a resumed run: steps done x batch per rank) yields exactly the uninterrupted stream from item k on,
    inside a shard, at a shard boundary and epochs later, and never reads a shard it passes over."""
    store, _, _ = _write(tmp_path, n=10, shard_size=4)
    for rank, world in ((0, 1), (1, 2)):
        full = [
            (it["seed"], it["states"])
            for it, _ in zip(
                TrajectoryDataset(store, rank=rank, world_size=world, seed=3, epochs=None), range(60)
            )
        ]
        per_epoch = {(0, 1): 10, (1, 2): None}[(rank, world)]
        for k in (1, 4, 5, 9, 10, 23, 37):
            ds = TrajectoryDataset(store, rank=rank, world_size=world, seed=3, epochs=None, start=k)
            got = [(it["seed"], it["states"]) for it, _ in zip(ds, range(60 - k))]
            assert [g[0] for g in got] == [f[0] for f in full[k:]], (rank, world, k)
            assert all(torch.equal(a[1], b[1]) for a, b in zip(got, full[k:]))
        if per_epoch:
            reads = []

            class Counting(LocalStore):
                def get(self, key):
                    reads.append(key)
                    return super().get(key)

            counted = Counting(store.root)
            first = next(
                iter(
                    TrajectoryDataset(
                        counted, rank=rank, world_size=world, seed=3, epochs=None, start=2 * per_epoch + 8
                    )
                )
            )
            assert first["seed"] == full[2 * per_epoch + 8][0]
            assert len([r for r in reads if r.endswith(".pt") or "shard" in r]) == 1, reads  # one shard read
    with pytest.raises(ValueError, match="start=-1"):
        TrajectoryDataset(store, start=-1)


def test_altered_shard_is_named(tmp_path):
    store, manifest, _ = _write(tmp_path)
    path = store.root / manifest.shards[1].key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000001.npz is corrupt"):
        list(TrajectoryDataset(store, shuffle=False))
    ds = TrajectoryDataset(store, shuffle=False, skip_corrupt=True)
    assert len(list(ds)) == 6 and ds.skipped == ["shard-000001.npz"]


def test_truncated_and_missing_shards_fail_the_cheap_check(tmp_path):
    store, manifest, _ = _write(tmp_path)
    p = store.root / manifest.shards[0].key
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ShardError, match="shard-000000.npz has 100 bytes"):
        check_shards(store, manifest)
    (store.root / manifest.shards[2].key).unlink()
    manifest.shards = manifest.shards[1:]
    with pytest.raises(ShardError, match="shard-000002.npz, which does not exist"):
        check_shards(store, manifest)


def test_altered_shard_of_the_same_size_fails_the_cheap_check_by_md5(tmp_path):
    store, manifest, _ = _write(tmp_path)
    assert all(len(s.md5) == 32 for s in read_manifest(store).shards)  # the manifest records each MD5
    p = store.root / manifest.shards[1].key
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000001.npz has MD5 [0-9a-f]{32}, the manifest says"):
        check_shards(store, manifest)
    # a manifest from before MD5s were recorded: only existence and size can be judged cheaply
    for s in manifest.shards:
        s.md5 = ""
    assert check_shards(store, manifest) == {}


def test_skip_mode_returns_the_bad_shards_and_training_reads_the_rest(tmp_path):
    store, manifest, _ = _write(tmp_path)
    (store.root / manifest.shards[0].key).write_bytes(b"x" * 10)
    (store.root / manifest.shards[2].key).unlink()
    bad = check_shards(store, manifest, skip_corrupt=True)
    assert sorted(bad) == ["shard-000000.npz", "shard-000002.npz"]
    assert "has 10 bytes" in bad["shard-000000.npz"] and "does not exist" in bad["shard-000002.npz"]
    left = without_shards(manifest, set(bad))
    assert [s.key for s in left.shards] == ["shard-000001.npz"] and len(manifest.shards) == 3
    assert sorted(it["seed"] for it in TrajectoryDataset(store, left, shuffle=False)) == [4, 5, 6, 7]


def test_unreadable_manifest(tmp_path):
    store, _, _ = _write(tmp_path)
    (store.root / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: unreadable manifest"):
        read_manifest(store)
    (store.root / "manifest.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ShardError, match="not a hkd-trajectories"):
        read_manifest(store)


def test_generation_is_split_independent_and_resumes(tmp_path):
    teacher = GaussianTeacher()
    a = generate_trajectories(
        LocalStore(tmp_path / "a"), teacher, 9, (1, 2, 2), steps=3, shard_size=4, progress=False
    )
    b = generate_trajectories(
        LocalStore(tmp_path / "b"), teacher, 9, (1, 2, 2), steps=3, shard_size=3, batch_size=2, progress=False
    )
    sa, _ = load_all(LocalStore(tmp_path / "a"), a)
    sb, _ = load_all(LocalStore(tmp_path / "b"), b)
    assert torch.equal(sa, sb)
    # an interrupted run: shard 1 missing, shard 0 present; regeneration reuses shard 0 untouched
    store = LocalStore(tmp_path / "a")
    (store.root / "shard-000001.npz").unlink()
    (store.root / "manifest.json").unlink()
    before = (store.root / "shard-000000.npz").stat().st_mtime_ns
    c = generate_trajectories(store, teacher, 9, (1, 2, 2), steps=3, shard_size=4, progress=False)
    assert (store.root / "shard-000000.npz").stat().st_mtime_ns == before
    assert [s.sha256 for s in c.shards] == [s.sha256 for s in a.shards]

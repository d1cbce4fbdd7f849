"""The stage cache: what a stage's identity is (and is not), a done-marker whose files are gone, and two drivers
that start the same stage at once. On a local folder (storage=fs): no service, no Ray."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

from orchestrator.config import load
from orchestrator.services.storage import make_store
from orchestrator.stages.context import DONE, StageContext, stage_done
from orchestrator.stages.lease import LEASE, Leases, StageBusyError

SMOKE = ["experiment=smoke", "storage=fs", "tracking=file"]


def _pc(tmp_path, *extra):
    return load([*SMOKE, f"storage.root={tmp_path}/store", f"tracking.root={tmp_path}/mlflow", *extra])


# --- identity -------------------------------------------------------------------------------------------------


def test_the_worker_count_and_the_commit_are_not_part_of_a_stage_identity(tmp_path, monkeypatch):
    """The decision (docs/layout.md, "What a stage's identity is"): a stage is what it computes from its
    config and inputs. cluster.* (how many workers, where) and the commit are recorded on its run, not hashed;
    a key of the method (model, train, trajectories, ...) is."""
    base = _pc(tmp_path).stages()
    assert _pc(tmp_path, "cluster.num_workers=2").stages() == base
    assert _pc(tmp_path, "cluster.num_workers=4", "cluster.placement_strategy=SPREAD").stages() == base
    monkeypatch.setenv("HKD_GIT_SHA", "0" * 40)
    assert _pc(tmp_path).stages() == base
    other = _pc(tmp_path, "train.lr=0.001").stages()
    assert other["trajectories"] == base["trajectories"] and other["distill"] != base["distill"]


# --- the done-marker ------------------------------------------------------------------------------------------


def _ctx(pc) -> StageContext:
    return StageContext(pc, tracker=None, parent_run_id=None, lineage={})


def test_a_marker_whose_files_are_gone_makes_the_stage_run_again(tmp_path, caplog):
    ctx = _ctx(_pc(tmp_path))
    store = ctx.store("distill")
    store.put("model.pt", b"weights")
    store.put("ray/checkpoint_0/ckpt.pt", b"state")
    store.put(LEASE, b"{}")  # the lease is never vouched for
    ctx.finish("distill", {"kimg": 0.256})
    marker = json.loads(store.get(DONE))
    assert marker["_outputs"] == ["model.pt", "ray/checkpoint_0/ckpt.pt"]
    assert ctx.done("distill") == {"kimg": 0.256}  # the summary, without the list
    store.delete(LEASE)
    assert ctx.done("distill") == {"kimg": 0.256}
    store.put("extra.txt", b"written later by someone else")  # more files than vouched for: still done
    assert ctx.done("distill") == {"kimg": 0.256}
    store.delete("model.pt")
    with caplog.at_level(logging.WARNING):
        assert ctx.done("distill") is None
    assert "1 of the 2 files it vouches for are gone (model.pt): running the stage again" in caplog.text
    assert not store.exists(DONE)  # the stale marker is gone with it


def test_a_marker_from_before_the_list_is_trusted_as_before(tmp_path):
    store = make_store(_pc(tmp_path).storage, "distill-old")
    store.put(DONE, json.dumps({"kimg": 1.0}).encode())
    assert stage_done(store, "distill") == {"kimg": 1.0}


# --- two drivers ----------------------------------------------------------------------------------------------


def test_a_second_driver_is_refused_naming_the_holder_and_runs_once_it_is_released(tmp_path):
    store = make_store(_pc(tmp_path).storage, "distill-abc")
    first = Leases({"distill": store}, settle_s=0.05)
    first.acquire()
    held = json.loads(store.get(LEASE))
    second = Leases({"distill": store}, settle_s=0.05)
    with pytest.raises(StageBusyError) as e:
        second.acquire()
    msg = str(e.value)
    assert msg.startswith("distill: another driver is running this stage for this config (host ")
    assert f"pid {held['pid']}" in msg and store.uri(LEASE) in msg and "its result is reused" in msg
    assert json.loads(store.get(LEASE))["token"] == held["token"]  # the refused driver changed nothing
    first.release_all()
    assert not store.exists(LEASE)
    with second:
        assert json.loads(store.get(LEASE))["token"] != held["token"]
    assert not store.exists(LEASE)


def test_the_holder_renews_its_lease_and_a_lease_not_renewed_is_taken_over(tmp_path, caplog):
    store = make_store(_pc(tmp_path).storage, "trajectories-abc")
    with Leases({"trajectories": store}, heartbeat_s=0.2, settle_s=0.05):
        beat0 = json.loads(store.get(LEASE))["heartbeat"]
        time.sleep(0.7)
        assert json.loads(store.get(LEASE))["heartbeat"] > beat0  # renewed
    # a driver killed with its lease held: after stale_s without a beat, the next driver takes the stage over
    store.put(
        LEASE,
        json.dumps(
            {"token": "dead", "host": "h", "pid": 1, "since": 0, "heartbeat": time.time() - 30}
        ).encode(),
    )
    with pytest.raises(StageBusyError):
        Leases({"trajectories": store}, stale_s=60, settle_s=0.05).acquire()
    with caplog.at_level(logging.WARNING), Leases({"trajectories": store}, stale_s=10, settle_s=0.05):
        assert json.loads(store.get(LEASE))["token"] != "dead"
    assert "taking the stage over from a driver not heard from for 30 s (host h, pid 1)" in caplog.text


def test_a_lease_whose_driver_on_this_machine_has_exited_is_taken_over_at_once(tmp_path, caplog):
    """kill -9 of a driver: a restart on the same machine need not wait for the lease to lapse."""
    import socket
    import subprocess
    import sys

    store = make_store(_pc(tmp_path).storage, "distill-abc")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(gone.stdout)
    fresh = {
        "token": "killed",
        "host": socket.gethostname(),
        "pid": dead_pid,
        "since": time.time(),
        "heartbeat": time.time(),
    }
    store.put(LEASE, json.dumps(fresh).encode())
    with caplog.at_level(logging.WARNING), Leases({"distill": store}, settle_s=0.05):
        assert json.loads(store.get(LEASE))["token"] != "killed"
    assert (
        f"taking the stage over from driver pid {dead_pid} on this machine, which has exited" in caplog.text
    )
    # the same lease, held by a live process of this machine (this one), is refused
    store.put(LEASE, json.dumps({**fresh, "pid": os.getpid()}).encode())
    with pytest.raises(StageBusyError):
        Leases({"distill": store}, settle_s=0.05).acquire()


def test_of_two_drivers_taking_a_lease_at_the_same_instant_exactly_one_gets_it(tmp_path):
    store = make_store(_pc(tmp_path).storage, "teacher-abc")
    for _ in range(5):
        go, outcome = threading.Barrier(2), []

        def take():
            leases = Leases({"teacher": store}, settle_s=0.3)
            go.wait()
            try:
                leases.acquire()
                outcome.append(leases)
            except StageBusyError:
                outcome.append(None)

        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [x for x in outcome if x is not None]
        assert len(winners) == 1, outcome
        winners[0].release_all()
        assert not store.exists(LEASE)


def test_the_pipeline_refuses_a_held_stage_before_it_opens_any_run(tmp_path, capsys):
    """`hkd pipeline` while another driver holds the teacher stage of the same config: exit 2 with the
    holder's sentence, and no MLflow run opened (the other driver's pipeline run is not touched)."""
    from orchestrator.cli import main
    from orchestrator.identity import stage_prefix

    over = [*SMOKE, f"storage.root={tmp_path}/store", f"tracking.root={tmp_path}/mlflow"]
    pc = load(over)
    holder = Leases({"teacher": make_store(pc.storage, stage_prefix(pc, "teacher"))}, settle_s=0.05)
    with holder:
        t0 = time.monotonic()
        assert main(["pipeline", *over, "--no-progress"]) == 2
        took = time.monotonic() - t0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "hkd: stage error: teacher: another driver is running this stage for this config"
    ), last
    assert took < 30
    db = tmp_path / "mlflow" / "mlflow.db"
    if db.exists():
        import sqlite3

        assert sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone()[0] == 0

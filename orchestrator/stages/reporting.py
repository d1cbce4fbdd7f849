"""What the Ray Train loops report: metrics to MLflow from rank 0 (a background buffer), checkpoints
through Ray (each file one retried S3 PUT), a progress line, and the count of worker-group starts."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hkd_core import metric_names as M


def resume_file() -> str | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()  # (1) the newest reported checkpoint
    if ckpt is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="hkd-resume-"))
    ckpt.to_directory(str(local))
    files = sorted(local.glob("ckpt-*.pt"))
    return str(files[-1]) if files else None


def given_checkpoint(folder: Path, blob: bytes, kimg: float) -> str:
    """A checkpoint handed over as bytes, written as ``<folder>/given/ckpt-<kimg>.pt`` (the name a loop's own
    checkpoints have, which count_attempt reads the kimg from); returns its path."""
    from hkd_core.checkpoint import atomic_write_bytes

    path = folder / "given" / f"ckpt-{kimg:010.3f}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    return str(path)


def say(line: str) -> None:
    """One progress line on the process's own stdout, which Ray forwards to the driver once. Not ``print``: in a
    Ray Train worker ``print`` is patched to go to Train's logger *and*, where anything wrapped sys.stdout, to the
    stream as well, so every line reached the driver twice."""
    out = sys.__stdout__ or sys.stdout
    out.write(line + "\n")
    out.flush()


class CheckpointUploader:
    """Ray Train's ``checkpoint_upload_fn``: each checkpoint file goes to the run's folder in S3 as one PUT
    (an object appears whole or not at all), retried with back-off through an object-store outage for up to
    ``storage.retry_deadline_s``; past that the report fails, so Ray Train restarts the workers from the last
    checkpoint: a checkpoint is late or retried, never silently dropped. Counts what it retried."""

    def __init__(self, storage_cfg):
        self.cfg = storage_cfg
        self.retries = 0  # over the whole attempt
        self.last_s = 0.0  # wall time of the newest upload, retries included
        self.last_retries = 0

    def __call__(self, checkpoint, dir_name: str):
        import dataclasses

        import ray.train
        from ray.train import Checkpoint

        from orchestrator.services.retries import retry
        from orchestrator.services.storage import S3Store

        storage = ray.train.get_context().get_storage()
        dest = f"{storage.experiment_fs_path.rstrip('/')}/{dir_name}"
        bucket, _, key_prefix = dest.partition("/")
        if bucket != self.cfg.bucket:
            raise ValueError(f"Ray's storage path {dest} is not in storage.bucket {self.cfg.bucket}")
        store = S3Store(dataclasses.replace(self.cfg, prefix=key_prefix))
        _fault_stall("HKD_FAULT_STALL_BEFORE_UPLOAD_S", f"s3://{dest} about to be uploaded")
        t0, before = time.monotonic(), self.retries

        def count(attempt, err):
            self.retries += 1
            say(
                f"[checkpoint] upload to s3://{dest} failed ({type(err).__name__}); retry {attempt}, "
                f"{time.monotonic() - t0:.0f} s into the upload"
            )

        local = Path(checkpoint.path)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = f.relative_to(local).as_posix()
            if f.stat().st_size < 4 << 30:  # one PUT (S3's limit is 5 GiB)
                put = lambda: store.client.put_object(
                    Bucket=store.cfg.bucket,
                    Key=store.key(rel),  # noqa: E731
                    Body=f.read_bytes(),
                )
            else:  # multipart: visible only once complete
                put = lambda: store.client.upload_file(str(f), store.cfg.bucket, store.key(rel))  # noqa: E731
            retry(put, f"checkpoint upload {store.uri(rel)}", self.cfg.retry_deadline_s, count)
        self.retries += store.botocore_retries  # botocore's own, inside the calls (RetryAttempts)
        self.last_s, self.last_retries = time.monotonic() - t0, self.retries - before
        if self.last_retries:
            say(f"[checkpoint] s3://{dest} uploaded after {self.last_retries} retries in {self.last_s:.1f} s")
        _fault_stall("HKD_FAULT_STALL_AFTER_UPLOAD_S", f"s3://{dest} uploaded, not yet recorded by Ray")
        return Checkpoint(path=dest, filesystem=storage.storage_filesystem)


def _fault_stall(var: str, what: str) -> None:
    """Fault injection for the integration tests, off unless the variable is set: hold a checkpoint write
    at a chosen instant so that a fault lands there for certain (before the upload: an object-store outage
    meets it; after the upload, before Ray Train records it: a kill is most harmful)."""
    stall = float(os.environ.get(var) or 0)
    armed = os.environ.get(
        "HKD_FAULT_STALL_ARMED_BY"
    )  # a file: stall only once it exists (the test says when)
    if stall > 0 and (not armed or Path(armed).exists()):
        say(f"[checkpoint] {what}: stalling {stall:g} s ({var})")
        if mark := os.environ.get("HKD_FAULT_STALL_MARK"):
            # a file per stall, written as it begins: the test learns of it at once (a log line reaches the
            # driver's output through Ray's log forwarding and the driver's buffer, seconds late or at its exit)
            d = Path(mark)
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{os.getpid()}-{time.time_ns()}"
            tmp.write_text(json.dumps({"what": what, "var": var, "t": time.time(), "stall_s": stall}))
            tmp.rename(d / tmp.name[1:])
        time.sleep(stall)


TIME_ATTR = "kimg"  # the time attribute of every report: what ASHA (orchestrator/sweep/asha.py) counts in


def checkpoint_report(metrics: dict, kimg: float, total_kimg: float) -> dict:
    """What a training checkpoint reports to Tune: rank 0's metrics by their names, and the time attribute except
    at the end of training, so that the last report cannot stop the trial at ASHA's rung at the budget before it
    has evaluated itself (the other half of the workaround, max_t a hair above the budget, is sweep/asha.py's)."""
    report = {**metrics}
    if kimg < total_kimg - 1e-9:
        report[TIME_ATTR] = kimg
    return report


def eta_s(metrics: dict, kimg: float, total_kimg: float, max_train_s: float | None = None) -> float:
    """Seconds left: to total_kimg at the current rate, or to the training-seconds budget when that ends first."""
    rate = metrics.get(M.SAMPLES_PER_S, 0.0)
    eta = (total_kimg - kimg) * 1000 / rate if rate else float("nan")
    if max_train_s and M.TRAIN_S in metrics:
        left = max(0.0, max_train_s - metrics[M.TRAIN_S])
        eta = left if eta != eta else min(eta, left)
    return eta


def callbacks(
    rank: int,
    tracker,
    run_id: str | None,
    total_kimg: float,
    what: str,
    storage_cfg=None,
    max_train_s: float | None = None,
):
    """metrics_cb / checkpoint_cb for hkd_core's loops: MLflow and a progress line from rank 0, checkpoints
    through Ray (uploaded to S3 by CheckpointUploader; with storage=fs Ray copies them itself)."""
    import ray.train
    from ray.train import Checkpoint

    t0 = time.monotonic()
    uploader = (
        CheckpointUploader(storage_cfg) if storage_cfg is not None and storage_cfg.kind == "s3" else None
    )

    def metrics_cb(metrics: dict, kimg: float) -> None:
        if tracker is not None and run_id:
            tracker.log_metrics(run_id, metrics, step=int(round(kimg * 1000)))
        if rank == 0 and M.TRAIN_LOSS in metrics:
            rate = metrics.get(M.SAMPLES_PER_S, 0.0)
            eta = eta_s(metrics, kimg, total_kimg, max_train_s)
            say(
                f"[{what}] {kimg:.2f}/{total_kimg:g} kimg  loss {metrics[M.TRAIN_LOSS]:.4f}  {rate:.0f} samples/s  "
                f"elapsed {time.monotonic() - t0:.0f} s  ETA {eta:.0f} s"
            )

    def checkpoint_cb(path: str | None, metrics: dict, kimg: float) -> None:
        report = checkpoint_report(metrics, kimg, total_kimg)  # what Tune's schedulers read (sweep/asha.py)
        if rank == 0 and path:
            d = Path(tempfile.mkdtemp(prefix="hkd-ckpt-"))
            shutil.copy2(path, d / Path(path).name)
            ray.train.report(
                report,
                checkpoint=Checkpoint.from_directory(str(d)),  # (2) upload to storage
                checkpoint_upload_fn=uploader,
            )
            shutil.rmtree(d, ignore_errors=True)
            if tracker is not None and run_id and uploader is not None:
                tracker.log_metrics(
                    run_id,
                    {
                        M.CHECKPOINT_KIMG: kimg,
                        M.CHECKPOINT_UPLOAD_S: uploader.last_s,
                        M.CHECKPOINT_UPLOAD_RETRIES: uploader.retries,
                    },
                    step=int(round(kimg * 1000)),
                )
                tracker.flush(deadline_s=0)  # what led up to a recorded checkpoint is not left in memory
        else:
            ray.train.report(report)  # (2) every rank reports each time

    return metrics_cb, checkpoint_cb


def tracker_for_rank0(pc, rank: int):
    if rank != 0:
        return None
    from orchestrator.services.tracking import Tracker

    # metrics leave from a background thread: a tracking server that restarts delays them, never training;
    # one HTTP attempt per send (the thread tries again every 2 s) instead of MLflow's minutes of back-off
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return Tracker(pc.tracking, background_flush_s=2.0)


def worker_nodes() -> dict[str, dict]:
    """Where this worker group runs: Ray node id -> {"ip", "ranks"}, gathered from every rank over the process
    group (every rank must call it)."""
    import ray
    import torch.distributed as dist

    me = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    ranks = [me]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, me)
    nodes: dict[str, dict] = {}
    for rank, (node, ip) in enumerate(ranks):
        nodes.setdefault(node, {"ip": ip, "ranks": []})["ranks"].append(rank)
    return nodes


def placement_line(nodes: dict[str, dict]) -> str:
    """'2 workers on 2 nodes: 127.0.0.2 (ranks 0), 127.0.0.3 (ranks 1)'"""
    n = sum(len(v["ranks"]) for v in nodes.values())
    where = ", ".join(
        f"{v['ip']} [{k[:8]}] (ranks {','.join(map(str, v['ranks']))})" for k, v in nodes.items()
    )
    return f"{n} worker{'s' if n != 1 else ''} on {len(nodes)} node{'s' if len(nodes) != 1 else ''}: {where}"


def count_attempt(tracker, run_id: str | None, resume: str | None, nodes: dict | None = None) -> None:
    """Each start of the worker group (the first, and every restart by Ray Train's FailureConfig or by a
    rerun of the stage) bumps the run's tag hkd.train_attempts and logs train/attempt (and, when it picked up
    a checkpoint, train/resumed_from_kimg) at the step it starts from. Where the group runs goes to the tags
    hkd.worker_nodes (now) and hkd.worker_nodes.<attempt> (JSON: node id -> ip, ranks) and the metric
    train/nodes."""
    if tracker is None or not run_id:
        return
    n = int(tracker.run_data(run_id).data.tags.get("hkd.train_attempts", "0")) + 1
    if nodes:
        placed = json.dumps(nodes, sort_keys=True, separators=(",", ":"))
        tracker.set_tags(run_id, {"hkd.worker_nodes": placed, f"hkd.worker_nodes.{n}": placed})
        say(f"[train] attempt {n}: {placement_line(nodes)}")
    tracker.set_tags(run_id, {"hkd.train_attempts": n})
    kimg = float(Path(resume).stem.split("-", 1)[1]) if resume else 0.0  # ckpt-<kimg>.pt
    metrics = {
        M.TRAIN_ATTEMPT: n,
        **({M.TRAIN_RESUMED_FROM_KIMG: kimg} if resume else {}),
        **({M.TRAIN_NODES: len(nodes)} if nodes else {}),
    }
    tracker.log_metrics(run_id, metrics, step=int(round(kimg * 1000)))
    if resume:
        say(f"[train] attempt {n} resumes from {kimg:g} kimg")


class LoopReporting:
    """All a Ray Train loop reports, set up and torn down in one place: rank 0's MLflow tracker (metrics from a
    background buffer), the loop's metrics_cb / checkpoint_cb, the checkpoint Ray hands back on a restart
    (``resume``), the count of worker-group starts, and a local folder for checkpoints before upload."""

    def __init__(
        self,
        pc,
        run_id: str | None,
        rank: int,
        what: str,
        total_kimg: float,
        start_from: tuple | None = None,
        max_train_s: float | None = None,
    ):
        self.tracker = tracker_for_rank0(pc, rank)
        self.run_id = run_id
        from orchestrator.services.system_metrics import SystemMetrics

        # the machine rank 0 trains on, in the run's System Metrics tab (system/train_rank0/...)
        self.system = SystemMetrics(
            pc.tracking, run_id if self.tracker is not None else None, node="train_rank0"
        )
        self.metrics_cb, self.checkpoint_cb = callbacks(
            rank, self.tracker, run_id, total_kimg, what, pc.storage, max_train_s
        )
        self.local = Path(tempfile.mkdtemp(prefix=f"hkd-{what}-"))
        # Ray's newest checkpoint of this run first (a restart); else a checkpoint the config continues from
        # (``start_from``: its bytes and kimg, e.g. teacher.resume_from), written where the loop can read it
        self.resume = resume_file() or (given_checkpoint(self.local, *start_from) if start_from else None)
        count_attempt(self.tracker, run_id, self.resume, worker_nodes())

    def log(self, metrics: dict, kimg: float) -> None:
        if self.tracker is not None and self.run_id:
            self.tracker.log_metrics(self.run_id, metrics, step=int(round(kimg * 1000)))

    def __enter__(self) -> LoopReporting:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.system.finish()
        if self.tracker is not None:  # a failing loop sends what it can at once and lets Ray Train restart it
            self.tracker.close(deadline_s=0 if exc_type else None)
        shutil.rmtree(self.local, ignore_errors=True)

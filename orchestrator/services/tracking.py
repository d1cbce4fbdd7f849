"""MLflow tracking with deterministic run identity, buffered metrics and lineage tags.

A run is found by its key (tag ``hkd.run_key``) before one is created, so a restarted stage reopens the
same MLflow run. Params are flattened with ``/`` and logged once. Metrics go into a buffer that is flushed
with retries; if the tracking server is down, they wait in memory and arrive when it is back.

Why a buffer of our own when MLflow's client retries already: MLflow retries one HTTP call within its retry
window (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 7 with backoff factor 2, about 4 minutes) and then raises, and
the values of that batch are gone unless the caller still holds them; its call also blocks the caller for that
window. Here a chunk leaves the buffer only once the server took it (an outage of any length loses nothing),
and the training loop never waits: a background thread sends.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.services.tracking_auth import use_credentials_file

log = logging.getLogger(__name__)
RUN_KEY = "hkd.run_key"
# MLflow 3's experiment type: its UI opens a model-training experiment on the runs table
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


@dataclass
class TrackingConfig:
    kind: str = "server"  # server (an MLflow server at uri) | file (a local store, no server)
    root: str | None = None  # file: folder of mlflow.db and the artifacts; None: $HKD_CACHE/mlflow
    uri: str | None = None  # server: e.g. http://127.0.0.1:5000; None: $MLFLOW_TRACKING_URI
    experiment: str = "hkd"
    register_model: str | None = "hkd"  # Model Registry name for distilled models; None: don't register
    retry_deadline_s: float = 300.0  # keep unsent metrics and retry this long before failing the run
    system_metrics_s: float = 10.0  # CPU, memory, disk, network (and GPU) on each stage's run, every this
    # many seconds (MLflow's System Metrics tab); 0: off
    tags: dict = field(default_factory=dict)

    def resolved_root(self) -> Path:
        if self.root:
            return Path(self.root).expanduser().resolve()
        from hkd_core.data import cache_dir

        return cache_dir().resolve() / "mlflow"

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: the server decides, a file store keeps them beside it."""
        return (self.resolved_root() / "artifacts").as_uri() if self.kind == "file" else None

    def resolved_uri(self) -> str:
        if self.kind == "file":
            root = self.resolved_root()
            root.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{root / 'mlflow.db'}"
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(
                "tracking.uri is not set and MLFLOW_TRACKING_URI is empty; point it at the MLflow "
                "server (python infra/local/stack.py start prints it)"
            )
        return uri


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested params -> {'a/b/c': 'value'} (lists as JSON)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}/"))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    use_credentials_file()
    return MlflowClient(tracking_uri=uri)


def _with_retry(fn, what: str, deadline_s: float):
    """Retry anything but a permanent MLflow error (a server restart looks like refused connections)."""
    t0 = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if _permanent(e) or time.monotonic() - t0 > deadline_s:
                raise
            attempt += 1
            delay = min(10.0, 0.5 * 2 ** min(attempt, 5))
            log.warning("%s failed (%s); retry %d in %.1f s", what, str(e)[:160], attempt, delay)
            time.sleep(delay)


# A server under load answers some requests 400 although nothing is wrong with them: its database connection
# pool ran out (SQLAlchemy's "QueuePool limit ... reached, connection timed out") or SQLite's lock wait expired.
# Those are retried like a server that is away (docs/results/issue28).
BUSY_SERVER = ("QueuePool limit", "connection timed out", "database is locked")


def _permanent(e: BaseException) -> bool:
    """Errors that retrying cannot fix (bad request, resource exists/missing), except a busy server's."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        if any(m in str(e) for m in BUSY_SERVER):
            return False
        code = getattr(e, "error_code", "")
        return code in (
            "INVALID_PARAMETER_VALUE",
            "RESOURCE_ALREADY_EXISTS",
            "RESOURCE_DOES_NOT_EXIST",
            "BAD_REQUEST",
            "INVALID_STATE",
        )
    return isinstance(e, (ValueError, TypeError, FileNotFoundError))


class Tracker:
    """One MLflow client for the driver (or a worker), with retrying, buffered writes."""

    def __init__(self, cfg: TrackingConfig, background_flush_s: float | None = None):
        """With ``background_flush_s`` a thread sends the buffer that often, so that logging never waits on the
        server (the training loops use it: a tracking server that restarts must not stall training)."""
        self.cfg = cfg
        self.uri = cfg.resolved_uri()
        self.client = _client(self.uri)
        self._buffer: dict[str, list] = {}
        self._lock = threading.Lock()  # guards the buffer; never held while talking to the server
        self._send_lock = threading.Lock()  # one sender at a time
        self.experiment_id = self._call(lambda: self._experiment(cfg.experiment), "get experiment")
        self._down_since: float | None = None  # when the server stopped answering (for the log line)
        self._stop = threading.Event()
        self._thread = None
        if background_flush_s:
            self._thread = threading.Thread(
                target=self._flush_loop, args=(background_flush_s,), daemon=True, name="hkd-mlflow-flush"
            )
            self._thread.start()

    def _flush_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.flush(deadline_s=0)
            except Exception as e:  # noqa: BLE001 - a permanent error surfaces at the final flush
                log.warning("background metric flush: %s", str(e)[:200])

    def close(self, deadline_s: float | None = None) -> None:
        """Stop the background sender and send what is left (retrying up to the deadline)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.flush(deadline_s)

    def _call(self, fn, what: str):
        return _with_retry(fn, what, self.cfg.retry_deadline_s)

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if needed as a model-training experiment (``mlflow.experimentKind``), so
        that MLflow 3's UI opens it on its runs, not on the GenAI overview; an older one is marked too."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND) is None:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=self.cfg.artifact_location(), tags={EXPERIMENT_KIND: MODEL_TRAINING}
            )
        except Exception:  # a concurrent creator won the race
            return self.client.get_experiment_by_name(name).experiment_id

    def log_inputs(self, run_id: str, inputs: list[dict]) -> None:
        """MLflow dataset inputs (the runs table's Dataset column): each dict has name, digest, source (a URI or
        a description), source_type, context (training, evaluation, ...) and optionally profile (a dict)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = [
            DatasetInput(
                Dataset(
                    name=i["name"],
                    digest=i["digest"][:36],
                    source_type=i.get("source_type", "local"),
                    source=json.dumps({"uri": i["source"]}),
                    profile=json.dumps(i["profile"]) if i.get("profile") else None,
                ),
                tags=[InputTag("mlflow.data.context", i["context"])],
            )
            for i in inputs
        ]
        self._call(lambda: self.client.log_inputs(run_id, datasets=ds), "log dataset inputs")

    def search(self, filter_string: str, max_results: int = 1000) -> list:
        """Runs of this experiment matching an MLflow filter (with the tracker's retries)."""
        return self._call(
            lambda: self.client.search_runs([self.experiment_id], filter_string, max_results=max_results),
            f"search {filter_string}",
        )

    def find_run(self, key: str):
        runs = self._call(
            lambda: self.client.search_runs(
                [self.experiment_id],
                f"tags.`{RUN_KEY}` = '{key}'",
                max_results=5,
                order_by=["attributes.start_time ASC"],
            ),
            f"search run {key}",
        )
        return runs[0] if runs else None

    def open_run(
        self, key: str, name: str, parent_run_id: str | None = None, tags: dict | None = None
    ) -> str:
        """The run with this key (reopened, status RUNNING again), or a new one. Returns its run id."""
        run = self.find_run(key)
        all_tags = {RUN_KEY: key, **self.cfg.tags, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run is None:
            run = self._call(
                lambda: self.client.create_run(
                    self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()}
                ),
                f"create run {name}",
            )
            log.info("mlflow: new run %s (%s)", name, run.info.run_id)
        else:
            self._call(lambda: self.client.update_run(run.info.run_id, status="RUNNING"), "reopen run")
            self.set_tags(run.info.run_id, all_tags)
            log.info("mlflow: reopened run %s (%s)", name, run.info.run_id)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        """Flattened, and only those not logged yet (MLflow refuses to change a param)."""
        from mlflow.entities import Param

        have = self._call(lambda: self.client.get_run(run_id).data.params, "get params")
        flat = {k: v[:6000] for k, v in flatten(params).items() if k not in have}
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._call(lambda: self.client.log_batch(run_id, params=items[i : i + 100]), "log params")

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(lambda: self.client.log_batch(run_id, tags=items), "set tags")

    def delete_tags(self, run_id: str, keys) -> None:
        """Remove these tags where the run has them (a reopened run that no longer is what they said)."""
        have = self._call(lambda: self.client.get_run(run_id), "get run").data.tags
        for k in keys:
            if k in have:
                self._call(lambda k=k: self.client.delete_tag(run_id, k), f"delete tag {k}")

    def log_metrics(
        self, run_id: str, metrics: dict, step: int, flush: bool = True, model_id: str | None = None
    ) -> None:
        """Buffer, then try to send; a failure keeps the buffer for the next flush (never drops metrics). With
        ``model_id`` (MLflow 3's logged model) the metrics are the model's too: its page lists them."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            buf = self._buffer.setdefault(run_id, [])
            buf += [
                Metric(k, float(v), now, int(step), model_id=model_id)
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and v == v
            ]
        if flush and self._thread is None:
            self.flush(deadline_s=0)

    def _next_chunk(self) -> tuple[str, list] | None:
        with self._lock:
            for run_id in list(self._buffer):
                if self._buffer[run_id]:
                    return run_id, self._buffer[run_id][:500]
                del self._buffer[run_id]
        return None

    def flush(self, deadline_s: float | None = None) -> bool:
        """Send buffered metrics; with deadline_s=0 one attempt, else retry up to the deadline. True if empty.
        Values logged meanwhile are appended behind the chunk in flight; a chunk leaves the buffer only once
        the server took it."""
        deadline = self.cfg.retry_deadline_s if deadline_s is None else deadline_s
        # one attempt (deadline 0) never waits for a send already in flight: the caller may be a training loop
        if not self._send_lock.acquire(blocking=bool(deadline)):
            return False
        try:
            return self._send(deadline)
        finally:
            self._send_lock.release()

    def _send(self, deadline: float) -> bool:
        while (nxt := self._next_chunk()) is not None:
            run_id, chunk = nxt
            try:
                if deadline:
                    _with_retry(lambda: self.client.log_batch(run_id, metrics=chunk), "log metrics", deadline)
                else:
                    self.client.log_batch(run_id, metrics=chunk)
            except Exception as e:  # noqa: BLE001 - kept for the next flush
                if _permanent(e):
                    raise
                if self._down_since is None:
                    self._down_since = time.monotonic()
                log.warning(
                    "mlflow unreachable (%s); %d metric values buffered", str(e)[:120], self.pending()
                )
                return False
            if self._down_since is not None:
                log.warning(
                    "mlflow reachable again after %.1f s; buffered metric values are being sent",
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
            with self._lock:
                del self._buffer[run_id][: len(chunk)]
        return True

    def pending(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._buffer.values())

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifact(run_id, str(path), artifact_path), f"log artifact {path}")

    def log_dict(self, run_id: str, d: dict, artifact_file: str) -> None:
        self._call(lambda: self.client.log_dict(run_id, d, artifact_file), f"log {artifact_file}")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call(lambda: self.client.log_text(run_id, text, artifact_file), f"log {artifact_file}")

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush()
        self._call(lambda: self.client.set_terminated(run_id, status), "end run")

    def run_data(self, run_id: str):
        return self._call(lambda: self.client.get_run(run_id), "get run")

    def history(self, run_id: str, key: str) -> dict[int, float]:
        """A metric's values by step (the last one logged at each step)."""
        self.flush()
        return self._call(lambda: metric_history(self.client, run_id, key), f"read {key}")


def metric_history(client, run_id: str, key: str) -> dict[int, float]:
    """A metric's values by step (the last one logged at each step), read with an MLflow client."""
    hist = client.get_metric_history(run_id, key)
    return {m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}


def artifact_probe(tracking_uri: str, body: bytes) -> str:
    """Log, list and read back a small artifact through the tracking server (proxied to S3)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name("hkd-preflight")
    exp_id = exp.experiment_id if exp else client.create_experiment("hkd-preflight")
    run = client.create_run(exp_id, run_name="preflight")
    try:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "probe.txt"
            p.write_bytes(body)
            client.log_artifact(run.info.run_id, str(p))
            names = [f.path for f in client.list_artifacts(run.info.run_id)]
            assert "probe.txt" in names, f"probe missing from the artifact listing {names}"
            got = Path(client.download_artifacts(run.info.run_id, "probe.txt", d + "/dl")).read_bytes()
            assert got == body, "read back different bytes"
        where = client.get_run(run.info.run_id).info.artifact_uri
        return f"log/list/read an artifact of run {run.info.run_id} at {where}"
    finally:
        client.delete_run(run.info.run_id)

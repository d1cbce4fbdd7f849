"""What every stage runs in: ``StageContext`` (the config, the tracker, the pipeline's run, where the stage writes,
its MLflow run opened, failed or finished, its training fitted on Ray Train) and the dataset inputs its run
records."""

from __future__ import annotations

import dataclasses
import json
import logging

from orchestrator import identity
from orchestrator.config import PipelineConfig
from orchestrator.services.storage import make_store
from orchestrator.services.system_metrics import SystemMetrics
from orchestrator.services.tracking import Tracker
from orchestrator.stages import trainer
from orchestrator.stages.lease import LEASE

log = logging.getLogger(__name__)
DONE = "_SUCCESS.json"
OUTPUTS = "_outputs"  # the marker's list of the files it vouches for
# the config sections each stage's MLflow run records as params
STAGE_PARAMS = {
    "teacher": ("data", "teacher"),
    "trajectories": ("data", "teacher", "trajectories"),
    "distill": ("data", "teacher", "trajectories", "model", "train"),
    "evaluate": ("data", "model", "eval"),
}


def stage_done(store, stage: str) -> dict | None:
    """The stage's summary if it finished for this config (``store``: its folder) and every file its marker
    vouches for is still there; None when it did not, or when one of them is gone (the marker is then removed,
    and the stage runs again)."""
    if not store.exists(DONE):
        return None
    summary = json.loads(store.get(DONE))
    vouched = summary.pop(OUTPUTS, None)
    if vouched:
        gone = sorted(set(vouched) - set(store.list()))
        if gone:
            log.warning(
                "%s: %s says the stage finished, but %d of the %d files it vouches for are gone "
                "(%s%s): running the stage again",
                stage,
                store.uri(DONE),
                len(gone),
                len(vouched),
                ", ".join(gone[:3]),
                ", ..." if len(gone) > 3 else "",
            )
            store.delete(DONE)
            return None
    return summary


@dataclasses.dataclass
class StageContext:
    """The validated config (``pc``, the one object every Ray worker receives as it is: no worker parses or
    validates it again), the tracker, the pipeline's run and the lineage tags."""

    pc: PipelineConfig
    tracker: Tracker
    parent_run_id: str | None
    lineage: dict  # tags every run carries (config hash, git sha, data, ...)
    progress: bool = True
    opened: dict = dataclasses.field(default_factory=dict)  # stage -> its MLflow run id, once opened
    system: dict = dataclasses.field(default_factory=dict)  # stage -> its SystemMetrics sampler, while open

    def prefix(self, stage: str) -> str:
        return identity.stage_prefix(self.pc, stage)

    def store(self, stage: str):
        return make_store(self.pc.storage, self.prefix(stage))

    def done(self, stage: str) -> dict | None:
        return stage_done(self.store(stage), stage)

    def finish(self, stage: str, summary: dict) -> None:
        """Mark the stage done for this config: its summary and the files it wrote (the marker vouches for them)."""
        s = self.store(stage)
        outputs = sorted(k for k in s.list() if k not in (DONE, LEASE))
        s.put(DONE, json.dumps({**summary, OUTPUTS: outputs}, indent=1, default=float).encode())

    def open_run(self, stage: str, tags: dict | None = None) -> str:
        run_id = self.tracker.open_run(
            identity.run_key(self.pc, stage),
            identity.run_name(self.pc, stage),
            self.parent_run_id,
            {**self.lineage, "hkd.stage": stage, "hkd.stage_hash": self.pc.stages()[stage], **(tags or {})},
        )
        run = self.pc.run.to_dict()
        self.tracker.log_params(
            run_id,
            {**{k: run[k] for k in STAGE_PARAMS[stage]}, "cluster": dataclasses.asdict(self.pc.cluster)},
        )
        inputs = self.inputs(stage)
        if inputs:
            self.tracker.log_inputs(run_id, inputs)
        self.opened[stage] = run_id
        self.system[stage] = SystemMetrics(self.pc.tracking, run_id)  # the driver's machine while it runs
        return run_id

    def close_system_metrics(self, stage: str) -> None:
        if stage in self.system:
            self.system.pop(stage).finish()

    def fail(self, stage: str, err: BaseException) -> None:
        """A stage that raised: its run (if it got one) ends FAILED, saying why, whatever the exception; a run that
        something else already ended (MLflow's own context manager, say) still gets the reason."""
        run_id = self.opened.get(stage)
        if run_id is None:
            return
        run = self.tracker.run_data(run_id)
        if run.info.status == "RUNNING" or "hkd.end_reason" not in run.data.tags:
            from orchestrator.errors import summary

            self.tracker.set_tags(run_id, {"hkd.end_reason": summary(err)[:4000]})
        if run.info.status == "RUNNING":
            self.tracker.end(run_id, "FAILED")

    def inputs(self, stage: str) -> list[dict]:
        return dataset_inputs(self.pc, stage, self.store("trajectories").uri("train"))

    def fit(self, stage: str, loop, run_id: str, extra: dict):
        t = trainer.make_trainer(
            self.pc, loop, {"pipeline": self.pc, "run_id": run_id, **extra}, self.prefix(stage)
        )
        return trainer.fit(t)


def dataset_inputs(pc: PipelineConfig, stage: str, trajectories_uri: str) -> list[dict]:
    """What a stage's run (or a sweep trial, stage "distill") consumed, as MLflow dataset inputs: the image set
    (teacher: training; evaluate: the FID reference split) and, for distill, the teacher's trajectories at
    ``trajectories_uri`` (named by their stage prefix, digest = their stage hash): the runs table's Dataset
    column then says what each run trained on."""
    from hkd_core.config import config_hash

    d, run = pc.run.data, pc.run

    def images(split: str, context: str) -> dict:
        sub = dataclasses.replace(d, split=split)
        return {
            "name": f"{d.name}/{split}",
            "digest": config_hash(sub)[:12],
            "source": f"hkd-data:{d.name}",
            "source_type": "local",
            "context": context,
            "profile": {"split": split, "resolution": d.resolution, "limit": d.limit},
        }

    if stage == "teacher" and run.teacher.kind == "edm":
        return [images(d.split, "training")]
    if stage == "distill":
        t = run.trajectories
        return [
            {
                "name": identity.stage_prefix(pc, "trajectories"),
                "digest": pc.stages()["trajectories"],
                "source": trajectories_uri,
                "source_type": "s3" if trajectories_uri.startswith("s3://") else "local",
                "context": "training",
                "profile": {
                    "trajectories": t.num,
                    "sampler": t.sampler,
                    "steps": t.steps,
                    "teacher": run.teacher.kind,
                },
            },
            images(d.split, "teacher training"),
        ]
    if stage == "evaluate":
        return [images(run.eval.split, "evaluation")]
    return []

"""``hkd edit``: frequency-aware editing of generated images with a reference, against the all-bands baseline,
as a figure grid, a trade-off plot and a table, logged to MLflow beside the pipeline run that made the model.

The model is the distilled one of the given config (``s3://.../distill-<hash>/model.pt``) unless ``--model``
names another: an ``s3://bucket/key``, a local ``model.pt`` record, or a registered ``models:/name/version``.
Editing runs in the driver process: a few dozen decoder passes, seconds on a CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path

import torch

from hkd_core import metric_names as M

from . import identity
from .config import PipelineConfig
from .storage import S3Store, make_store
from .tracking import Tracker

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EditArgs:
    band: str = "high"
    tau_mid: float = 0.5
    mask: str = "lower"
    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4
    seed: int = 0
    n_bands: int = 3

    def validate(self) -> "EditArgs":
        from hkd_core.editing import MASKS

        if self.mask not in MASKS:
            raise ValueError(f"--mask {self.mask!r}: use one of {', '.join(MASKS)}")
        if not 0.0 <= self.tau_mid <= 1.0:
            raise ValueError(f"--tau-mid {self.tau_mid} must lie in [0, 1]")
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ValueError(f"--ratios {list(self.ratios)}: give one or more ratios in [0, 1], e.g. 0,0.5,1")
        if self.samples < 1:
            raise ValueError(f"--samples {self.samples} must be >= 1")
        if self.n_bands < 1:
            raise ValueError(f"--bands {self.n_bands} must be >= 1")
        return self


def load_model(pc: PipelineConfig, uri: str | None):
    """(model, uri): the config's distilled model, or the one ``uri`` names."""
    from hkd_core.models import model_from_record

    if uri is None:
        key = f"{identity.stage_prefix(pc, 'distill')}/model.pt"
        store = make_store(pc.storage)
        if not store.exists(key):
            raise FileNotFoundError(f"no distilled model for this config at {store.uri(key)}; run `hkd pipeline` "
                                    f"with the same overrides first, or pass --model s3://... | models:/name/version")
        return model_from_record(torch.load(io.BytesIO(store.get(key)), map_location="cpu", weights_only=False)), \
            store.uri(key)
    if uri.startswith("models:/") or uri.startswith("runs:/"):
        import mlflow.pytorch

        return mlflow.pytorch.load_model(uri, map_location="cpu"), uri
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        store = S3Store(dataclasses.replace(pc.storage, bucket=bucket, prefix=""))
        if not store.exists(key):
            raise FileNotFoundError(f"--model {uri}: no such object")
        data = store.get(key)
    else:
        p = Path(uri).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--model {uri}: no such file (a model.pt record written by the pipeline)")
        data = p.read_bytes()
    return model_from_record(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)), uri


def run_edit(pc: PipelineConfig, args: EditArgs, model_uri: str | None = None, out: str | Path | None = None,
             log_mlflow: bool = True) -> dict:
    from hkd_core.editing import edit_sweep, named_mask, resolve_band
    from hkd_core.figures import plot_edit_grid, plot_edit_tradeoff
    from hkd_core.models import HKD

    args.validate()
    model, uri = load_model(pc, model_uri)
    model = model.eval()
    if not isinstance(model, HKD):
        raise ValueError(f"{uri} is a {type(model).__name__} model; editing needs a Koopman model with levels "
                         f"(model.variant hkd, no_koopman or one_level)")
    modes = min(ev.shape[0] for ev in model.spectrum())
    n_bands = min(args.n_bands, modes)
    band = resolve_band(args.band, n_bands)
    g = torch.Generator().manual_seed(args.seed)
    x_T, x_ref = model.noise(args.samples, g), model.noise(args.samples, g)
    sweep = edit_sweep(model, x_T, x_ref, named_mask(args.mask, model.cfg.resolution), list(args.ratios), band,
                       args.tau_mid, n_bands)
    params = {**dataclasses.asdict(args), "ratios": list(args.ratios), "n_bands": n_bands, "band_index": band,
              "model_uri": uri}
    ident = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(out or Path("runs") / f"edit-{ident}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [plot_edit_grid(sweep, folder / "edit_grid.png", max_samples=args.samples),
             plot_edit_tradeoff(sweep, folder / "edit_tradeoff.png")]
    md = sweep.to_markdown()
    (folder / "edit_scores.md").write_text(md)
    (folder / "edit_scores.json").write_text(json.dumps({"params": params, "rows": sweep.table()}, indent=1))
    paths += [folder / "edit_scores.md", folder / "edit_scores.json"]
    result = {"params": params, "rows": sweep.table(), "markdown": md, "folder": str(folder),
              "figures": [str(p) for p in paths]}
    if log_mlflow:
        tracker = Tracker(pc.tracking)
        parent = tracker.find_run(identity.run_key(pc, "pipeline"))
        run_id = tracker.open_run(identity.edit_run_key(pc, ident), f"edit-{args.mask}-band{band}",
                                  parent.info.run_id if parent else None,
                                  {"hkd.stage": "edit", "hkd.model_uri": uri})
        tracker.log_params(run_id, {"edit": params})
        for row in sweep.table():
            tracker.log_metrics(run_id, {M.edit(k): v for k, v in row.items() if k != "r"},
                                step=int(round(row["r"] * 100)), flush=False)
        for p in paths:
            tracker.log_artifact(run_id, p, "edit")
        tracker.end(run_id)
        result.update({"_run_id": run_id, "_experiment_id": tracker.experiment_id, "_tracking_uri": tracker.uri})
    return result

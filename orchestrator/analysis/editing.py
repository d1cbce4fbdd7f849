"""``hkd edit``: frequency-aware editing of generated images with a reference (a test image, an image file or a
generated sample, entering through its own state at sigma(tau_mid)), against its control (random mode sets of
the band's size) and the all-bands baseline, as a figure grid, a trade-off plot and a table, logged to MLflow
beside the pipeline run that made the model.

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
from orchestrator import identity
from orchestrator.config import PipelineConfig
from orchestrator.services.storage import make_store, read_uri
from orchestrator.services.tracking import Tracker

log = logging.getLogger(__name__)

EDIT_GRID_SAMPLES = 3  # samples drawn in edit_grid.png, whatever --samples is


@dataclasses.dataclass
class EditArgs:
    band: str = "high"
    tau_mid: float = 0.5
    mask: str = "lower"
    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 64  # the scores carry bootstrap 95 % intervals over them
    seed: int = 0
    n_bands: int = 3
    reference: str = "data"  # data | data:I,J,... | file:PATH[,PATH...] | sample  (see load_references)
    controls: int = 4  # random mode sets of the band's size, the control
    order: str = "alpha"  # bands sort modes by alpha, or by speed |alpha| (hkd_core.spectra.band_key)

    def validate(self) -> EditArgs:
        from hkd_core.editing import MASKS

        kind = self.reference.partition(":")[0]
        if kind not in REFERENCE_KINDS:
            raise ValueError(
                f"--reference {self.reference!r}: use data, data:I,J,... (indices of the test split), "
                f"file:PATH[,PATH...] (image files) or sample (the model's own samples)"
            )
        if kind == "file" and not self.reference.partition(":")[2]:
            raise ValueError("--reference file: give the image path(s), e.g. file:shirt.png")
        if self.controls < 1:
            raise ValueError(
                f"--controls {self.controls} must be >= 1 (random mode sets, the band's control)"
            )

        from hkd_core.spectra import BAND_ORDERS

        if self.order not in BAND_ORDERS:
            raise ValueError(
                f"--band-order {self.order!r}: use alpha (band 0 decays fastest) or speed (band 0 "
                f"has the largest |alpha|)"
            )
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


REFERENCE_KINDS = ("data", "file", "sample")


def load_references(pc: PipelineConfig, args: EditArgs, model, n: int) -> tuple[torch.Tensor, list[str]]:
    """(n reference images in [-1, 1] at the model's size, a label for each). ``data``: test-split images drawn
    with --seed; ``data:I,J``: those indices (cycled to n); ``file:A.png,B.png``: image files (converted to the
    model's channels, resized to its resolution); ``sample``: the model's own one-step samples from other noise."""
    from hkd_core.data import load_images

    kind, _, rest = args.reference.partition(":")
    c, r = model.cfg.img_channels, model.cfg.resolution
    if kind == "sample":
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            return model.sample(n, g).clamp(-1, 1), [f"sample {i}" for i in range(n)]
    if kind == "file":
        from PIL import Image

        paths = [Path(p).expanduser() for p in rest.split(",") if p]
        imgs = []
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"--reference file:{p}: no such file")
            try:
                im = Image.open(p).convert("L" if c == 1 else "RGB").resize((r, r), Image.BICUBIC)
            except OSError as e:
                raise ValueError(f"--reference file:{p}: not an image PIL can read ({e})") from None
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(r, r, c).permute(2, 0, 1)
            imgs.append(t.float() / 127.5 - 1)
        return torch.stack([imgs[i % len(imgs)] for i in range(n)]), [
            paths[i % len(paths)].name for i in range(n)
        ]
    images, _ = load_images(
        pc.run.data.name, "test", resolution=pc.run.data.resolution, root=pc.run.data.root
    )
    if rest:
        try:
            idx = [int(i) for i in rest.split(",") if i.strip()]
        except ValueError:
            raise ValueError(
                f"--reference {args.reference!r}: indices must be integers, e.g. data:3,17"
            ) from None
        bad = [i for i in idx if not 0 <= i < len(images)]
        if bad or not idx:
            raise ValueError(
                f"--reference {args.reference!r}: indices {bad or idx} outside the test split's "
                f"0..{len(images) - 1}"
            )
        idx = [idx[i % len(idx)] for i in range(n)]
    else:
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    return images[idx], [f"{pc.run.data.name} test #{i}" for i in idx]


def load_model(pc: PipelineConfig, uri: str | None):
    """(model, uri): the config's distilled model, or the one ``uri`` names."""
    from hkd_core.models import model_from_record

    if uri is None:
        key = f"{identity.stage_prefix(pc, 'distill')}/model.pt"
        store = make_store(pc.storage)
        if not store.exists(key):
            raise FileNotFoundError(
                f"no distilled model for this config at {store.uri(key)}; run `hkd pipeline` "
                f"with the same overrides first, or pass --model s3://... | models:/name/version"
            )
        return model_from_record(
            torch.load(io.BytesIO(store.get(key)), map_location="cpu", weights_only=False)
        ), store.uri(key)
    if uri.startswith("models:/") or uri.startswith("runs:/"):
        import mlflow.pytorch

        return mlflow.pytorch.load_model(uri, map_location="cpu"), uri
    data = read_uri(pc.storage, uri, "--model")
    return model_from_record(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)), uri


def run_edit(
    pc: PipelineConfig,
    args: EditArgs,
    model_uri: str | None = None,
    out: str | Path | None = None,
    log_mlflow: bool = True,
) -> dict:
    from hkd_core.edit_figures import plot_edit_grid, plot_edit_tradeoff
    from hkd_core.editing import edit_sweep, named_mask, resolve_band
    from hkd_core.models import HKD

    args.validate()
    model, uri = load_model(pc, model_uri)
    model = model.eval()
    if not isinstance(model, HKD):
        raise ValueError(
            f"{uri} is a {type(model).__name__} model; editing needs a Koopman model with levels "
            f"(model.variant hkd, no_koopman or one_level)"
        )
    modes = min(ev.shape[0] for ev in model.spectrum())
    n_bands = min(args.n_bands, modes)
    band = resolve_band(args.band, n_bands)
    refs, ref_labels = load_references(pc, args, model, args.samples)
    g = torch.Generator().manual_seed(args.seed)
    x_T = model.noise(args.samples, g)
    sweep = edit_sweep(
        model,
        x_T,
        refs,
        named_mask(args.mask, model.cfg.resolution),
        list(args.ratios),
        band,
        args.tau_mid,
        n_bands,
        controls=args.controls,
        generator=g,
        order=args.order,
    )
    params = {
        **dataclasses.asdict(args),
        "ratios": list(args.ratios),
        "n_bands": n_bands,
        "band_index": band,
        "model_uri": uri,
        "references": ref_labels,
    }
    ident = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(out or Path("runs") / f"edit-{ident}")
    folder.mkdir(parents=True, exist_ok=True)
    # a few samples in the grid (every sample in the scores): 16 rows of three made an unreadable 5,563 px column
    paths = [
        plot_edit_grid(sweep, folder / "edit_grid.png", max_samples=EDIT_GRID_SAMPLES),
        plot_edit_tradeoff(sweep, folder / "edit_tradeoff.png"),
    ]
    md = sweep.to_markdown()
    (folder / "edit_scores.md").write_text(md)
    (folder / "edit_scores.json").write_text(json.dumps({"params": params, "rows": sweep.table()}, indent=1))
    paths += [folder / "edit_scores.md", folder / "edit_scores.json"]
    result = {
        "params": params,
        "rows": sweep.table(),
        "markdown": md,
        "folder": str(folder),
        "figures": [str(p) for p in paths],
    }
    if log_mlflow:
        tracker = Tracker(pc.tracking)
        parent = tracker.find_run(identity.run_key(pc, "pipeline"))
        run_id = tracker.open_run(
            identity.edit_run_key(pc, ident),
            f"edit-{args.mask}-band{band}",
            parent.info.run_id if parent else None,
            {"hkd.stage": "edit", "hkd.model_uri": uri},
        )
        tracker.log_params(run_id, {"edit": params})
        for row in sweep.table():
            flat = {}
            for k, v in row.items():
                if k == "r":
                    continue
                if isinstance(v, list):  # an interval: its two ends as two metrics
                    (
                        flat[M.edit(k.removesuffix("_ci") + "_lo")],
                        flat[M.edit(k.removesuffix("_ci") + "_hi")],
                    ) = v
                else:
                    flat[M.edit(k)] = v
            tracker.log_metrics(run_id, flat, step=int(round(row["r"] * 100)), flush=False)
        for p in paths:
            tracker.log_artifact(run_id, p, "edit")
        tracker.end(run_id)
        result.update(
            {"_run_id": run_id, "_experiment_id": tracker.experiment_id, "_tracking_uri": tracker.uri}
        )
    return result

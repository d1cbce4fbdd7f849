"""Band masking with a number (issue 13): for each band of a trained HKD model, what removing it changes in the
one-step image, split into low / mid / high spatial frequencies (radial shares of the power spectrum: equal
thirds of [0, Nyquist]); beside each band the same for random mode sets of its size (the control) and the
samples' own shares. The paper's reading (fast-decaying modes -> global structure, slow ones -> texture)
predicts the bands' low-frequency shares to differ from the control's in opposite directions.

    python benchmarks/band_frequencies.py --model s3://hkd/<prefix>/distill-<hash>/model.pt [--n 64] [--bands 3]
        [--controls 8] [--json out.json]

MODEL: s3://bucket/key (endpoint and credentials from the environment), or a local model.pt record.
"""

from __future__ import annotations

import argparse
import io
import json

import torch

from hkd_core.models import HKD, model_from_record
from hkd_core.spectra import RINGS, band_frequency_shares


def load(uri: str):
    if uri.startswith("s3://"):
        import boto3

        bucket, _, key = uri[5:].partition("/")
        data = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        data = open(uri, "rb").read()
    return model_from_record(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--bands", type=int, default=3)
    p.add_argument("--controls", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--order",
        default="alpha",
        choices=["alpha", "speed"],
        help="bands sort modes by alpha (band 0 decays fastest) or by speed |alpha| (band 0 changes most)",
    )
    p.add_argument("--json")
    a = p.parse_args()
    model = load(a.model)
    if not isinstance(model, HKD):
        raise SystemExit(f"{a.model} is a {type(model).__name__}; band masking needs an HKD model")
    g = torch.Generator().manual_seed(a.seed)
    s = band_frequency_shares(model, model.noise(a.n, g), a.bands, a.controls, g, order=a.order)
    names = {3: ["low", "mid", "high"], 2: ["low", "high"]}.get(a.bands, [str(k) for k in range(a.bands)])
    sort = (
        "sorted by alpha: band 0 has the most negative alpha, the fastest decay or slowest growth"
        if a.order == "alpha"
        else "sorted by speed |alpha|: band 0 changes most, by decay or growth"
    )
    print(
        f"{a.n} samples, {a.bands} bands ({sort}), control: mean of {a.controls} random mode sets of the band's "
        f"size; [bootstrap 95 % interval over the samples]"
    )

    def cells(v, ci):
        return " | ".join(f"{x:.3f} [{lo:.3f}, {hi:.3f}]" for x, (lo, hi) in zip(v.tolist(), ci.tolist()))

    print("| removed | " + " | ".join(f"{r} freq." for r in RINGS) + " |\n|---|" + "---:|" * len(RINGS))
    print("| (the samples themselves) | " + cells(s["image"], s["image_ci"]) + " |")
    for k in range(a.bands):
        print(f"| band {k} ({names[k]}) | " + cells(s["band"][k], s["band_ci"][k]) + " |")
        print(f"| random set, band {k}'s size | " + cells(s["random"][k], s["random_ci"][k]) + " |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "model": a.model,
                    "n": a.n,
                    "bands": a.bands,
                    "controls": a.controls,
                    "order": a.order,
                    **{k: v.tolist() for k, v in s.items()},
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()

"""Are the Koopman spectra a property of the data, or of the run? Two measurements on saved models
(``benchmarks/recipe_screen.py --save DIR`` or ``hkd_core.models.model_record`` files):

1. **Reproducibility**: for every pair of models, per level, the W1 distance between their decay-rate (alpha)
   and frequency (beta) distributions relative to the pooled std (``hkd_core.spectra.spectrum_distance``):
   near 0 is the same spectrum, near 1 as far apart as the modes are spread. Pairs that differ only in
   ``train.seed`` say whether a spectrum is reproducible; pairs across settings what a setting changes.
2. **Does the evolution hold in latent space?** For trajectories of the teacher (the last ``--count``): x_T's
latents evolved to
   a later state's tau against that state's own encoding, |evolve(E(x_T), tau_s - tau_T) - E(x_s)|^2 /
   |E(x_s)|^2 (``hkd_core.losses.latent_consistency``), at several sigma_s. 1 means the evolved latent is no
   closer to E(x_s) than 0 is; 0 means the encoder maps the trajectory onto an orbit of the linear evolution.

    python benchmarks/spectrum_seeds.py --models DIR/seed0.pt DIR/seed1.pt ... --trajectories TRAJ \\
        [--count 256] [--json out.json]

TRAJ: as in recipe_screen.py (a ``.pt`` file with ``states`` and ``sigmas``, a local store, or an s3:// path).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from recipe_screen import load_trajectories

from hkd_core.koopman import tau_of_sigma
from hkd_core.losses import latent_consistency
from hkd_core.models import model_from_record
from hkd_core.spectra import spectrum_distance


def residuals(model, states: torch.Tensor, sigmas: torch.Tensor, picks: list[int]) -> dict[str, float]:
    """Mean latent-consistency residual from x_T to the state at each index in ``picks``."""
    out = {}
    x_T = states[:, 0].float()
    for j in picks:
        x_s = states[:, j].float()
        s_T = sigmas[0].expand(len(x_T)).float()
        s_s = sigmas[j].expand(len(x_T)).float()
        t_s = tau_of_sigma(s_s)
        _, z_from = model(x_T, s_T, latent_tau=t_s)
        _, z_to = model(x_s, s_s, latent_tau=t_s)
        out[f"{sigmas[j].item():.3g}"] = latent_consistency(z_from, z_to).mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--trajectories", required=True)
    p.add_argument("--count", type=int, default=256, help="trajectories for the latent residual")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    states, sigmas = load_trajectories(a.trajectories)
    states = states[-a.count :]
    inner = [j for j in range(1, len(sigmas) - 1) if sigmas[j] >= 0.05]
    picks = sorted({inner[0], inner[len(inner) // 3], inner[2 * len(inner) // 3], inner[-1]})
    models, spectra, report = {}, {}, {"models": {}, "pairs": {}}
    for path in a.models:
        name = Path(path).stem
        m = model_from_record(torch.load(path, weights_only=False)).eval()
        models[name] = m
        spectra[name] = [e.detach() for e in m.spectrum()]
        with torch.no_grad():
            res = residuals(m, states, sigmas, picks) if hasattr(m, "spectrum") else {}
        alpha = [
            (e.real.mean().item(), e.real.std().item(), e.real.abs().max().item()) for e in spectra[name]
        ]
        report["models"][name] = {"alpha_mean_std_absmax": alpha, "latent_residual": res}
        print(
            f"{name:>22}: alpha per level (mean, std, max |.|) "
            + "  ".join(f"({m_:+.3f}, {s:.3f}, {x:.2f})" for m_, s, x in alpha)
            + "  | latent residual at sigma "
            + "  ".join(f"{k}: {v:.3f}" for k, v in res.items()),
            flush=True,
        )
    for x, y in itertools.combinations(spectra, 2):
        d = spectrum_distance(spectra[x], spectra[y])
        report["pairs"][f"{x}|{y}"] = d
        print(
            f"{x:>22} vs {y:<22} alpha W1/std per level "
            + " ".join(f"{r['alpha_w1_over_std']:.3f}" for r in d)
            + "   beta "
            + " ".join(f"{r['beta_w1_over_std']:.3f}" for r in d),
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

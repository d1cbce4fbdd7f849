"""``hkd compare RUN_OR_SWEEP...``: the Koopman spectra of several runs in one figure, with the distances between
their decay-rate distributions, logged to MLflow beside the per-run scalars that are already there; and, for the
runs that scored FID at every checkpoint (``eval.curve_n``), their FID curves against kimg and training seconds
in one more figure (``compare_curves.png``, the study's plot), every point with its KID in ``compare.md`` and
``compare.json``.

Each argument names one or more models:

* an MLflow run id: a distill run (tag ``hkd.model_uri``), a sweep trial, or a pipeline run (its distill
  child is used);
* a sweep id (tag ``hkd.sweep_id``): every finished trial of that sweep;
* a study id (tag ``hkd.study``): every distilled variant of that study;
* a model itself: ``s3://bucket/key``, ``models:/name/version`` or a local ``model.pt``.

Spectra are compared in the canonical gauge (``--gauge canonical``, the default; ``--gauge trained`` for the
eigenvalues as the parameters hold them): the latent loss leaves every mode's alpha free up to a shift that the
encoder absorbs (docs/results/issue24), so two runs' raw spectra can differ for no reason in the data; the
canonical gauge is the same model with that shift fixed, measured on 512 test images.

The first model is the reference row: every other is compared with it per level, mode for mode, after the
modes within each position are matched (a Hungarian match on (centred alpha, |beta|): ``hkd_core.gauge``): the
correlation of alpha over every (mode, position) and the mean difference, which an offset that survived
training shows (``compare_alpha.png`` plots one against the other). The Wasserstein-1 distance between the
alpha (and beta) distributions, relative to their pooled std (``hkd_core.spectra.spectrum_distance``), is the
second number: it compares marginals only, so it cannot tell which mode at which position holds which rate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Source:
    label: str
    model_uri: str
    run_id: str | None = None


def _search(client, flt: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return (
        client.search_runs(exps, flt, max_results=500, order_by=["attributes.start_time ASC"]) if exps else []
    )


def resolve(client, token: str) -> list[Source]:
    """The models ``token`` names (see the module docstring); a ValueError that says what was tried otherwise."""
    if token.startswith(("s3://", "models:/", "runs:/")) or token.endswith(".pt"):
        parts = token.rstrip("/").split("/")
        label = parts[-2] if parts[-1] == "model.pt" and len(parts) > 1 else parts[-1].removesuffix(".pt")
        return [Source(label, token)]
    if RUN_ID.match(token):
        try:
            run = client.get_run(token)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own types for a missing run
            raise ValueError(f"{token}: no MLflow run with this id ({str(e)[:120]})") from None
        uri = run.data.tags.get("hkd.model_uri")
        if uri:
            return [Source(run.info.run_name or token, uri, token)]
        kids = [
            r
            for r in _search(client, f"tags.`mlflow.parentRunId` = '{token}'")
            if r.data.tags.get("hkd.model_uri")
        ]
        if kids:  # the distill child (its FID curve lives there), else the last child with the model's tag
            kid = ([k for k in kids if k.data.tags.get("hkd.stage") == "distill"] or kids)[-1]
            return [Source(run.info.run_name or token, kid.data.tags["hkd.model_uri"], kid.info.run_id)]
        raise ValueError(
            f"run {token} ({run.info.run_name}) has no model: neither its tag hkd.model_uri nor a child "
            f"run's; give a distill run, a sweep trial or a pipeline run"
        )
    for tag, what in (("hkd.sweep_id", "sweep"), ("hkd.study", "study")):
        runs = [r for r in _search(client, f"tags.`{tag}` = '{token}'") if r.data.tags.get("hkd.model_uri")]
        if runs:
            return [
                Source(r.info.run_name or r.info.run_id, r.data.tags["hkd.model_uri"], r.info.run_id)
                for r in runs
            ]
    raise ValueError(
        f"{token!r}: not an MLflow run id, nor a sweep (tag hkd.sweep_id) or study (tag hkd.study) with "
        f"distilled models, nor a model URI (s3://..., models:/name/version, a local model.pt)"
    )


def compare_table(labels: list[str], spectra: list[list]) -> dict:
    """Per model and level alpha's mean/std/min/max and the share of growing modes; per model after the first
    and per level its distance to the first (spectrum_distance)."""
    from hkd_core.gauge import spectrum_agreement
    from hkd_core.spectra import spectrum_distance, summarize

    rows = []
    for i, (name, spec) in enumerate(zip(labels, spectra)):
        s = summarize(spec, prefix="")
        levels = len(spec)
        # mode-by-mode agreement needs modes at positions (HKD's (d/2, h, w)); a dense generator's eigenvalues
        # (KDM's one vector) have no positions to pair them by, and get the distance of the marginals only
        same = (
            i
            and len(spec) == len(spectra[0])
            and all(a.shape == b.shape and a.ndim == 3 for a, b in zip(spectra[0], spec))
        )
        dist = spectrum_distance(spectra[0], spec) if i and len(spec) == len(spectra[0]) else None
        agree = spectrum_agreement(spectra[0], spec) if same else None
        for l in range(levels):
            row = {
                "model": name,
                "level": l + 1,
                **{
                    k: s[f"/l{l + 1}/{k}"]
                    for k in (
                        "alpha_mean",
                        "alpha_std",
                        "alpha_min",
                        "alpha_max",
                        "abs_beta_mean",
                        "frac_growing",
                    )
                },
            }
            if agree is not None:
                row.update({k: agree[l][k] for k in ("alpha_corr", "alpha_mean_diff", "abs_beta_corr")})
            if dist is not None:
                row.update({k: dist[l][k] for k in ("alpha_w1", "alpha_w1_over_std", "beta_w1_over_std")})
            rows.append(row)
    return {"models": labels, "rows": rows}


def to_markdown(table: dict) -> str:
    head = (
        "| model | level | alpha mean | alpha std | alpha min | alpha max | growing | alpha corr vs first "
        "(matched) | alpha mean diff | abs(beta) corr | W1(alpha) vs first | W1 / std (alpha) | W1 / std (beta) |"
        "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    out = []
    for r in table["rows"]:
        d = [
            f"{r[k]:.3f}" if k in r else "-"
            for k in (
                "alpha_corr",
                "alpha_mean_diff",
                "abs_beta_corr",
                "alpha_w1",
                "alpha_w1_over_std",
                "beta_w1_over_std",
            )
        ]
        out.append(
            f"| {r['model']} | {r['level']} | {r['alpha_mean']:.3f} | {r['alpha_std']:.3f} | "
            f"{r['alpha_min']:.3f} | {r['alpha_max']:.3f} | {r['frac_growing']:.3f} | "
            + " | ".join(d)
            + " |\n"
        )
    return head + "".join(out)


def run_curves(client, sources: list[Source]) -> dict:
    """label -> {label, curve_n, curve: [{kimg, fid, kid, kid_std, train_s}]} for the sources whose run scored
    FID at its checkpoints (stages.curve, the distill stage's own reading); runs without a curve are left out."""
    from functools import partial

    from orchestrator.services.tracking import metric_history
    from orchestrator.stages.steps import curve

    out = {}
    for s in sources:
        if not s.run_id:
            continue
        c = curve(partial(metric_history, client), s.run_id)
        if c:
            n = client.get_run(s.run_id).data.tags.get("hkd.curve_n", "?")
            out[s.label] = {"label": s.label, "curve_n": n, "curve": c}
    return out


def curves_markdown(curves: dict) -> str:
    """One row per run: FID (KID x1e3 +- std) at each scored kimg, and the best point."""
    lines = ["| run | N | FID (KID x1e3) at kimg | best |", "|---|---:|---|---|"]
    for label, c in curves.items():
        pts = ", ".join(
            f"{p['kimg']:.4g}: {p['fid']:.2f}"
            + (
                f" ({p['kid'] * 1e3:.1f} ± {p['kid_std'] * 1e3:.1f})"
                if p.get("kid") is not None and p.get("kid_std") is not None
                else ""
            )
            for p in c["curve"]
        )
        best = min(c["curve"], key=lambda p: p["fid"])
        lines.append(f"| {label} | {c['curve_n']} | {pts} | {best['fid']:.2f} at {best['kimg']:.4g} kimg |")
    return "\n".join(lines) + "\n"


GAUGES = ("canonical", "trained")


def run_compare(
    pc, tokens: list[str], out: str | Path | None = None, log_mlflow: bool = True, gauge: str = "canonical"
) -> dict:
    """Compare the spectra of the models that ``tokens`` name. ``gauge``: ``canonical`` (default) compares each
    model's spectrum in the canonical gauge (``evaluation.canonical_spectrum``: the same model, its eigenvalues
    moved along the gauge orbit that the latent loss leaves free, so that a difference is one of the data and
    not of the optimiser's history); ``trained`` compares the eigenvalues as the parameters hold them."""
    from hkd_core import metric_names as M
    from hkd_core.figures import plot_spectra_overlay
    from orchestrator.analysis.editing import load_model
    from orchestrator.services import tracking as T
    from orchestrator.stages.evaluation import canonical_spectrum

    if gauge not in GAUGES:
        raise ValueError(f"--gauge {gauge!r}: use one of {', '.join(GAUGES)}")
    if not tokens:
        raise ValueError("hkd compare needs at least one run, sweep, study or model to show")
    client = T._client(pc.tracking.resolved_uri())
    sources = [s for t in tokens for s in resolve(client, t)]
    labels, spectra = [], []
    for s in sources:
        model, _ = load_model(pc, s.model_uri)
        spec = model.spectrum()
        if not spec:
            log.info("compare: %s (%s) has no Koopman operator; left out", s.label, type(model).__name__)
            continue
        if gauge == "canonical":
            spec = canonical_spectrum(pc, model)
        labels.append(s.label)
        spectra.append(spec)
    if not spectra:
        raise ValueError(f"none of {tokens} is a model with a Koopman spectrum (KD has none)")
    curves = run_curves(client, sources)
    ident = hashlib.sha256(json.dumps([s.model_uri for s in sources]).encode()).hexdigest()[:10]
    folder = Path(out or Path("runs") / f"compare-{ident}")
    folder.mkdir(parents=True, exist_ok=True)
    table = {**compare_table(labels, spectra), "gauge": gauge}
    md = (
        f"Spectra {'in the canonical gauge (hkd_core.gauge.canonical_gauge)' if gauge == 'canonical' else 'as trained'}"
        ".\n\n" + to_markdown(table)
    )
    if curves:
        md += "\n" + curves_markdown(curves)
    (folder / "compare.md").write_text(md)
    (folder / "compare.json").write_text(
        json.dumps({**table, "sources": [s.__dict__ for s in sources], "curves": curves}, indent=1)
    )
    fig = plot_spectra_overlay(dict(zip(labels, spectra)), folder / "compare_spectra.png")
    figs = [fig]
    if len(spectra) > 1:
        from hkd_core.figures import plot_alpha_agreement

        figs.append(plot_alpha_agreement(dict(zip(labels, spectra)), folder / "compare_alpha.png"))
    if curves:
        from orchestrator.analysis.study_figures import curves as plot_curves

        n = sorted({c["curve_n"] for c in curves.values()})
        figs.append(
            plot_curves(
                {
                    "variants": curves,
                    "teacher": {},
                    "curve_n": "/".join(n),
                    "study": "KID and FID at every checkpoint (NFE 1)",
                },
                folder / "compare_curves.png",
            )
        )
    result = {
        "table": table,
        "markdown": md,
        "folder": str(folder),
        "figures": [str(f) for f in figs],
        "curves": curves,
    }
    if log_mlflow:
        tracker = T.Tracker(pc.tracking)
        run_id = tracker.open_run(
            f"compare-{ident}",
            f"compare-{ident}",
            None,
            {"hkd.stage": "compare", "hkd.compare": ",".join(tokens)[:4000], "hkd.gauge": gauge},
        )
        tracker.log_params(
            run_id, {"compare": {f"model{i}": f"{s.label} {s.model_uri}" for i, s in enumerate(sources)}}
        )
        metrics = {}
        for r in table["rows"]:
            i = labels.index(r["model"])
            for k in ("alpha_mean", "alpha_std", "alpha_corr", "alpha_mean_diff", "alpha_w1_over_std"):
                if k in r:
                    metrics[M.compare(i, r["level"], k)] = r[k]
        tracker.log_metrics(run_id, metrics, 0)
        for p in (*figs, folder / "compare.md", folder / "compare.json"):
            tracker.log_artifact(run_id, p, "compare")
        tracker.end(run_id)
        result.update(
            {"_run_id": run_id, "_experiment_id": tracker.experiment_id, "_tracking_uri": tracker.uri}
        )
    return result

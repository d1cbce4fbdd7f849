"""Every model variant through what the evaluate stage and `hkd compare` do with its spectrum, the KDM-style
model's dense generator (one flat vector of eigenvalues) included."""

import torch

from orchestrator.analysis.compare import compare_table


def test_dense_spectra_compare_by_their_marginals_not_mode_by_mode():
    """A dense generator's modes have no positions to pair them by, so the table gives no mode-by-mode agreement
    (which would need HKD's (d/2, h, w)), only the W1 distance of the marginals: 0 for the same eigenvalues in
    another order, and not 0 for another spectrum."""
    g = torch.Generator().manual_seed(0)
    a = torch.complex(torch.randn(16, generator=g), torch.randn(16, generator=g))
    rows = compare_table(["a", "shuffled", "other"], [[a], [a[torch.randperm(16, generator=g)]], [2 * a]])[
        "rows"
    ]
    assert all("alpha_corr" not in r for r in rows)
    by = {r["model"]: r for r in rows}
    assert by["shuffled"]["alpha_w1"] < 1e-9 and by["other"]["alpha_w1"] > 0.1
    # HKD's spectra of the same shape still agree mode by mode
    hkd = torch.complex(torch.randn(2, 3, 3, generator=g), torch.randn(2, 3, 3, generator=g))
    rows = compare_table(["a", "b"], [[hkd], [hkd]])["rows"]
    assert rows[1]["alpha_corr"] > 0.999


def test_every_variant_passes_the_evaluate_stages_model_side_steps(tiny_cfg, tmp_path):
    """What the evaluate stage does with a trained model after scoring it, for every model.variant the study
    trains: the canonical spectrum (a KDM row failed here once, after 17 minutes of scoring), its summaries, and
    the figures with the canonical spectrum beside the trained one."""
    from hkd_core.gauge import canonical_spectrum
    from hkd_core.models import VARIANTS, build_model
    from hkd_core.spectra import summarize
    from orchestrator.stages.evaluation import figures

    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for variant in VARIANTS:
        torch.manual_seed(0)
        m = build_model(variant, tiny_cfg).eval()
        canonical = canonical_spectrum(m, images, torch.Generator().manual_seed(1)) if m.spectrum() else []
        assert len(canonical) == len(m.spectrum()), variant
        assert all(c.shape == s.shape for c, s in zip(canonical, m.spectrum())), variant
        if canonical:
            assert summarize(canonical, "c")
        logged = []
        figures(m, lambda path, folder: logged.append(path.name), canonical)
        assert "samples.png" in logged and ("spectrum_gauges.png" in logged) == bool(canonical), variant

"""`hkd compare` on models with a dense generator (KDM): one flat vector of eigenvalues per model."""

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

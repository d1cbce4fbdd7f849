"""What researchers read from finished runs: the paper's ablation study (``study``), frequency-aware editing
(``editing``, and ``load_model``: the one reader of s3://, local and models:/ URIs) and the comparison of
spectra and curves across runs (``compare``)."""

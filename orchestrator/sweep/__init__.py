"""Sweeps: the YAML spec and its checks (``spec``), Ray Tune with Optuna (``run``, ``search``: the resumable
Optuna searcher and its study mirror), ASHA's rungs (``asha``) and Tune's callbacks (``callbacks``). A trial runs
the distill stage's own training on Ray Train."""

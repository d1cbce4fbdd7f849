"""The distributed HKD experiment system: Hydra configs, Ray Train/Tune workloads, MLflow tracking, S3 storage.

Builds on ``hkd_core`` (the method, plain PyTorch); ``hkd`` (``python -m orchestrator``) is its command line.
"""

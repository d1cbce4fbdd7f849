"""Hierarchical Koopman Diffusion (Bai, Ding, Zou, NeurIPS 2025) in plain PyTorch.

The method end to end on one machine: data, teachers, PF-ODE samplers, trajectory shards, the HKD model
and its baselines, losses, training loops, spectra and interventions, FID/KID. This package never imports
ray, mlflow, hydra, omegaconf or boto3; ``orchestrator/`` builds the distributed system on top of it.
"""

__version__ = "0.1.0"

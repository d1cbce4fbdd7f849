"""ASHA over kimg, and the one workaround it needs at the end of training.

Ray's ASHA stops a trial whose time attribute reaches ``max_t``, and it has a rung exactly at the budget
when budget / grace is a power of the reduction factor. A trial that trained to the end must live on to
evaluate itself and send its final report, so (1) ``max_t`` sits a hair above the budget and (2) the
report made at the end of training leaves out the time attribute, which keeps that report from stopping
the trial at the budget's rung. Half (1) is here; half (2) is the training loop's report
(``orchestrator.stages.reporting.checkpoint_report``, which the pipeline's stages and the sweep's trials share).
"""

from __future__ import annotations

from orchestrator.stages.reporting import TIME_ATTR

MAX_T_MARGIN = 1.001


def scheduler(total_kimg: float, grace_period_kimg: float, reduction_factor: float):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=total_kimg * MAX_T_MARGIN,
        grace_period=min(grace_period_kimg, total_kimg),
        reduction_factor=reduction_factor,
    )

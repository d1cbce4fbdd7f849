"""How often Tune snapshots a sweep's experiment state: in proportion to the trials (issue 28)."""

from __future__ import annotations

import os

# Tune snapshots the experiment state (every trial's status and the searcher's state) every
# TUNE_GLOBAL_CHECKPOINT_S seconds. A snapshot serialises all the trials, about 11 KB each, at about 0.7 ms per
# trial on one core here (72 ms at 64 trials, 172 ms at 256), so at a fixed period its share of the driver grows
# with the trials: 6 % of a 64-trial sweep's wall-clock at 1 s, 13 % of a 256-trial one's (docs/results/issue28).
# The period grows with the trials instead (a snapshot's cost over its period stays near 5 %), and is never under
# 1 s: a small sweep's killed driver loses at most a second of bookkeeping, a 256-trial one's about 4 s (the
# trials' own checkpoints and MLflow runs are not in it; a resumed sweep picks its trials up from those).
SNAPSHOT_S_PER_TRIAL = 0.015
_PERIOD_ENV = "TUNE_GLOBAL_CHECKPOINT_S"
_period_set: str | None = None  # the value this module put in the environment (a user's own value wins)


def snapshot_period_s(trials: int) -> float:
    """Seconds between Tune's experiment-state snapshots for a sweep of ``trials``."""
    return max(1.0, round(SNAPSHOT_S_PER_TRIAL * trials, 2))


def set_snapshot_period(trials: int) -> str:
    """Put the sweep's snapshot period in the environment Tune reads, unless the user set TUNE_GLOBAL_CHECKPOINT_S
    (then theirs stays); returns the period in force."""
    global _period_set
    now = os.environ.get(_PERIOD_ENV)
    if now is None or now == _period_set:
        _period_set = f"{snapshot_period_s(trials):g}"
        os.environ[_PERIOD_ENV] = _period_set
    return os.environ[_PERIOD_ENV]

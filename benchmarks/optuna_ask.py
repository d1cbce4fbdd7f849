"""What Optuna's TPE costs a sweep driver per trial as trials grow (issue 28): 256 ask/tell rounds of a
one-parameter study, in memory and on SQLite (RDBStorage, as a sweep's ``study_storage``), the mean time of an
ask over trials 0-15, 48-63 and 240-255, and the total.

    python benchmarks/optuna_ask.py --out docs/results/issue28/one_core/optuna_ask.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--note", default="", help="what else ran on the machine")
    a = p.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {"command": "python benchmarks/optuna_ask.py", "note": a.note, "date": time.strftime("%Y-%m-%d")}
    for storage in ("memory", "sqlite"):
        url = None if storage == "memory" else f"sqlite:///{tempfile.mkdtemp()}/optuna.db"
        study = optuna.create_study(storage=url, sampler=optuna.samplers.TPESampler(seed=0))
        asks = []
        for _ in range(a.trials):
            t = time.perf_counter()
            trial = study.ask()
            x = trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)
            asks.append(time.perf_counter() - t)
            study.tell(trial, abs(x - 1e-2))
        windows = [(0, 16), (48, 64), (a.trials - 16, a.trials)]
        out[storage] = {f"ask_ms_{lo}_{hi - 1}": 1e3 * sum(asks[lo:hi]) / (hi - lo) for lo, hi in windows}
        out[storage]["total_ask_s"] = sum(asks)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

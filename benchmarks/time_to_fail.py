"""How long a user waits for the one-sentence refusal of a misconfigured service: the whole `hkd pipeline`
command, process start to exit, for each case that the gate (preflight's cheap part) refuses, beside the
floor that every `hkd` command pays anyway (Python, torch and Hydra imported, the config composed:
`hkd pipeline --dry-run`, which stops right after that). The rows alternate, round by round, so that the
machine's drift hits them alike; the number to read is each case's median minus the floor (the gate's own
time), and the medians themselves (what the user sees).

Needs the default local stack (python infra/local/stack.py start); every case leaves it as it was:

    python benchmarks/time_to_fail.py --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cases(tmp: Path) -> dict[str, tuple[list[str], dict]]:
    bad = tmp / "credentials"
    bad.write_text("[default]\naws_access_key_id = hkd\naws_secret_access_key = not-the-secret\n")
    return {
        "floor: --dry-run (imports + compose, no service called)": (["--dry-run"], {}),
        "wrong S3 secret": ([], {"AWS_SHARED_CREDENTIALS_FILE": str(bad)}),
        "bucket name with a typo": ([f"storage.bucket=hkdd-{uuid.uuid4().hex[:6]}"], {}),
        "nothing at the S3 endpoint": ([f"storage.endpoint_url=http://127.0.0.1:{free_port()}"], {}),
        "nothing at the MLflow URL": ([f"tracking.uri=http://127.0.0.1:{free_port()}"], {}),
    }


def run(args: list[str], env: dict) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "pipeline", "experiment=smoke", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
        cwd=ROOT,
    )
    last = (r.stderr.strip().splitlines() or [""])[-1]
    return time.perf_counter() - t0, r.returncode, last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    state = Path(os.environ.get("HKD_STACK_DIR", ROOT / ".stack"))
    if not (state / "stack.json").is_file():
        sys.exit(f"no local stack at {state}: start it first (python infra/local/stack.py start)")
    env_base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    os.environ.clear()
    os.environ.update(env_base)  # the CLI adopts the local stack itself, as a user's shell would
    with tempfile.TemporaryDirectory() as d:
        table = cases(Path(d))
        times: dict[str, list[float]] = {k: [] for k in table}
        last: dict[str, tuple[int, str]] = {}
        for i in range(args.rounds):
            for name, (extra, env) in table.items():
                s, rc, line = run(extra, env)
                times[name].append(s)
                last[name] = (rc, line)
                print(f"round {i} {name}: {s:.2f} s, exit {rc}", flush=True)
    floor = statistics.median(next(iter(times.values())))
    print(
        f"\n`hkd pipeline experiment=smoke` with one thing wrong, {args.rounds} rounds alternating; median seconds "
        f"from process start to exit\n"
    )
    print("| case | exit code | median s | min-max s | minus the floor s | last line |")
    print("|---|---:|---:|---:|---:|---|")
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rc, line = last[name]
        rows.append(
            {
                "case": name,
                "exit": rc,
                "median_s": med,
                "min_s": min(ts),
                "max_s": max(ts),
                "over_floor_s": med - floor,
                "last_line": line,
            }
        )
        shown = line if rc else "(dry run: the plan)"
        print(
            f"| {name} | {rc} | {med:.2f} | {min(ts):.2f}-{max(ts):.2f} | {med - floor:+.2f} | "
            f"{shown[:110]}{'...' if len(shown) > 110 else ''} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "rounds": args.rounds,
                    "machine": f"{os.cpu_count()} CPU cores, the local stack on 127.0.0.1",
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

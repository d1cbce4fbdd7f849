"""What pickling does to an S3 filesystem's retries, in seconds: Ray pickles its storage filesystem to the
controller and every worker. A write to a closed port fails after the filesystem's retry back-offs
(25 ms * 2^k for AWS's default strategy), so the time to fail says how many attempts survived the pickle.

    python benchmarks/s3_retry_pickling.py [--attempts 8] [--repeat 3]

Rows side by side in one run: the project's RetryingS3FileSystem and pyarrow's own S3FileSystem, both built
with the same retry strategy and then pickled and unpickled (pyarrow's __reduce__ leaves the strategy out:
seen with pyarrow 2x; if a later pyarrow keeps it, the two rows agree and this benchmark says so).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time


def fail_time(fs) -> float:
    t0 = time.monotonic()
    try:
        with fs.open_output_stream("b/p/x.json") as out:
            out.write(b"x")
    except OSError:
        return time.monotonic() - t0
    raise SystemExit("wrote to a closed port?")


def main() -> None:
    import pyarrow
    import pyarrow.fs

    from orchestrator.services.rayfs import retrying_s3_filesystem

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attempts", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "a")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "b")
    kw = {"endpoint_override": "127.0.0.1:1", "scheme": "http", "region": "us-east-1"}
    ours = pickle.loads(pickle.dumps(retrying_s3_filesystem(a.attempts, kw)))
    plain = pickle.loads(
        pickle.dumps(
            pyarrow.fs.S3FileSystem(
                retry_strategy=pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=a.attempts), **kw
            )
        )
    )
    rows = {"RetryingS3FileSystem, pickled": [], "pyarrow S3FileSystem, pickled": []}
    for _ in range(a.repeat):  # interleaved, so that load changes hit both rows alike
        rows["RetryingS3FileSystem, pickled"].append(fail_time(ours))
        rows["pyarrow S3FileSystem, pickled"].append(fail_time(plain))
    print(
        f"pyarrow {pyarrow.__version__}, {a.attempts} attempts configured; seconds to fail a write to a closed port"
    )
    for name, ts in rows.items():
        print(f"  {name:32s} median {statistics.median(ts):5.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
    o, q = (statistics.median(v) for v in rows.values())
    print(f"  ratio ours / pyarrow's: {o / q:.1f}x")


if __name__ == "__main__":
    main()

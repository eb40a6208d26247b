#!/usr/bin/env bash
# Create .venv (if missing) and install megatron-multilora with its dependencies.
#   bash tools/setup.sh          runtime dependencies
#   bash tools/setup.sh --test   plus the test-only ones (pytest, transformers, peft)
# torch: the CPU wheel (torch==2.13.0) when no NVIDIA GPU is present -- a plain `torch` requirement would pull a
# multi-GB CUDA build; with a GPU, the default CUDA build plus the optional transformer-engine extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" torch
  GPU=1
else
  "${PIP[@]}" "torch==2.13.0"
  GPU=0
fi
if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" -r requirements-test.txt
else
  "${PIP[@]}" -r requirements.txt
fi
if [ "$GPU" = 1 ] && [ "${MULTILORA_TRANSFORMER_ENGINE:-0}" = 1 ]; then
  "${PIP[@]}" "transformer-engine[pytorch]" || echo "transformer-engine not installed; the local spec is used"
fi
"${PIP[@]}" --no-deps -e .

#!/usr/bin/env bash
# Set up .venv with the test dependencies and run the whole test suite (CPU, gloo, at most 4 processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --test
exec .venv/bin/python -m pytest -q tests "$@"

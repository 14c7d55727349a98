#!/usr/bin/env bash
# Set up, then run every test: unit, property and end-to-end (real QEMU, real guest).
set -euo pipefail
cd "$(dirname "$0")/.."
# the build cache in the clone (tests/conftest.py sets the same), not in a home folder
export MEMTRACE_CACHE="$PWD/build"
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"

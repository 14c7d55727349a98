#!/usr/bin/env bash
# Set up, then run every test: unit, property and end-to-end (real QEMU, real guest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

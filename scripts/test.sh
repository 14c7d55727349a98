#!/usr/bin/env bash
# Set up, then run every test: unit, property and end-to-end (real QEMU, real guest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# also build the plugin against Debian 13's QEMU 10 header (plugin API 4): a build check only
export MEMTRACE_TEST_QEMU10=${MEMTRACE_TEST_QEMU10:-1}
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

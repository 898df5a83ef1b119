#!/usr/bin/env bash
# One command on a fresh machine: set up a venv (CPU torch), then serve the demo model.
# No GPU and no Redis needed: with REDIS_URL unset, API and worker share one process.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/stride ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0          # CPU build; pinned so pip never pulls CUDA
  .venv/bin/pip install -q -e ".[serve,offline]"
fi
exec .venv/bin/stride serve --artifacts artifacts/digits "$@"

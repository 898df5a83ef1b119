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
cat >&2 <<MSG
stride is installed in $(pwd)/.venv; this shell's PATH is unchanged. To run \`stride\` in another
shell, activate the venv first:
    source .venv/bin/activate       # then: stride serve --help, stride offline --help
or call it by its path: .venv/bin/stride
Serving artifacts/digits (the playground at /, the API docs at /docs; Ctrl-C stops it) ...
MSG
exec .venv/bin/stride serve --artifacts artifacts/digits "$@"

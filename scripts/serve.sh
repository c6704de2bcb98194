#!/usr/bin/env bash
# Set everything up, then start a one-node Aquila on 127.0.0.1:8470 with its data in ./data.
# Extra arguments go to `aquila serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/aquila serve "$@"

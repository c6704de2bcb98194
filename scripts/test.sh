#!/usr/bin/env bash
# Set everything up, then run the whole test suite: lint, types, unit and process tests, and
# the multi-node end-to-end tests inside a private network namespace (needs root for
# `unshare -n` and nftables; without root they are skipped with a message).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null; then
  echo "test: installing nftables (partition tests)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null) \
    || echo "test: could not install nftables; partition tests will skip" >&2
fi
.venv/bin/ruff check node cluster tests scripts
.venv/bin/mypy
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  # Everything runs in a network namespace with only loopback: nothing can leave it.
  AQUILA_NETNS=1 exec unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' sh "$@"
else
  echo "test: not root or no unshare; multi-node tests will skip" >&2
  exec .venv/bin/python -m pytest "$@"
fi

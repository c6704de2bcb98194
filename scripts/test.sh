#!/usr/bin/env bash
# Set everything up, then run the whole test suite: lint, types, unit and process tests, and
# the multi-node end-to-end tests inside a private network namespace (needs root for
# `unshare -n`, `ip` and nftables; without them those tests are skipped with a message).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
  missing=""
  command -v nft >/dev/null || missing="$missing nftables"
  command -v ip >/dev/null || missing="$missing iproute2"
  # The dashboard's test drives headless Chromium (tests/e2e/test_dashboard.py).
  command -v chromium >/dev/null || missing="$missing chromium"
  if [ -n "$missing" ]; then
    echo "test: installing$missing (partition, multi-node and dashboard tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "test: could not install$missing; the tests that need them will skip" >&2
  fi
fi
.venv/bin/ruff check node cluster tests scripts client
# mypy runs beside the tests (the suite leaves a core idle while it waits on its nodes); its
# verdict is printed and counted once they end. The tests run in the foreground, so that an
# interrupt reaches them (their nodes are stopped by their teardown); a TERM to this script
# waits for them to end, as an exec'd pytest's would not. mypy is stopped on any exit.
types_log=$(mktemp)
types_pid=""
trap '[ -z "$types_pid" ] || kill "$types_pid" 2>/dev/null; rm -f "$types_log"' EXIT
(.venv/bin/mypy && .venv/bin/mypy client/aquila_client client/tests scripts/semantic_search.py) \
  >"$types_log" 2>&1 &
types_pid=$!
status=0
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && unshare -n true 2>/dev/null; then
  # Everything runs in a network namespace with only loopback: nothing can leave it.
  AQUILA_NETNS=1 unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' \
    sh "$@" || status=$?
else
  echo "test: not root, or no unshare/ip: multi-node tests will skip" >&2
  .venv/bin/python -m pytest "$@" || status=$?
fi
types=0
wait "$types_pid" || types=$?
types_pid=""
echo "test: mypy:"
cat "$types_log"
if [ "$types" != 0 ]; then
  echo "test: mypy failed (exit $types)" >&2
  [ "$status" != 0 ] || status=$types
fi
exit "$status"

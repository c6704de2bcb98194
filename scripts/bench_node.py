"""One `aquila serve` subprocess and the HTTP around it: start, readiness, stop, restart
timings, its CPU and memory from /proc, and the JSON request helper every mode uses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from bench_common import (
    COLLECTION,
    JSON_HEADERS,
    OPT_NP,
    POLL_S,
    READY_TIMEOUT_S,
    REPO_ROOT,
    STOP_TIMEOUT_S,
    K,
)
from bench_data import Dataset

HOST = "127.0.0.1"


def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP (HTTP) and UDP (gossip)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((HOST, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free TCP+UDP port on 127.0.0.1")


def aquila_command() -> list[str]:
    exe = Path(sys.executable).with_name("aquila")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("aquila")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from aquila.node.cli import main; sys.exit(main())"]


# ---------------------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------------------
def _stat_cpu_s(stat: Path) -> float:
    """utime + stime of a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat file, in seconds."""
    raw = stat.read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_of(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        return _stat_cpu_s(Path(f"/proc/{pid}/stat"))
    except OSError:
        return float("nan")


def thread_cpu_of(pid: int) -> dict[int, float]:
    """CPU seconds of every thread (native tid) of a process, from /proc."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[int(task.name)] = _stat_cpu_s(task / "stat")
    return out


def rss_mib_of(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def code_pythonpath(code: Path) -> str:
    """The PYTHONPATH that runs the node of the code in `code` (DIR/node and DIR/cluster, as
    `git archive <commit> node cluster | tar -x -C DIR` leaves them) as the `aquila` package."""
    pkg = code / "_pkg"
    if not pkg.exists():
        (pkg / "aquila").mkdir(parents=True)
        (pkg / "aquila" / "__init__.py").write_text("")
        for part in ("node", "cluster"):
            (pkg / "aquila" / part).symlink_to(code / part)
    return str(pkg)


# ---------------------------------------------------------------------------------------
# The node subprocess
# ---------------------------------------------------------------------------------------
class Node:
    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        env_overrides: dict[str, str],
        host: str = HOST,
        port: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.host = host
        self.port = port if port is not None else free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AQUILA_")}
        self.env.update(env_overrides)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        cmd = [
            *aquila_command(),
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--data",
            str(self.data_dir),
        ]
        with self.log_path.open("ab") as out:
            out.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=str(self.data_dir.parent),
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Graceful stop, then SIGKILL when it does not go in time. Idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def trained_nlists(self) -> dict[int, tuple[int, int]]:
        """{0: (nlist, vectors trained on)} of the node's last training, from its log. The
        node keeps one index per collection over all its local shards."""
        text = self.log_path.read_text(errors="replace")
        on = -1
        out: dict[int, tuple[int, int]] = {}
        for m in re.finditer(
            rf"{COLLECTION}: (?:training on (\d+) vectors|trained \(nlist=(\d+)\))", text
        ):
            if m.group(1) is not None:
                on = int(m.group(1))
            else:
                out[0] = (int(m.group(2)), on)
        return out


class NodeFailed(RuntimeError):
    pass


async def wait_ready(session: aiohttp.ClientSession, node: Node, limit_s: float) -> float:
    """Poll /readyz until 200; seconds waited. Fails fast if the process exits."""
    t0 = time.perf_counter()
    deadline = t0 + limit_s
    while True:
        if not node.alive():
            raise NodeFailed(
                f"aquila exited with {node.proc and node.proc.returncode}:\n{node.log_tail()}"
            )
        try:
            async with session.get(
                f"{node.base_url}/readyz", timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                await r.read()
                if r.status == 200:
                    return time.perf_counter() - t0
        except (TimeoutError, aiohttp.ClientError):
            pass
        if time.perf_counter() > deadline:
            raise NodeFailed(f"/readyz not 200 within {limit_s:.0f}s:\n{node.log_tail()}")
        await asyncio.sleep(POLL_S)


# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------
async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: bytes | None = None
) -> Any:
    async with session.request(method, url, data=body, headers=JSON_HEADERS) as r:
        raw = await r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {url} -> {r.status}: {raw[:500]!r}")
        return orjson.loads(raw)


async def one_search_ok(session: aiohttp.ClientSession, node: Node, ds: Dataset) -> None:
    body = orjson.dumps({"vector": ds.queries[0], "k": K}, option=OPT_NP)
    reply = await call(session, "POST", f"{node.base_url}/v1/collections/{COLLECTION}/search", body)
    if not reply["results"] or not reply["results"][0]:
        raise RuntimeError(f"search after restart returned nothing: {reply}")


async def restart(
    session: aiohttp.ClientSession, node: Node, ds: Dataset, sig: signal.Signals
) -> dict[str, Any]:
    rss = rss_mib_of(node.pid)
    t0 = time.perf_counter()
    node.signal(sig)
    code = await asyncio.to_thread(node.wait_exit, STOP_TIMEOUT_S)
    stop_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    node.start()
    ready_s = await wait_ready(session, node, READY_TIMEOUT_S)
    await one_search_ok(session, node, ds)
    total_s = time.perf_counter() - t1
    desc = await call(session, "GET", f"{node.base_url}/v1/collections/{COLLECTION}")
    states = Counter(s["index_state"] for s in desc["shard_states"])
    if desc["count"] != ds.n:
        raise RuntimeError(f"after {sig.name} restart: count {desc['count']} != {ds.n}")
    return {
        "signal": sig.name,
        "exit_code": code,
        "rss_mib_before": rss,
        "stop_s": stop_s,
        "start_to_ready_s": ready_s,
        "start_to_first_search_s": total_s,
        "count_after": desc["count"],
        "states_after": dict(states),
    }

"""Development and production mode, as real `aquila serve` processes: a node bound to a
non-loopback address (0.0.0.0) refuses to start without a cluster secret, in one line and
with a non-zero exit; with --insecure it starts and warns at every start; with a secret (or
an API key, which then serves as the secret) it starts quietly.

The refusal binds nothing and runs anywhere; the tests that do listen on 0.0.0.0 run only in
the private network namespace (scripts/test.sh), where nothing can reach them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.procs import NodeProc, http, wait_until

NETNS = os.environ.get("AQUILA_NETNS") == "1"
needs_netns = pytest.mark.skipif(
    not NETNS, reason="listens on 0.0.0.0: only inside the private network namespace")


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AQUILA_")}
    return subprocess.run([sys.executable, "-m", "aquila.node", "serve", *args], capture_output=True,
                          text=True, env={**base, **(env or {})}, timeout=60)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--host", "0.0.0.0"], {}),
        ([], {"AQUILA_HOST": "0.0.0.0"}),
        (["--host", "0.0.0.0", "--read-key", "r"], {}),  # a read key is no secret
        (["--host", "0.0.0.0"], {"AQUILA_INSECURE": "false"}),
    ],
)
def test_non_loopback_without_secret_refuses_to_start(
    tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    data = tmp_path / "data"
    run = serve(*args, "--port", str(free_port()), "--data", str(data), env=env)
    assert run.returncode != 0, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("aquila: refusing to listen on 0.0.0.0 without a cluster secret")
    assert "--cluster-secret" in lines[0] and "--insecure" in lines[0]
    assert "Traceback" not in run.stderr + run.stdout
    assert not data.exists()  # refused before touching anything


@pytest.fixture
def wildcard(tmp_path: Path) -> Iterator[list[NodeProc]]:
    started: list[NodeProc] = []
    yield started
    for n in started:
        n.stop()


def start_wildcard(nodes: list[NodeProc], data: Path, **settings: str) -> NodeProc:
    # Advertised (and probed) on loopback; bound to every address.
    port = free_port()
    n = NodeProc(data, host="0.0.0.0", port=port, advertise=f"127.0.0.1:{port}", **settings)
    nodes.append(n)
    n.start()
    return n


def insecure_warnings(n: NodeProc) -> list[str]:
    return [line for line in n.log_tail(400).splitlines() if "WARNING" in line and "INSECURE" in line]


@needs_netns
def test_insecure_starts_and_warns_at_every_start(
    tmp_path: Path, wildcard: list[NodeProc]
) -> None:
    n = start_wildcard(wildcard, tmp_path / "open", insecure="true")
    assert n.call("PUT", "/v1/collections/c", {"dim": 2})[0] == 201
    assert len(insecure_warnings(n)) == 1
    assert "0.0.0.0" in insecure_warnings(n)[0]
    n.stop()
    n.start()
    assert len(insecure_warnings(n)) == 2  # again on the second start
    status, body = n.call("GET", "/v1/collections/c")
    assert status == 200 and body["name"] == "c"


@needs_netns
def test_insecure_flag_starts(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "flag.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aquila.node", "serve", "--host", "0.0.0.0", "--port", str(port),
             "--advertise", f"127.0.0.1:{port}", "--data", str(tmp_path / "d"), "--insecure"],
            stdout=out, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("AQUILA_")},
        )
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200,
                   60, "the insecure node to be ready")
        assert "INSECURE" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)


@needs_netns
@pytest.mark.parametrize("settings", [{"cluster_secret": "s3cret"}, {"api_key": "k"}])
def test_secret_or_api_key_starts_without_warning(
    tmp_path: Path, wildcard: list[NodeProc], settings: dict[str, str]
) -> None:
    n = start_wildcard(wildcard, tmp_path / "prod", **settings)
    assert n.call("GET", "/healthz")[0] == 200
    assert insecure_warnings(n) == []
    # Its peer routes want a signature: an unsigned peer request is refused.
    status, body = http("POST", f"http://127.0.0.1:{n.port}/internal/v1/state", [])
    assert status == 401 and body["error"]["code"] == "unauthorized"

#!/usr/bin/env python3
"""Run a local Aquila cluster of N real `aquila serve` processes.

Node i listens on 127.0.0.(i+1), all on the same port (8470 by default): HTTP on TCP and
gossip on UDP. Node 1 is the seed of the others. Each node keeps its data under
<data-root>/node<i>. The script waits for every node's /readyz, prints the addresses and stays
in the foreground; Ctrl-C (or SIGTERM) stops all nodes cleanly.

    python scripts/local_cluster.py --n 3
    python scripts/local_cluster.py --n 5 --port 9000 --data-root /tmp/aq --cluster-secret s3cret
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


@dataclass
class Node:
    index: int
    host: str
    port: int
    data: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def node_id(self) -> str:
        return f"node{self.index}"


class Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def aquila_command() -> list[str]:
    exe = shutil.which("aquila")
    if exe is None:
        # The venv's console script sits next to its python.
        candidate = Path(sys.executable).with_name("aquila")
        if candidate.exists():
            exe = str(candidate)
    if exe is not None:
        return [exe]
    return [sys.executable, "-c", "import sys; from aquila.node.cli import main; sys.exit(main())"]


def start_node(node: Node, seed: str | None, secret: str | None, api_key: str | None) -> None:
    node.data.mkdir(parents=True, exist_ok=True)
    cmd = [
        *aquila_command(),
        "serve",
        "--host",
        node.host,
        "--port",
        str(node.port),
        "--data",
        str(node.data),
        "--node-id",
        node.node_id,
    ]
    if seed is not None:
        cmd += ["--seeds", seed]
    env = dict(os.environ)
    # Secrets go through the environment so they do not show up in `ps`.
    if secret is not None:
        env["AQUILA_CLUSTER_SECRET"] = secret
    if api_key is not None:
        env["AQUILA_API_KEY"] = api_key
    with node.log.open("ab") as log:
        node.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the nodes ourselves.
        )


# Ignore any http_proxy/HTTP_PROXY from the environment: no_proxy rarely covers 127.0.0.2+.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def wait_ready(node: Node, deadline: float) -> None:
    url = f"http://{node.addr}/readyz"
    delay = 0.05
    while True:
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(
                f"{node.node_id} ({node.addr}) exited with code {node.proc.returncode}; "
                f"see {node.log}"
            )
        if http_status(url) == 200:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{node.node_id} ({node.addr}) not ready in time; see {node.log}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def stop_nodes(nodes: list[Node]) -> None:
    running = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
    # Stop the joiners first and the seed last.
    for node in reversed(running):
        assert node.proc is not None
        node.proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for node in reversed(running):
        assert node.proc is not None
        try:
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{node.node_id} did not stop in {STOP_TIMEOUT_S:.0f}s, killing it", flush=True)
            node.proc.kill()
            node.proc.wait()
    for node in running:
        assert node.proc is not None
        print(f"stopped {node.node_id} ({node.addr}), exit code {node.proc.returncode}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=3, help="number of nodes (default 3)")
    p.add_argument("--port", type=int, default=8470, help="port of every node (default 8470)")
    p.add_argument(
        "--data-root",
        type=Path,
        default=Path("data-cluster"),
        help="directory holding node1/, node2/, ... (default ./data-cluster)",
    )
    p.add_argument(
        "--cluster-secret",
        default=os.environ.get("AQUILA_CLUSTER_SECRET"),
        help="shared gossip secret (default: $AQUILA_CLUSTER_SECRET)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("AQUILA_API_KEY"),
        help="API key for the REST API (default: $AQUILA_API_KEY)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT_S,
        help=f"seconds to wait for each node's /readyz (default {READY_TIMEOUT_S:.0f})",
    )
    args = p.parse_args(argv)
    if not 1 <= args.n <= 253:
        p.error("--n must be between 1 and 253")
    if not 1 <= args.port <= 65535:
        p.error("--port must be between 1 and 65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_root: Path = args.data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    nodes = [
        Node(
            index=i,
            host=f"127.0.0.{i + 1}",
            port=args.port,
            data=data_root / f"node{i}",
            log=data_root / f"node{i}.log",
        )
        for i in range(1, args.n + 1)
    ]

    if args.n > 1:
        hint = (
            "hint: nodes listen on 127.0.0.2, 127.0.0.3, ...; that needs Linux, where the whole "
            "of 127.0.0.0/8 routes to lo"
        )
        if not sys.platform.startswith("linux"):
            hint += (
                " (elsewhere add loopback aliases first, e.g. `sudo ifconfig lo0 alias 127.0.0.3`)"
            )
        print(hint, file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        seed = nodes[0].addr
        for node in nodes:
            start_node(
                node,
                seed=None if node is nodes[0] else seed,
                secret=args.cluster_secret,
                api_key=args.api_key,
            )
            print(
                f"started {node.node_id} on {node.addr} (pid {node.proc.pid if node.proc else '?'})"
            )
            # The seed must be up before the others try to join it.
            if node is nodes[0]:
                wait_ready(node, time.monotonic() + args.ready_timeout)
        deadline = time.monotonic() + args.ready_timeout
        for node in nodes[1:]:
            wait_ready(node, deadline)

        print(f"\nAquila cluster of {args.n} ready (data and logs under {data_root}):")
        for node in nodes:
            print(f"  {node.node_id}  http://{node.addr}")
        print(f"\n  aquila status --node {seed}")
        print("\nCtrl-C to stop.", flush=True)

        reported: set[int] = set()
        while True:
            for node in nodes:
                assert node.proc is not None
                if node.proc.poll() is not None and node.index not in reported:
                    reported.add(node.index)
                    print(
                        f"{node.node_id} ({node.addr}) exited with code {node.proc.returncode}; "
                        f"see {node.log}",
                        file=sys.stderr,
                        flush=True,
                    )
            if len(reported) == len(nodes):
                print("all nodes have exited", file=sys.stderr)
                return 1
            time.sleep(1.0)
    except Interrupted as exc:
        print(f"\n{exc}: stopping the cluster", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_nodes(nodes)


if __name__ == "__main__":
    sys.exit(main())

"""CPU of the peer channel's round trip, in process: a peer's end and a coordinator's end of one
channel over loopback, each in its own process, without the search itself.

    python scripts/bench_channel.py [--base DIR] [--queries 4000] [--concurrency 1] [--rounds 4]

The peer (a process of its own) serves the channel route as a node does (`ServerChannel`):
each frame's search decoded, and answered with 10 fixed hits with metadata (`encode_hits`).
The coordinator (another process) sends per query what a coordinator of three nodes sends: two
search frames (one per peer, here both to the same peer), then decodes both answers and merges
them with a local row of 10. Printed: the peer's CPU per frame and the coordinator's per query
(user and system time of each process), medians over the rounds.
With --base DIR (`git archive <commit> node cluster | tar -x -C DIR`), the same with that code,
in alternate rounds: compare the two in one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PORT = 18931
HERE = Path(__file__).resolve()


def code_path(code: Path) -> str:
    """A directory that makes `code`/node and `code`/cluster the `aquila` package."""
    pkg = code / "_pkg"
    if not pkg.exists():
        (pkg / "aquila").mkdir(parents=True)
        (pkg / "aquila" / "__init__.py").write_text("")
        for part in ("node", "cluster"):
            (pkg / "aquila" / part).symlink_to(code.resolve() / part)
    return str(pkg)


def rows(offset: int, shards: list[int]) -> list[list[Any]]:
    import orjson

    from aquila.cluster.model.documents import Hit
    return [[Hit(f"n{offset + i:08d}", 1.0 - i / 10 - offset / 1000,
                 orjson.dumps({"text": f"lab bench: a workbench in a laboratory {offset + i}",
                               "pos": "noun"}), b"", shards[i % len(shards)])
             for i in range(10)]]


async def serve_peer() -> None:
    from aiohttp import web

    from aquila.cluster.peers.channel import CHANNEL_PATH, ServerChannel
    from aquila.cluster.replication import frames

    answer = rows(10, [0, 3, 6])

    async def serve(op: str, name: str, body: bytes) -> bytes:
        f = frames.decode_search(body, 384, 8)
        return frames.encode_hits(answer, f.flags, 384, None)

    async def channel(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 21)
        writer = await ws.prepare(request)
        await ServerChannel(ws, None, "", serve, lambda *_: None, 256,
                            request.transport, writer).run()
        return ws

    app = web.Application()
    app.router.add_get(CHANNEL_PATH, channel)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    await asyncio.Event().wait()


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def coordinate(server: int, queries: int, concurrency: int) -> dict[str, float]:
    import numpy as np

    from aquila.cluster.peers.client import collection_path
    from aquila.cluster.peers.http import Peers
    from aquila.cluster.replication import frames
    from aquila.cluster.replication.fanout import merge_rows

    peers = Peers(None, 5.0, sender="coordinator")
    await peers.start()
    vector = np.random.default_rng(0).random((1, 384), dtype=np.float32)
    path = collection_path("wordnet", "search")
    addr = f"127.0.0.1:{PORT}"
    local = rows(0, [2, 5])
    flags = frames.WITH_METADATA

    async def one() -> None:
        frame = frames.encode_search(vector, 10, 32, [0, 3, 6], None, flags, None)
        a, b = await asyncio.gather(
            peers.request(addr, "POST", path, None, to="peer", raw=frame),
            peers.request(addr, "POST", path, None, to="peer", raw=frame))
        got = [frames.decode_hits(x, 1, 10, flags, 384, [0, 3, 6]).rows for x in (a, b)]
        merge_rows([local, *got], 1, 10, True)

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    for _ in range(300):  # the channel opened, caches warm
        await one()
    each = queries // concurrency
    done = each * concurrency
    peer0, own0, t0 = cpu_of(server), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(each) for _ in range(concurrency)))
    peer1, own1, t1 = cpu_of(server), time.process_time(), time.perf_counter()
    await peers.close()
    return {"qps": done / (t1 - t0), "peer_us_per_frame": 1e6 * (peer1 - peer0) / (2 * done),
            "coordinator_us_per_query": 1e6 * (own1 - own0) / done}


def client_main(args: argparse.Namespace) -> None:
    import uvloop
    server = subprocess.Popen([sys.executable, str(HERE), "--role", "peer"])
    try:
        time.sleep(1.5)
        out = uvloop.run(coordinate(server.pid, args.queries, args.concurrency))
        print(json.dumps(out), flush=True)
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["main", "client", "peer"], default="main")
    p.add_argument("--base", type=Path, help="other code to compare with, in alternate rounds")
    p.add_argument("--queries", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    if args.role == "peer":
        import uvloop
        uvloop.run(serve_peer())
        return
    if args.role == "client":
        client_main(args)
        return
    variants: list[tuple[str, dict[str, str]]] = [("this code", dict(os.environ))]
    if args.base:
        variants.append((f"base {args.base}",
                         {**os.environ, "PYTHONPATH": code_path(args.base.resolve())}))
    got: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    for r in range(args.rounds):
        for name, env in (variants if r % 2 == 0 else variants[::-1]):
            run = subprocess.run(
                [sys.executable, str(HERE), "--role", "client", "--queries", str(args.queries),
                 "--concurrency", str(args.concurrency)],
                env=env, capture_output=True, text=True, check=True)
            got[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"{args.rounds} rounds of {args.queries} queries at {args.concurrency} in flight, "
          f"load {os.getloadavg()[0]:.1f}; medians:")
    for name, results in got.items():
        med = {k: statistics.median(x[k] for x in results) for k in results[0]}
        print(f"  {name}: peer {med['peer_us_per_frame']:.1f} us a frame, coordinator "
              f"{med['coordinator_us_per_query']:.1f} us a query (two frames), "
              f"{med['qps']:.0f} q/s")


if __name__ == "__main__":
    main()

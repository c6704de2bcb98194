"""The `aquila` command: `serve` here; admin commands come from `cluster.admin`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, NoReturn

from aquila.node.config import NodeConfig, load_config

log = logging.getLogger("aquila")


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a node (one-node cluster unless --seeds)")
    p.add_argument("--host", help="bind address (AQUILA_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP/TCP and gossip/UDP port (AQUILA_PORT, 8470)")
    p.add_argument("--data", dest="data_dir", help="data directory (AQUILA_DATA, ./data)")
    p.add_argument("--seeds", help="host:port,... of nodes to join (AQUILA_SEEDS)")
    p.add_argument("--node-id", help="stable node id (AQUILA_NODE_ID; generated once)")
    p.add_argument("--advertise", help="host:port peers use to reach this node (AQUILA_ADVERTISE)")
    p.add_argument("--api-key", help="require Bearer auth on public routes (AQUILA_API_KEY)")
    p.add_argument("--read-key", help="a Bearer key for reads only (AQUILA_READ_KEY)")
    p.add_argument("--cluster-secret", help="authenticate peer traffic (AQUILA_CLUSTER_SECRET); "
                   "required unless --host is a loopback address")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="run without a cluster secret on a non-loopback address (AQUILA_INSECURE)")
    p.add_argument("--log-format", choices=("json", "text"),
                   help="one line per event as JSON or text (AQUILA_LOG_FORMAT, text)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aquila", description="Aquila vector database")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    words = sys.argv[1:] if argv is None else argv
    if words[:1] != ["serve"]:
        # The admin and import commands' modules (and `rich`, which they print with) stay
        # out of a serving node: 2.5 MiB of its resident memory.
        from aquila.cluster.admin import add_admin_parsers
        from aquila.node.importer.command import add_import_parser

        add_admin_parsers(sub)
        add_import_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        flags = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            config = load_config(flags)
        except (ValueError, TypeError) as exc:
            print(f"aquila: {exc}", file=sys.stderr)
            return 2
        return serve(config)
    if args.command == "import":
        from aquila.node.importer.command import run_import

        return run_import(args)
    from aquila.cluster.admin import run_admin

    return run_admin(args)


def serve(config: NodeConfig) -> int:
    from aquila.node.logs import configure

    configure(config.log_level, config.log_format)
    if config.open_on_network:
        log.warning(
            "INSECURE: listening on %s without a cluster secret or API key (--insecure): anyone "
            "who can reach this address can read, change and delete all data and join the "
            "cluster", config.host or "all addresses",
        )
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        pass
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        print(f"aquila: cannot serve on {config.host}:{config.port}: {exc}", file=sys.stderr)
        # The collections were opened before the bind, and one not trained yet started its
        # training: Python's exit would wait for it.
        if _abandoned_background():
            _exit_now(1)
        return 1
    except BaseException as exc:
        # A stop that failed must not hang on a training either: say why, then go.
        if not _abandoned_background():
            raise
        log.error("stopped on an error; a training in progress is abandoned",
                  exc_info=exc if isinstance(exc, Exception) else None)
        _exit_now(1)
    if _abandoned_background():
        # Everything is durable and every store closed; only a training runs on, inside
        # FAISS's k-means, which no flag can stop (an hour at 10M vectors). Python would
        # wait for it at exit; the stop must not.
        log.info("stopped; a training in progress is abandoned and starts again at the "
                 "next start")
        _exit_now(0)
    return 0


def _exit_now(code: int) -> NoReturn:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _abandoned_background() -> bool:
    """A background thread still busy: an idle one ends at once after the pool's shutdown."""
    from aquila.node.blocking import BACKGROUND_THREADS

    threads = [t for t in threading.enumerate() if t.name.startswith(BACKGROUND_THREADS)]
    deadline = time.monotonic() + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return any(t.is_alive() for t in threads)


async def _freeze_when_ready(app: Any) -> None:
    """Once the node is ready, what its start made is moved out of the garbage collector's
    sight (`node.collector.freeze`): one collection now (tens of milliseconds, once) for
    none of that length later."""
    from aquila.node.collector import freeze
    from aquila.node.keys import READY

    await app[READY].wait()
    t0 = time.perf_counter()
    frozen = freeze()
    log.debug("%d objects of the start frozen out of the garbage collector's sight (%.1f ms)",
              frozen, (time.perf_counter() - t0) * 1e3)


async def _serve(config: NodeConfig) -> None:
    from aiohttp import web

    from aquila.node.app import make_app
    from aquila.node.http.protocol import json_errors

    app = make_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    json_errors(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        await site.start()
        freezing = loop.create_task(_freeze_when_ready(app))
        await stop.wait()
        freezing.cancel()
    finally:
        await runner.cleanup()

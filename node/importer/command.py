"""`aquila import COLLECTION PATH`: a file of vectors (and ids and metadata) into a collection,
batch by batch over the columnar upsert, several batches in flight at once.

One reader (on a thread: reading, checking and encoding a batch is CPU work) feeds a queue of
ready bodies; `--concurrency` uploaders send them. Bad rows are reported by their line and
left out; the rest goes on (`--strict` stops at the first one instead, sending nothing from
its batch on). Progress is kept in a small state file (see `state`), so the same command run
again after an interruption sends only what was not stored yet.

Exit status: 0 when every row was imported; 1 when the import stopped (an error, a bad row
under --strict, an interruption: run it again to go on); 3 when it finished but left bad rows
out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import aiohttp
import orjson

from aquila.cluster.admin import DEFAULT_NODE, describe_os_error, node_arg
from aquila.cluster.model.spec import NAME_RE
from aquila.node.importer.progress import Reporter, reporter
from aquila.node.importer.sources import BadRow, Batch, Source, SourceError, open_source
from aquila.node.importer.state import FLUSH_S, ImportState, default_path, fingerprint
from aquila.node.importer.upload import RETRIES, ImportFailed, Uploader, body_of

EXIT_OK, EXIT_FAILED, EXIT_BAD_ROWS = 0, 1, 3
# Bad rows listed at the end (all are counted).
SHOW_BAD = 20


def nodes_arg(value: str) -> list[str]:
    nodes = [node_arg(s.strip()) for s in value.split(",") if s.strip()]
    if not nodes:
        raise argparse.ArgumentTypeError("expected host:port[,host:port...]")
    return nodes


def positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


# Requests in flight at most: each holds a batch's body ready and one more waits queued, so
# memory follows it (2,000 documents of dim 384: 3 MiB a body); a node takes a few at a time.
MAX_CONCURRENCY = 64


def concurrency(value: str) -> int:
    n = positive(value)
    if n > MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"at most {MAX_CONCURRENCY} requests in flight, got {n}")
    return n


def add_import_parser(sub: Any) -> None:
    p = sub.add_parser(
        "import", help="load a .jsonl or .npy file into a collection",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="PATH is a .jsonl file (one {\"id\", \"vector\", \"metadata\"} a line) or a .npy "
               "array (rows × dim; ids are row numbers unless --ids, metadata from --metadata, "
               "one line per row). Run the same command again after an interruption: it sends "
               "only what was not stored. Exit status: 0 all imported, 1 stopped, 3 done "
               "with bad rows left out.")
    p.add_argument("collection", help="the collection to load into")
    p.add_argument("path", type=Path, help="a .jsonl or .npy file")
    p.add_argument("--node", type=nodes_arg, default=[DEFAULT_NODE],
                   help=f"host:port of a node, or several separated by commas (default "
                        f"{DEFAULT_NODE}); batches go to each in turn, and to the next on failure")
    p.add_argument("--api-key", default=None, help="API key (default: $AQUILA_API_KEY)")
    p.add_argument("--batch", type=positive, default=2000, help="documents per request (2000)")
    p.add_argument("--concurrency", type=concurrency, default=4,
                   help=f"requests in flight (4; at most {MAX_CONCURRENCY})")
    p.add_argument("--create", action="store_true",
                   help="create the collection first (with --dim, --metric)")
    p.add_argument("--dim", type=positive, help="dimension, for --create (a .npy says it)")
    p.add_argument("--metric", choices=("l2", "ip", "cosine"), help="for --create (l2)")
    p.add_argument("--shards", type=positive, help="for --create (8)")
    p.add_argument("--index", choices=("ivf_flat", "ivf_sq8", "ivf_pq", "flat"),
                   help="index type, for --create (ivf_flat)")
    p.add_argument("--ids", type=Path, help="with a .npy: a file of ids, one per line")
    p.add_argument("--metadata", type=Path,
                   help="with a .npy: a .jsonl file of metadata objects, one per line")
    p.add_argument("--consistency", choices=("one", "quorum", "all"),
                   help="acknowledgements per write (the node's default: quorum)")
    p.add_argument("--retries", type=int, default=RETRIES,
                   help=f"attempts after the first for a batch a node could not take ({RETRIES}; "
                        "pauses grow from 0.5 s to 10 s)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad row instead of leaving it out")
    p.add_argument("--state", type=Path,
                   help="progress file (default: .aquila-import-<collection>-<digest>.json "
                        "in the working directory)")
    p.add_argument("--restart", action="store_true", help="ignore the progress of earlier runs")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="a bar on a terminal, plain lines otherwise (auto)")


@dataclass
class Outcome:
    imported: int = 0  # documents stored by this run
    bad: list[BadRow] = field(default_factory=list)
    error: str | None = None


def run_import(args: argparse.Namespace, out: IO[str] = sys.stdout,
               err: IO[str] = sys.stderr) -> int:
    """Run the command; the exit status. Never raises, never prints a traceback."""
    if not NAME_RE.fullmatch(args.collection):
        return _fail(err, f"{args.collection!r} is not a collection name ([A-Za-z0-9_-]{{1,64}})")
    if args.create and args.dim is None and args.path.suffix.lower() != ".npy":
        return _fail(err, "--create needs --dim for a .jsonl file")
    api_key = args.api_key or os.environ.get("AQUILA_API_KEY") or None
    try:
        source = open_source(args.path, args.ids, args.metadata)
    except (SourceError, OSError) as exc:
        return _fail(err, str(exc))
    run = _Run()
    try:
        return asyncio.run(_main(args, api_key, source, out, err, run))
    except KeyboardInterrupt:
        if run.reported:  # the summary said so already
            return 130
        return _fail(err, "interrupted; run the same command again to go on", 130)


@dataclass
class _Run:
    reported: bool = False  # the summary is out (an interruption needs no second word)


async def _main(args: argparse.Namespace, api_key: str | None, source: Source, out: IO[str],
                err: IO[str], run: _Run) -> int:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    connector = aiohttp.TCPConnector(limit=args.concurrency + 1)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            try:
                dim = await _collection(session, args, api_key, source)
            except ImportFailed as exc:
                return _fail(err, str(exc))
            code = await _import(session, args, api_key, source, dim, out, err)
            run.reported = True
            return code
    except asyncio.CancelledError:
        return _fail(err, "interrupted before the import began", 130)


async def _collection(session: aiohttp.ClientSession, args: argparse.Namespace,
                      api_key: str | None, source: Source) -> int:
    """The collection's dimension, after creating it with --create."""
    path = f"/v1/collections/{quote(args.collection, safe='')}"
    if args.create:
        dim = args.dim or source.dim
        if dim is None:
            raise ImportFailed("--create needs --dim")
        body: dict[str, Any] = {"dim": dim}
        for key in ("metric", "shards"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if args.index is not None:
            body["index"] = {"type": args.index}
        status, answer = await _call(session, args.node, api_key, "PUT", path, body)
        if status == 409:
            raise ImportFailed(f"collection {args.collection!r} exists with other settings: "
                               f"{_message(answer)}")
    else:
        status, answer = await _call(session, args.node, api_key, "GET", path, None)
        if status == 404:
            raise ImportFailed(f"no collection {args.collection!r}; create it, or give "
                               "--create --dim D [--metric M]")
    if status not in (200, 201):
        raise ImportFailed(f"{status} {_message(answer)}")
    dim = int(answer["dim"])
    if source.dim is not None and source.dim != dim:
        raise ImportFailed(f"{source.path} holds vectors of dimension {source.dim}; collection "
                           f"{args.collection!r} has dimension {dim}")
    return dim


async def _call(session: aiohttp.ClientSession, nodes: list[str], api_key: str | None,
                method: str, path: str, body: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = ""
    for node in nodes:
        try:
            async with session.request(method, f"http://{node}{path}", headers=headers,
                                       data=None if body is None else orjson.dumps(body),
                                       timeout=aiohttp.ClientTimeout(total=30)) as resp:
                raw = await resp.read()
                if resp.status == 503:
                    last = f"{node}: {_message(_json(raw))}"
                    continue
                if resp.status in (401, 403):
                    raise ImportFailed(f"{node}: {_message(_json(raw))}")
                return resp.status, _json(raw)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
            last = f"cannot reach {node}: {describe_os_error(reason, 30)}"
    raise ImportFailed(last)


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"error": {"message": raw[:200].decode("utf-8", "replace")}}


def _message(answer: Any) -> str:
    try:
        return f"{answer['error']['code']}: {answer['error']['message']}"
    except (KeyError, TypeError):
        return str(answer)[:200]


async def _import(session: aiohttp.ClientSession, args: argparse.Namespace,
                  api_key: str | None, source: Source, dim: int, out: IO[str],
                  err: IO[str]) -> int:
    fp = fingerprint(args.collection, args.batch, source.files())
    state_path = args.state or default_path(args.collection, fp)
    state = ImportState(state_path, fp) if args.restart else ImportState.load(state_path, fp)
    try:
        state.check_writable()
    except OSError as exc:
        return _fail(err, f"cannot keep the import's progress in {state_path}: "
                     f"{exc.strerror or exc}; choose another file with --state")
    batches = math.ceil(source.rows / args.batch)
    if state.resumed:
        print(f"resuming: {state.resumed} of {batches} batches were stored by an earlier run "
              f"({state_path})", file=err)
    uploader = Uploader(session, args.node, args.collection, api_key, source.where,
                        args.consistency, retries=max(0, args.retries))
    done_rows = sum(min(args.batch, source.rows - b * args.batch) for b in state.done)
    progress = reporter(args.progress, err)
    outcome = Outcome()
    t0 = time.monotonic()
    progress.start(source.rows, done_rows)
    try:
        await _pump(source, dim, args, state, uploader, progress, outcome)
    except asyncio.CancelledError:
        outcome.error = "interrupted"
    finally:
        progress.stop()
        state.save()
    elapsed = time.monotonic() - t0
    finished = len(state.done) >= batches and outcome.error is None
    if finished:
        state.remove()
    return _summary(args, state, outcome, elapsed, finished, uploader.retries, out, err)


async def _pump(source: Source, dim: int, args: argparse.Namespace, state: ImportState,
                uploader: Uploader, progress: Reporter, outcome: Outcome) -> None:
    """The reader fills a queue of (batch, body); the uploaders drain it."""
    ready: asyncio.Queue[tuple[Batch, bytes] | None] = asyncio.Queue(2 * args.concurrency)
    batches = source.batches(args.batch, dim, lambda i: i in state.done)
    stop = asyncio.Event()

    async def read() -> None:
        while not stop.is_set():
            item = await asyncio.to_thread(_next_body, batches, uploader.consistency)
            if item is None:
                break
            batch = item[0]
            if args.strict and batch.bad:
                first = batch.bad[0]
                outcome.error = f"{first.where}: {first.reason} (--strict)"
                outcome.bad.append(first)
                break
            await ready.put(item)
        # The uploaders finish what is queued, then stop. (Not when this task is cancelled:
        # the uploaders are then cancelled too, and a full queue would never take these.)
        for _ in range(args.concurrency):
            await ready.put(None)

    async def send() -> None:
        while (item := await ready.get()) is not None:
            if stop.is_set():
                continue
            batch, body = item
            refused = await uploader.send(batch, body)
            if refused and args.strict:
                outcome.error = f"{refused[0].where}: {refused[0].reason} (--strict)"
                outcome.bad.append(refused[0])
                stop.set()
                continue
            bad = batch.bad + refused
            outcome.bad.extend(bad)
            outcome.imported += len(batch.ids) - len(refused)
            state.finished(batch.index, bad)
            progress.advance(batch.size)

    async def flush() -> None:
        # Batches stored just before a stall (a node holding the rest) are written down too.
        while True:
            await asyncio.sleep(FLUSH_S)
            state.save()

    flusher = asyncio.ensure_future(flush())
    tasks = [asyncio.ensure_future(read())] + [asyncio.ensure_future(send())
                                               for _ in range(args.concurrency)]
    try:
        await asyncio.gather(*tasks)
    except ImportFailed as exc:
        outcome.error = str(exc)
    finally:
        stop.set()
        for t in [*tasks, flusher]:
            t.cancel()
        await asyncio.gather(*tasks, flusher, return_exceptions=True)


def _next_body(batches: Iterator[Batch], consistency: str | None) -> tuple[Batch, bytes] | None:
    batch = next(batches, None)
    if batch is None:
        return None
    return batch, body_of(batch, consistency)


def _summary(args: argparse.Namespace, state: ImportState, outcome: Outcome, elapsed: float,
             finished: bool, retries: int, out: IO[str], err: IO[str]) -> int:
    rate = outcome.imported / elapsed if elapsed > 0 else 0.0
    bad = state.bad if finished else outcome.bad
    bad_count = state.bad_count if finished else len(outcome.bad)
    for b in bad[:SHOW_BAD]:
        print(f"bad row: {b.where}: {b.reason}", file=err)
    if bad_count > SHOW_BAD:
        print(f"... and {bad_count - SHOW_BAD} more bad rows", file=err)
    line = (f"imported {outcome.imported:,} documents into {args.collection} in {elapsed:.1f} s "
            f"({rate:,.0f} docs/s)")
    if state.resumed:
        line += f"; {state.resumed} batches were stored by an earlier run"
    if bad_count:
        line += f"; {bad_count:,} bad rows left out"
    if retries:
        line += f"; {retries} requests retried"
    print(line, file=out)
    if not finished:
        return _fail(err, f"{outcome.error or 'stopped'}; progress is kept in {state.path}: "
                          "run the same command again to go on")
    return EXIT_BAD_ROWS if bad_count else EXIT_OK


def _fail(err: IO[str], message: str, code: int = EXIT_FAILED) -> int:
    print(f"aquila import: {' '.join(message.split())}", file=err)
    return code

"""Admin commands: status, join, rebalance, leave: thin, over HTTP to one node.

The shell is `run_admin` plus `HttpApi` (stdlib urllib, no proxy, a timeout on every call).
What to show is decided by small pure functions over the JSON the node answers
(`shard_counts`, `moves_in_progress`, `move_progress`), so they can be tested without a node.
Every failure leaves as one line on stderr (`aquila: ...`) and a non-zero exit code; a user
never sees a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aquila.cluster.model.config_parse import format_hostport, parse_hostport

DEFAULT_NODE = "127.0.0.1:8470"
# Per-request timeout. Join waits for the node's own join deadline (10 s) and gets more.
TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 30.0
# `rebalance --wait`: how often to look at the shard map, and how long the map may show no
# move at all while planned moves are still unapplied before we call them failed (a driver
# that runs moves one after another leaves only short gaps between them).
POLL_S = 0.5
QUIET_S = 5.0
WAIT_TIMEOUT_S = 3600.0
# Piped output has no terminal width; tables only take the width they need, so be generous
# rather than fold node ids across lines.
FALLBACK_COLUMNS = 160

STATE_STYLES = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


class AdminError(Exception):
    """A failure the user reads as one line: `aquila: <message>`."""


# -- arguments ----------------------------------------------------------------------------
def node_arg(value: str) -> str:
    """argparse type for --node: a bad value exits 2 with the usage line."""
    try:
        host, port = parse_hostport(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return format_hostport(host, port)


def seeds_arg(value: str) -> list[str]:
    seeds = [node_arg(s.strip()) for s in value.split(",") if s.strip()]
    if not seeds:
        raise argparse.ArgumentTypeError("expected host:port[,host:port...]")
    return seeds


def add_admin_parsers(sub: Any) -> None:
    p = sub.add_parser("status", help="members, their state, shards per node, collections")
    p.add_argument("--json", action="store_true", help="print the raw JSON the node answers")
    p = sub.add_parser("join", help="join a node to a cluster")
    p.add_argument("--seeds", required=True, type=seeds_arg, help="host:port[,host:port...]")
    p = sub.add_parser("rebalance", help="move replicas to balance the cluster")
    p.add_argument("--dry-run", action="store_true", help="show the moves, change nothing")
    p.add_argument("--wait", action="store_true", help="show progress until done")
    p.add_argument("--timeout", type=float, default=WAIT_TIMEOUT_S,
                   help=f"give up waiting after this many seconds (default {WAIT_TIMEOUT_S:g})")
    p = sub.add_parser("leave", help="hand a node's shards to others, then leave")
    p.add_argument("--timeout", type=float, default=WAIT_TIMEOUT_S,
                   help=f"give up waiting after this many seconds (default {WAIT_TIMEOUT_S:g})")
    for name in ("status", "join", "rebalance", "leave"):
        p = sub.choices[name]
        p.add_argument("--node", type=node_arg, default=DEFAULT_NODE,
                       help=f"host:port of any node (default {DEFAULT_NODE})")
        p.add_argument("--api-key", default=None, help="API key (default: $AQUILA_API_KEY)")


# -- HTTP -----------------------------------------------------------------------------------
class Api(Protocol):
    """What the commands need from a node; `HttpApi` is the real one, tests pass a fake."""

    def get(self, path: str) -> Any: ...

    def post(self, path: str, body: Any, timeout_s: float | None = None) -> Any: ...


@dataclass(frozen=True)
class HttpApi:
    addr: str
    api_key: str | None = None
    timeout_s: float = TIMEOUT_S

    def get(self, path: str) -> Any:
        return self._call("GET", path, None, self.timeout_s)

    def post(self, path: str, body: Any, timeout_s: float | None = None) -> Any:
        return self._call("POST", path, body, timeout_s or self.timeout_s)

    def _call(self, method: str, path: str, body: Any, timeout_s: float) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.addr}{path}", data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        # No proxy: an admin talks to cluster addresses, which a corporate proxy cannot reach.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise AdminError(http_error_line(err.code, str(err.reason), _read(err),
                                             method, path)) from None
        except urllib.error.URLError as err:
            raise AdminError(self._unreachable(err.reason, timeout_s)) from None
        except (OSError, HTTPException) as err:  # timeouts and resets while reading
            raise AdminError(self._unreachable(err, timeout_s)) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise AdminError(f"{self.addr} answered {method} {path} with something "
                             "other than JSON; is it an Aquila node?") from None

    def _unreachable(self, reason: object, timeout_s: float) -> str:
        return f"cannot reach {self.addr}: {describe_os_error(reason, timeout_s)}"


def _read(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read()
    except (OSError, HTTPException):
        return b""


def describe_os_error(reason: object, timeout_s: float) -> str:
    """A short lower-case reason for a failed connection."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror or reason})"
    if isinstance(reason, ConnectionResetError | HTTPException):
        return "connection closed by the node"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


def http_error_line(status: int, reason: str, raw: bytes, method: str, path: str) -> str:
    """`<code>: <message>` from the node's error body, or the status when it has none."""
    try:
        err = json.loads(raw)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status} {reason} from {method} {path}"
    if status in (404, 405) and message == reason:
        # The route itself is missing: say which, so an old node is easy to recognise.
        return f"{code}: {message} ({method} {path}; does this node support it?)"
    return f"{code}: {message}"


# -- pure views over the node's answers --------------------------------------------------------
def shard_counts(shards: dict[str, Any], collection: str | None = None) -> Counter[str]:
    """How many shard replicas each node holds, over one collection or all of them."""
    counts: Counter[str] = Counter()
    for name, entries in (shards.get("collections") or {}).items():
        if collection is None or name == collection:
            for e in entries:
                counts.update(e.get("replicas") or [])
    return counts


def moves_in_progress(shards: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, entries in sorted((shards.get("collections") or {}).items()):
        for e in entries:
            if m := e.get("moving"):
                out.append({"collection": name, "shard": e.get("shard"), "from": m.get("from"),
                            "to": m.get("to"), "progress": float(m.get("progress") or 0.0)})
    return out


@dataclass(frozen=True)
class MoveProgress:
    done: float  # in units of moves: a move half copied counts 0.5
    applied: int  # moves whose target holds the shard and whose source no longer does
    moving: int  # shards the map shows as moving right now (planned or not)


def move_progress(moves: list[dict[str, Any]], shards: dict[str, Any]) -> MoveProgress:
    by_shard = {
        (name, e.get("shard")): e
        for name, entries in (shards.get("collections") or {}).items()
        for e in entries
    }
    done, applied = 0.0, 0
    for mv in moves:
        e = by_shard.get((mv["collection"], mv["shard"]))
        if e is None:  # the collection was dropped: nothing left to wait for
            done, applied = done + 1, applied + 1
            continue
        replicas, moving = e.get("replicas") or [], e.get("moving")
        if moving and moving.get("from") == mv["from"] and moving.get("to") == mv["to"]:
            done += min(max(float(moving.get("progress") or 0.0), 0.0), 1.0)
        elif mv["to"] in replicas and mv["from"] not in replicas:
            done, applied = done + 1, applied + 1
    return MoveProgress(done, applied, len(moves_in_progress(shards)))


# -- output ---------------------------------------------------------------------------------
def make_console(file: Any = None) -> Console:
    out = file or sys.stdout
    columns = shutil.get_terminal_size((FALLBACK_COLUMNS, 24)).columns
    tty = bool(getattr(out, "isatty", lambda: False)())
    return Console(file=out, width=columns, no_color=not tty, highlight=False)


def members_table(cluster: dict[str, Any], shards: dict[str, Any]) -> Table:
    me = (cluster.get("node") or {}).get("id")
    held = shard_counts(shards)
    t = Table(title=f"Members (epoch {cluster.get('epoch')})", title_justify="left")
    t.add_column("id", no_wrap=True)
    t.add_column("addr", no_wrap=True)
    t.add_column("state")
    t.add_column("incarnation", justify="right")
    t.add_column("shards", justify="right")
    for m in cluster.get("members") or []:
        state = str(m.get("state"))
        t.add_row(
            f"{m.get('id')} (this node)" if m.get("id") == me else str(m.get("id")),
            str(m.get("addr")),
            f"[{STATE_STYLES.get(state, '')}]{state}[/]" if state in STATE_STYLES else state,
            str(m.get("incarnation")),
            str(held.get(m.get("id"), 0)),
        )
    return t


def collections_table(collections: list[dict[str, Any]], shards: dict[str, Any]) -> Table:
    t = Table(title="Collections", title_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("dim", justify="right")
    t.add_column("metric")
    t.add_column("shards", justify="right")
    t.add_column("replication", justify="right")
    t.add_column("count", justify="right")
    t.add_column("shards per node", no_wrap=True)
    for c in sorted(collections, key=lambda c: str(c.get("name"))):
        per_node = shard_counts(shards, c.get("name"))
        t.add_row(
            str(c.get("name")), str(c.get("dim")), str(c.get("metric")), str(c.get("shards")),
            str(c.get("replication")), str(c.get("count")),
            "\n".join(f"{node} {n}" for node, n in sorted(per_node.items())) or "-",
        )
    return t


def moves_table(moves: list[dict[str, Any]], title: str) -> Table:
    with_progress = any("progress" in m for m in moves)
    t = Table(title=title, title_justify="left")
    t.add_column("collection", no_wrap=True)
    t.add_column("shard", justify="right")
    t.add_column("from", no_wrap=True)
    t.add_column("to", no_wrap=True)
    if with_progress:
        t.add_column("progress", justify="right")
    for m in moves:
        row = [str(m.get("collection")), str(m.get("shard")), str(m.get("from")), str(m.get("to"))]
        if with_progress:
            row.append(f"{100 * float(m.get('progress') or 0):.0f}%")
        t.add_row(*row)
    return t


# -- commands -------------------------------------------------------------------------------
def cmd_status(api: Api, console: Console, as_json: bool) -> int:
    cluster = api.get("/v1/cluster")
    shards = api.get("/v1/cluster/shards")
    collections = (api.get("/v1/collections") or {}).get("collections") or []
    if as_json:
        doc = {"cluster": cluster, "shards": shards, "collections": collections}
        console.file.write(json.dumps(doc, indent=2) + "\n")
        return 0
    node = cluster.get("node") or {}
    console.print(f"Node {node.get('id')} at {node.get('addr')}")
    console.print(members_table(cluster, shards))
    if collections:
        console.print(collections_table(collections, shards))
    else:
        console.print("No collections.")
    if moving := moves_in_progress(shards):
        console.print(moves_table(moving, f"Moves in progress ({len(moving)})"))
    return 0


def cmd_join(api: Api, console: Console, seeds: list[str]) -> int:
    answer = api.post("/v1/cluster/join", {"seeds": seeds}, timeout_s=JOIN_TIMEOUT_S) or {}
    console.print(f"Joined: the cluster now has {answer.get('members')} members.")
    return 0


def cmd_rebalance(api: Api, console: Console, dry_run: bool, wait: bool, timeout_s: float) -> int:
    moves = (api.post("/v1/cluster/rebalance", {"dry_run": dry_run}) or {}).get("moves") or []
    if not moves:
        console.print("Already balanced: nothing to move.")
        return 0
    title = f"{'Planned' if dry_run else 'Started'} moves ({len(moves)})"
    console.print(moves_table(moves, title))
    if dry_run:
        console.print("Dry run: nothing was moved.")
        return 0
    if not wait:
        console.print("The moves run in the background; follow them with `aquila status`.")
        return 0
    wait_for_moves(api, console, moves, timeout_s)
    console.print(f"Done: {len(moves)} moves applied.")
    return 0


def cmd_leave(api: Api, console: Console, timeout_s: float) -> int:
    # The node answers once its shards have moved, which takes as long as copying them.
    with console.status("Handing this node's shards to the others..."):
        answer = api.post("/v1/cluster/leave", {}, timeout_s=timeout_s) or {}
    moves = answer.get("moves") or []
    if moves:
        console.print(moves_table(moves, f"Handed over ({len(moves)} moves)"))
    else:
        console.print("This node held no shards to hand over.")
    console.print("The node has left the cluster.")
    return 0


def wait_for_moves(
    api: Api,
    console: Console,
    moves: list[dict[str, Any]],
    timeout_s: float,
    *,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll the shard map until every planned move is applied and nothing is moving.

    Raises AdminError on the overall deadline, or when the map has shown no move for
    QUIET_S while some planned moves are still unapplied (they failed or were cancelled).
    """
    deadline = now() + timeout_s
    quiet_since: float | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("moving shards", total=len(moves))
        while True:
            p = move_progress(moves, api.get("/v1/cluster/shards") or {})
            bar.update(task, completed=p.done,
                       description=f"moving shards ({p.moving} in flight)")
            if p.moving == 0 and p.applied == len(moves):
                return
            t = now()
            if p.moving == 0:
                quiet_since = t if quiet_since is None else quiet_since
                if t - quiet_since >= QUIET_S:
                    raise AdminError(
                        f"{len(moves) - p.applied} of {len(moves)} moves did not complete; "
                        "see `aquila status` and the node logs")
            else:
                quiet_since = None
            if t >= deadline:
                raise AdminError(f"still moving after {timeout_s:g} s ({p.applied} of "
                                 f"{len(moves)} applied); the moves go on in the background")
            sleep(POLL_S)


def run_admin(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run one admin command; returns the exit code. Never raises, never prints a traceback."""
    # A client, not a node: the key may come from the environment like the server's own.
    api_key = args.api_key or os.environ.get("AQUILA_API_KEY") or None
    api = HttpApi(args.node, api_key)
    out = console or make_console()
    try:
        if args.command == "status":
            return cmd_status(api, out, args.json)
        if args.command == "join":
            return cmd_join(api, out, args.seeds)
        if args.command == "rebalance":
            return cmd_rebalance(api, out, args.dry_run, args.wait, args.timeout)
        if args.command == "leave":
            return cmd_leave(api, out, args.timeout)
        return _fail(f"unknown command {args.command!r}", 2)
    except AdminError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; anything already started goes on in the cluster", 130)
    except BrokenPipeError:
        # `aquila status | head`: the reader left. Point stdout at /dev/null so the flush at
        # exit does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # The node answered JSON of an unexpected shape (an older or newer version).
        return _fail(f"unexpected answer from {args.node}: {type(exc).__name__}: {exc}")


def _fail(message: str, code: int = 1) -> int:
    print(f"aquila: {' '.join(message.split())}", file=sys.stderr)
    return code

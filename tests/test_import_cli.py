"""`aquila import` as a user runs it: a real `aquila` process sending the committed sample to a
real node (in-process, real engine, real sockets), through a pseudo-terminal (a progress bar)
and through pipes (plain lines); bad rows reported by line; an import killed mid-way and run
again; files that do not line up; and the uploader's halving and retries against a scripted
server."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aquila.cluster.model.bounds import MAX_DOCUMENT_METADATA
from aquila.node.app import make_app
from aquila.node.config import load_config
from aquila.node.importer.sources import Batch
from aquila.node.importer.upload import ImportFailed, Uploader
from tests.conftest import TEST_TRAIN_MIN, Node, free_port, ok_json, wait_for
from tests.datasets import load_sample

SAMPLE_ROWS = 5000


@dataclass
class Gate:
    """Counts upserts; holds every upsert after the first `after` until opened."""

    after: int | None = None
    upserts: int = 0
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    refuse: bool = False  # answer the held ones 503 at once instead

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.method == "POST" and request.path.endswith("/documents"):
            self.upserts += 1
            if self.after is not None and self.upserts > self.after:
                if self.refuse:
                    return web.json_response(
                        {"error": {"code": "unavailable", "message": "not now"}}, status=503)
                await self.opened.wait()
        return await handler(request)


@dataclass
class Served:
    node: Node
    gate: Gate

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.node.config.port}"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    gate = Gate()
    config = load_config({"data_dir": tmp_path / "node", "port": free_port(),
                          "train_min": TEST_TRAIN_MIN, "search_threads": 2}, environ={})
    app = make_app(config)
    app.middlewares.append(gate.middleware)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1",
                                                          port=config.port))
    await client.start_server()
    node = Node(client, config)
    await node.wait_ready()
    try:
        yield Served(node, gate)
    finally:
        gate.opened.set()
        await client.close()


@dataclass
class Files:
    npy: Path
    ids: Path
    meta: Path


@pytest.fixture
def sample_files(tmp_path: Path) -> Files:
    s = load_sample()
    files = Files(tmp_path / "base.npy", tmp_path / "ids.txt", tmp_path / "meta.jsonl")
    np.save(files.npy, s.base)
    files.ids.write_text("".join(m["id"] + "\n" for m in s.base_meta))
    files.meta.write_bytes(b"".join(orjson.dumps({"text": m["text"], "pos": m["pos"]}) + b"\n"
                                    for m in s.base_meta))
    return files


@dataclass
class Run:
    code: int
    out: str
    err: str


async def aquila_import(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aquila.node", "import", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def npy_args(served: Served, files: Files, name: str = "wn") -> list[str]:
    return [name, str(files.npy), "--ids", str(files.ids), "--metadata", str(files.meta),
            "--node", served.addr, "--create", "--metric", "cosine", "--index", "flat"]


async def check_sample(node: Node, name: str = "wn") -> None:
    s = load_sample()
    assert (await node.describe(name))["count"] == SAMPLE_ROWS
    for i in (0, 1234, SAMPLE_ROWS - 1):
        m = s.base_meta[i]
        got = await ok_json(await node.client.get(f"/v1/collections/{name}/documents/{m['id']}",
                                                  params={"vector": "true"}))
        assert got["metadata"] == {"text": m["text"], "pos": m["pos"]}
        assert np.asarray(got["vector"], np.float32).tobytes() == s.base[i].tobytes()


async def test_imports_the_sample_through_pipes(served: Served, sample_files: Files,
                                                tmp_path: Path) -> None:
    run = await aquila_import(tmp_path, *npy_args(served, sample_files), "--batch", "700")
    assert run.code == 0, run.err
    assert "imported 5,000 documents into wn" in run.out
    assert re.search(r"imported 5,000/5,000 rows \(100%\), [\d,]+ docs/s", run.err), run.err
    assert "\x1b[" not in run.err  # no terminal, no escape codes
    await check_sample(served.node)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".aquila-import-")]  # done
    # The same import again: the same documents (ids given), nothing added.
    again = await aquila_import(tmp_path, *npy_args(served, sample_files), "--batch", "900")
    assert again.code == 0, again.err
    assert (await served.node.describe("wn"))["count"] == SAMPLE_ROWS


async def test_a_progress_bar_on_a_terminal(served: Served, sample_files: Files,
                                            tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aquila.node", "import", *npy_args(served, sample_files),
        "--batch", "250", "--concurrency", "2", cwd=tmp_path, stdin=slave, stdout=slave,
        stderr=slave, env={**os.environ, "COLUMNS": "140", "TERM": "xterm"})
    os.close(slave)

    def read_all() -> bytes:
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    try:
        output = (await asyncio.to_thread(read_all)).decode("utf-8", "replace")
        assert await proc.wait() == 0, output
    finally:
        os.close(master)
    assert "\x1b[" in output  # drawn and redrawn in place
    assert "━" in output and "docs/s" in output and "5000/5000" in output, output[-2000:]
    assert "imported 5,000 documents into wn" in output
    await check_sample(served.node)


async def test_bad_rows_are_reported_by_line_and_the_rest_imported(
    served: Served, tmp_path: Path
) -> None:
    s = load_sample()
    lines = [orjson.dumps({"id": m["id"], "vector": s.base[i].tolist(),
                           "metadata": {"pos": m["pos"]}}) for i, m in enumerate(s.base_meta[:40])]
    bad = {
        3: b'{"id": "x3", "vector": [1, 2',  # not JSON
        5: orjson.dumps({"id": "x5", "vector": [1.0] * 383}),
        8: orjson.dumps({"id": "x" * 300, "vector": s.base[8].tolist()}),
        10: orjson.dumps({"id": "x10", "vector": s.base[10].tolist(), "metadata": [1]}),
        12: orjson.dumps({"id": "x12", "vector": s.base[12].tolist(), "extra": 1}),
        17: orjson.dumps({"id": "x17", "vector": ["a"] * 384}),
        21: b'{"id": "x21", "vector": [' + b"1e39," * 383 + b"1e39]}",  # beyond float32
        24: orjson.dumps({"id": "x24", "vector": s.base[24].tolist(),
                          "metadata": {"t": "x" * MAX_DOCUMENT_METADATA}}),
    }
    for line, text in bad.items():
        lines[line - 1] = text
    lines[29] = b""  # blank: skipped, not bad
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    args = ["docs", str(path), "--node", served.addr, "--create", "--dim", "384",
            "--index", "flat", "--batch", "6"]
    run = await aquila_import(tmp_path, *args)
    assert run.code == 3, run.err
    for line in bad:
        assert f"bad row: line {line}: " in run.err, run.err
    assert "not JSON" in run.err and "383 values" in run.err and "unknown field" in run.err
    assert f"line 24: metadata is {MAX_DOCUMENT_METADATA + 8:,} bytes serialised" in run.err
    good = 40 - len(bad) - 1
    assert f"imported {good} documents" in run.out and f"{len(bad)} bad rows left out" in run.out
    assert (await served.node.describe("docs"))["count"] == good
    # --strict: stops at the first bad row; what came before it in file order is stored.
    strict = await aquila_import(tmp_path, "strict", str(path), "--node", served.addr,
                                 "--create", "--dim", "384", "--index", "flat", "--batch", "2",
                                 "--concurrency", "1", "--strict", "--state",
                                 str(tmp_path / "strict.state"))
    assert strict.code == 1 and "line 3: not JSON" in strict.err, strict.err
    assert (await served.node.describe("strict"))["count"] == 2


async def test_an_interrupted_import_finishes_when_run_again(
    served: Served, sample_files: Files, tmp_path: Path
) -> None:
    served.gate.after = 12  # the node takes 12 batches, then holds the rest
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aquila.node", "import", *npy_args(served, sample_files),
        "--batch", "100", "--concurrency", "2", cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    def progress() -> int:
        files = list(tmp_path.glob(".aquila-import-wn-*.json"))
        if not files:
            return 0
        try:
            done = orjson.loads(files[0].read_bytes())["done"]
        except (OSError, orjson.JSONDecodeError):
            return 0
        return sum(hi - lo + 1 for lo, hi in done)

    await wait_for(lambda: progress() >= 10 and served.gate.upserts > 12, 60,
                   what="the import to store some batches and wait on the rest")
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    stored = progress()
    assert 10 <= stored <= 12
    served.gate.after = None
    served.gate.opened.set()
    before = served.gate.upserts
    run = await aquila_import(tmp_path, *npy_args(served, sample_files), "--batch", "100")
    assert run.code == 0, run.err
    assert f"resuming: {stored} of 50 batches were stored by an earlier run" in run.err
    assert served.gate.upserts - before == 50 - stored  # only the rest was sent
    await check_sample(served.node)
    assert progress() == 0  # finished: the progress file is gone


async def test_sigterm_keeps_the_progress(served: Served, sample_files: Files,
                                          tmp_path: Path) -> None:
    served.gate.after = 3
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aquila.node", "import", *npy_args(served, sample_files),
        "--batch", "500", "--concurrency", "1", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await wait_for(lambda: served.gate.upserts > 3, 60, what="the import to be held")
    proc.send_signal(signal.SIGTERM)
    out, err = await proc.communicate()
    assert proc.returncode == 1, err
    assert b"interrupted" in err and b"run the same command again" in err
    assert b"imported 1,500 documents" in out
    served.gate.after = None
    served.gate.opened.set()
    run = await aquila_import(tmp_path, *npy_args(served, sample_files), "--batch", "500")
    assert run.code == 0 and "resuming: 3 of 10 batches" in run.err, run.err
    await check_sample(served.node)


async def test_a_cluster_that_stops_taking_writes_ends_the_import(
    served: Served, sample_files: Files, tmp_path: Path
) -> None:
    """Every retry refused: the import stops (it does not hang with batches queued), keeps
    its progress, and a rerun once the cluster takes writes again finishes it."""
    served.gate.after, served.gate.refuse = 10, True
    run = await aquila_import(tmp_path, *npy_args(served, sample_files), "--batch", "100",
                              "--concurrency", "3", "--retries", "1")
    assert run.code == 1, run.err
    assert "no node stored a batch after 2 attempts" in run.err and "503" in run.err
    assert "run the same command again" in run.err
    served.gate.after = None
    run = await aquila_import(tmp_path, *npy_args(served, sample_files), "--batch", "100")
    assert run.code == 0 and "resuming: 10 of 50 batches" in run.err, run.err
    await check_sample(served.node)


async def test_inputs_that_cannot_be_imported_are_refused_before_anything_is_sent(
    served: Served, sample_files: Files, tmp_path: Path
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("".join(f"id{i}\n" for i in range(4999)))
    run = await aquila_import(tmp_path, "wn", str(sample_files.npy), "--ids", str(short),
                              "--node", served.addr, "--create")
    assert run.code == 1 and "has 4999 lines for the 5000 rows" in run.err, run.err
    (tmp_path / "x.csv").write_text("1,2\n")
    for args in (["wn", str(tmp_path / "x.csv")], ["wn", str(tmp_path / "none.npy")],
                 ["bad name", str(sample_files.npy)], ["wn", str(tmp_path / "x.jsonl")]):
        run = await aquila_import(tmp_path, *args, "--node", served.addr)
        assert run.code != 0 and run.err.startswith("aquila import: "), run.err
        assert "Traceback" not in run.err
    await served.node.create("small", 8)
    run = await aquila_import(tmp_path, "small", str(sample_files.npy), "--node", served.addr)
    assert run.code == 1 and "dimension 384" in run.err and "dimension 8" in run.err
    run = await aquila_import(tmp_path, "small", str(sample_files.npy), "--node", served.addr,
                              "--create", "--metric", "ip")
    assert run.code == 1 and "exists with other settings" in run.err, run.err
    run = await aquila_import(tmp_path, "absent", str(sample_files.npy), "--node", served.addr)
    assert run.code == 1 and "no collection 'absent'" in run.err
    run = await aquila_import(tmp_path, "wn", str(sample_files.npy), "--node", "127.0.0.1:9")
    assert run.code == 1 and "cannot reach 127.0.0.1:9" in run.err, run.err
    for bad in ("100000", "0", "-1", "x"):  # each request in flight holds a body in memory
        run = await aquila_import(tmp_path, "wn", str(sample_files.npy), "--node", served.addr,
                                  "--concurrency", bad)
        assert run.code == 2 and "--concurrency" in run.err, run.err
    assert "at most 64" in (await aquila_import(tmp_path, "wn", str(sample_files.npy),
                                                "--concurrency", "65")).err
    # A progress file that cannot be written: refused before the first batch, not at the end.
    for state in (tmp_path / "no" / "such" / "dir.json", tmp_path):
        run = await aquila_import(tmp_path, "wn", str(sample_files.npy), "--node", served.addr,
                                  "--create", "--state", str(state))
        assert run.code == 1 and "cannot keep the import's progress" in run.err, run.err
        assert "Traceback" not in run.err
    assert served.gate.upserts == 0


async def test_the_api_key(start_node: Any, sample_files: Files, tmp_path: Path) -> None:
    node = await start_node(api_key="sesame")
    addr = f"127.0.0.1:{node.config.port}"
    args = ["wn", str(sample_files.npy), "--node", addr, "--create", "--index", "flat"]
    run = await aquila_import(tmp_path, *args)
    assert run.code == 1 and "unauthorized" in run.err
    run = await aquila_import(tmp_path, *args, env={"AQUILA_API_KEY": "sesame"})
    assert run.code == 0, run.err
    headers = {"Authorization": "Bearer sesame"}
    desc = await ok_json(await node.client.get("/v1/collections/wn", headers=headers))
    assert desc["count"] == SAMPLE_ROWS


# -- the uploader against a scripted server -----------------------------------------------------
@dataclass
class Script:
    refuse: set[str] = field(default_factory=set)  # a batch holding one of these ids: 400
    fail_first: int = 0  # 503 for the first requests
    seen: list[int] = field(default_factory=list)  # batch sizes received
    stored: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.seen.append(len(body["ids"]))
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": {"code": "unavailable", "message": "later"}},
                                     status=503)
        bad = self.refuse & set(body["ids"])
        if bad:
            return web.json_response({"error": {"code": "bad_request",
                                                "message": f"no {sorted(bad)[0]}"}}, status=400)
        self.stored |= set(body["ids"])
        return web.json_response({"ids": body["ids"], "upserted": len(body["ids"])})


async def uploader_against(script: Script) -> AsyncIterator[tuple[Uploader, list[float]]]:
    app = web.Application()
    app.router.add_post("/v1/collections/c/documents", script.handle)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async with aiohttp.ClientSession() as session:
        yield Uploader(session, [f"127.0.0.1:{server.port}"], "c", None,
                       lambda row: f"line {row + 1}", sleep=sleep), slept
    await server.close()


def batch_of(n: int) -> Batch:
    return Batch(0, list(range(n)), [f"d{i}" for i in range(n)], np.ones((n, 4), np.float32),
                 [b"{}"] * n, [], n)


async def test_rows_the_cluster_refuses_are_found_by_halving() -> None:
    script = Script(refuse={"d7", "d13"})
    async for up, _ in uploader_against(script):
        bad = await up.send(batch_of(32))
        assert [(b.row, b.where) for b in bad] == [(7, "line 8"), (13, "line 14")]
        assert all("bad_request: no d" in b.reason for b in bad)
        assert script.stored == {f"d{i}" for i in range(32)} - {"d7", "d13"}
        assert len(script.seen) < 32  # halving, not one request per row


async def test_transient_failures_are_retried_then_given_up() -> None:
    script = Script(fail_first=3)
    async for up, slept in uploader_against(script):
        assert await up.send(batch_of(5)) == []
        assert up.retries == 3 and slept == [0.5, 1.0, 2.0]
        script.fail_first = 100
        with pytest.raises(ImportFailed, match="503"):
            await up.send(batch_of(5))

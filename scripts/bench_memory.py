#!/usr/bin/env python3
"""What one node costs per vector (issue 14): memory and disk against the raw float32 vectors,
restart after SIGKILL, REST search beside in-process FAISS on the same data, and RSS under
churn.

Per index type (`--types`), a fresh `aquila serve` gets N seeded clustered vectors (l2, the
collection's default settings but for its type) over REST in the columnar form, from
`--clients` concurrent clients in batches of `--batch`; once every shard is trained the run
reports the node's RSS and its ratio to N × dim × 4 bytes, the data folder against the same,
REST search q/s at `--nprobe` under wrk (8 connections, single queries) beside in-process
FAISS on the node's own index (read from its snapshot once the node has stopped; the same
nprobe, single queries on 2 threads, OpenMP at one thread in each, as the node's search
threads run them; scripts/bench_rest.py interleaves the two in rounds), the nprobe
a search by `recall` 0.95 picks, and the time from SIGKILL to /readyz and a first search.

`--churn S`: instead, a node holding `--churn-live` documents (dim `--churn-dim`) while one
client upserts 500 new ids and deletes them, over and over, for S seconds and
`--churn-searchers` clients (4) search: RSS, its parts, deletes/s and search p99 every
`--churn-sample` s; the issue's figure (RSS at the first minute, its largest after it, the
growth), the deletes made, the index swaps the node made meanwhile, search p99 during churn
beside p99 at rest.

    python scripts/bench_memory.py --n 1000000              # about 10 minutes per type
    python scripts/bench_memory.py --churn 180

The machine is shared: every figure is printed with `uptime`'s load."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import faiss
import numpy as np
import orjson
from bench_common import COLLECTION, JSON_HEADERS, log, pct
from bench_memparts import breakdown
from bench_node import Node, call, code_pythonpath, rss_mib_of, wait_ready
from snapshot_index import snapshot_index
from wrkload import run_wrk, write_bodies

from aquila.node.storage.collection import Tuning

K = 10


def load_avg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def clustered(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """Seeded Gaussian blobs (√n of them) around random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(8, int(np.sqrt(n))), dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        c = rng.integers(0, len(centres), m)
        out[lo:lo + m] = centres[c] + rng.standard_normal((m, dim)).astype(np.float32)
    return out


def columnar(ids: list[str], x: np.ndarray) -> bytes:
    return orjson.dumps({
        "ids": ids, "vectors_b64": base64.b64encode(x.astype("<f4").tobytes()).decode(),
        "metadata": [{"g": int(i) % 100} for i in range(len(ids))],
    })


async def memory_parts(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """MiB of the node's FAISS estimate, of RocksDB's own figures and of glibc's count of
    its C heap (`malloc_in_use`, `malloc_free`, ...: nodes of older code report none), from
    /metrics."""
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("aquila_faiss_memory_bytes{", "aquila_rocksdb_memory_bytes{")):
            name, value = line.rsplit(" ", 1)
            kind = name.split('kind="')[1].split('"')[0] if 'kind="' in name else "faiss"
            out[kind] = out.get(kind, 0.0) + round(float(value) / 2**20, 1)
        elif line.startswith("aquila_malloc_bytes{"):  # the node's C heap by glibc
            name, value = line.rsplit(" ", 1)
            kind = "malloc_" + name.split('kind="')[1].split('"')[0]
            out[kind] = round(float(value) / 2**20, 1)
        elif line.startswith("aquila_labels{"):  # counts, not MiB
            name, value = line.rsplit(" ", 1)
            kind = "labels_" + name.split('kind="')[1].split('"')[0]
            out[kind] = out.get(kind, 0.0) + float(value)
    return out


async def collection_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The collection's one-number series on /metrics, by name (`aquila_index_vectors`, ...):
    what a node of older code does not report is absent."""
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    label = f'{{collection="{COLLECTION}"}} '
    for line in text.splitlines():
        name, sep, value = line.partition(label)
        if sep and " " not in value:
            out[name] = float(value)
    return out


async def compactions(session: aiohttp.ClientSession, url: str) -> int | None:
    """The collection's index compactions so far (None: a node that reports none)."""
    n = (await collection_metrics(session, url)).get("aquila_index_compactions_total")
    return None if n is None else int(n)


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def ingest(session: aiohttp.ClientSession, url: str, x: np.ndarray, batch: int,
                 clients: int, prefix: str = "", first: int = 0) -> float:
    """Seconds to upsert every row of x from row `first` on (ids prefix + row number)."""
    return (await ingest_rows(session, url, x, batch, clients, prefix, first))[0]


async def ingest_rows(session: aiohttp.ClientSession, url: str, x: np.ndarray, batch: int,
                      clients: int, prefix: str = "", first: int = 0,
                      stop_at: float = math.inf) -> tuple[float, int]:
    """Seconds to upsert the rows of x from row `first` on (ids prefix + row number), and
    the rows written: every one, or when time.time() passes `stop_at` a prefix of x (the
    batches the clients had started, then those missing below the last of them)."""
    starts = list(range(first, len(x), batch))
    t0 = time.perf_counter()
    done = [0]
    written: set[int] = set()
    every = max(batch, len(x) // 20)

    async def one(lo: int) -> None:
        ids = [f"{prefix}{i}" for i in range(lo, min(lo + batch, len(x)))]
        body = await asyncio.to_thread(columnar, ids, x[lo:lo + len(ids)])
        await call(session, "POST", f"{url}/v1/collections/{COLLECTION}/documents", body)
        written.add(lo)
        done[0] += len(ids)
        if done[0] % every < len(ids):
            t = time.perf_counter() - t0
            log(f"ingest: {done[0]} in {t:.0f}s ({done[0] / t:.0f}/s)")

    async def worker(w: int) -> None:
        for lo in starts[w::clients]:
            if time.time() >= stop_at:
                return
            await one(lo)

    await asyncio.gather(*(worker(w) for w in range(clients)))
    if len(written) == len(starts):
        return time.perf_counter() - t0, len(x)
    end = max(written, default=first)
    for lo in starts:  # a prefix: the few batches below the last one written
        if lo < end and lo not in written:
            await one(lo)
    rows = min(len(x), end + batch) if written else first
    log(f"ingest stopped at the time given: {rows} rows written")
    return time.perf_counter() - t0, rows


async def wait_settled(session: aiohttp.ClientSession, url: str, n: int,
                       limit_s: float = 3600, unsettled_ok: bool = False) -> dict[str, Any]:
    """The description once every shard is trained, nothing trains, no retraining is due
    (one waits for writes to pause, up to half a minute) and the count is n. After limit_s
    an error, or with unsettled_ok the description as it is then, marked "unsettled"."""
    deadline = time.perf_counter() + limit_s
    while True:
        desc = await call(session, "GET", f"{url}/v1/collections/{COLLECTION}")
        states = {s["index_state"] for s in desc["shard_states"]}
        due = any(s.get("index", {}).get("retrain_at", 0) and
                  s["index"]["retrain_at"] <= desc["count"] for s in desc["shard_states"])
        if (states == {"trained"} and desc["count"] == n and not due
                and not await compaction_due(session, url)):
            return dict(desc)
        if time.perf_counter() >= deadline:
            if unsettled_ok and desc["count"] == n:
                log(f"not settled after {limit_s:.0f}s (states {sorted(states)}, "
                    f"retraining due {due}): measuring the index as it is")
                return {**desc, "unsettled": True}
            raise RuntimeError("the collection did not settle")
        await asyncio.sleep(1)


def time_of_day(hhmm: str | None) -> float:
    """The epoch time of the next HH:MM (UTC; tomorrow's once today's has passed: a run
    started before midnight for a time after it), or infinity for None."""
    if not hhmm:
        return math.inf
    hh, mm = (int(v) for v in hhmm.split(":"))
    now = time.time()
    at = now - now % 86400 + hh * 3600 + mm * 60
    return at if at > now else at + 86400


def settle_limit(args: argparse.Namespace) -> float:
    """Seconds a wait for the collection to settle may take: --settle-timeout, or less to
    end by --settle-by (a time of day, UTC)."""
    return min(float(args.settle_timeout), max(0.0, time_of_day(args.settle_by) - time.time()))


async def compaction_due(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether the node's index lists are due a compaction once writes pause (by the node's
    default `Tuning`);
    False for a node that reports none (older code)."""
    m = await collection_metrics(session, url)
    added = m.get("aquila_index_added_since_compaction")
    vectors = m.get("aquila_index_vectors")
    return (added is not None and vectors is not None
            and Tuning().compaction_due(int(added), int(vectors)))


class AttachedNode(Node):
    """A node this run did not start (`--attach PID`: a run that lost its driver, picked up
    where it was): signalled and waited for by pid until this run starts it again."""

    def __init__(self, pid: int, env: dict[str, str]) -> None:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        data = Path(argv[argv.index("--data") + 1])
        super().__init__(data, data.parent / "node.log", env,
                         host=argv[argv.index("--host") + 1],
                         port=int(argv[argv.index("--port") + 1]))
        self._pid = pid

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else self._pid

    def alive(self) -> bool:
        if self.proc is not None:
            return super().alive()
        try:
            return Path(f"/proc/{self._pid}/stat").read_text().split(")")[1].split()[0] != "Z"
        except OSError:
            return False

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            super().signal(sig)
        elif self.alive():
            os.kill(self._pid, sig)

    def wait_exit(self, timeout: float) -> int:
        if self.proc is not None:
            return super().wait_exit(timeout)
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {self._pid} still running")
            time.sleep(0.05)
        return 0

    def stop(self) -> None:
        if self.proc is not None:
            super().stop()
        elif self.alive():
            os.kill(self._pid, signal.SIGTERM)
            self.wait_exit(120)


class PeakRss:
    """The node's largest RSS, sampled every second in a thread (training and snapshot
    spikes between the figures taken at rest), and its phase."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.peaks: dict[str, float] = {}
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            r = rss_mib_of(self.node.pid) if self.node.alive() else float("nan")
            if r == r and r > self.peaks.get(self.phase, 0.0):
                self.peaks[self.phase] = round(r, 1)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def exact_truth(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row numbers of every query's K nearest rows of x (l2), exact, in chunks of x."""
    best_d = np.full((len(q), K), np.inf, np.float32)
    best_i = np.full((len(q), K), -1, np.int64)
    for lo in range(0, len(x), 1_000_000):
        d, i = faiss.knn(q, x[lo:lo + 1_000_000], K)
        d = np.concatenate([best_d, d], 1)
        i = np.concatenate([best_i, i + lo], 1)
        order = np.argsort(d, axis=1, kind="stable")[:, :K]
        best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return best_i


def parse_settings(text: str) -> list[dict[str, float]]:
    """"nprobe=8,nprobe=64,recall=0.95" -> [{"nprobe": 8}, {"nprobe": 64}, {"recall": 0.95}]."""
    out: list[dict[str, float]] = []
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in ("nprobe", "recall"):
            raise argparse.ArgumentTypeError(f"{part}: nprobe=N or recall=R")
        out.append({key: int(value) if key == "nprobe" else float(value)})
    return out


async def recall_and_qps(s: aiohttp.ClientSession, node: Node, q: np.ndarray,
                         truth: np.ndarray, settings: list[dict[str, float]], seconds: float,
                         work: Path) -> list[dict[str, Any]]:
    """Per setting (an nprobe or a target recall): recall@K against the exact answers (the
    queries in batches of 100), the nprobe the node used, and REST q/s and p99 under wrk
    (8 connections, single queries)."""
    url = f"{node.base_url}/v1/collections/{COLLECTION}/search"
    out = []
    for setting in settings:
        hits = 0
        used: set[int] = set()
        for lo in range(0, len(q), 100):
            body = orjson.dumps({"vectors": q[lo:lo + 100], "k": K, **setting},
                                option=orjson.OPT_SERIALIZE_NUMPY)
            r = await call(s, "POST", url, body)
            if r.get("nprobe") is not None:
                used.add(int(r["nprobe"]))
            for row, want in zip(r["results"], truth[lo:lo + 100], strict=True):
                hits += len({int(h["id"]) for h in row} & set(want.tolist()))
        one: dict[str, Any] = {**setting, "recall_at_10": round(hits / truth.size, 4),
                               "nprobe_used": sorted(used)}
        bodies = work / "bodies.txt"
        write_bodies(bodies, [orjson.dumps({"vector": v, "k": K, **setting},
                                           option=orjson.OPT_SERIALIZE_NUMPY) for v in q])
        w = await asyncio.to_thread(
            run_wrk, node.base_url, f"/v1/collections/{COLLECTION}/search", bodies,
            connections=8, threads=2, seconds=seconds, server_pid=node.pid, work_dir=work)
        one.update(qps=round(w.rps), p99_ms=round(w.lat_p99_ms, 2), non2xx=w.non2xx)
        log(f"search {setting}: {one}")
        out.append(one)
    return out


async def restart_after(s: aiohttp.ClientSession, node: Node, sig: signal.Signals,
                        q: np.ndarray) -> dict[str, float]:
    """Stop the node by `sig`, start it again: the seconds the stop took, until /readyz and
    until a first search answered."""
    t0 = time.perf_counter()
    node.signal(sig)
    await asyncio.to_thread(node.wait_exit, 600)
    stopped = time.perf_counter() - t0
    t0 = time.perf_counter()
    node.start()
    ready = await wait_ready(s, node, 1800)
    await call(s, "POST", f"{node.base_url}/v1/collections/{COLLECTION}/search",
               orjson.dumps({"vector": q[0].tolist(), "k": K}))
    return {"stop_s": round(stopped, 2), "ready_s": round(ready, 2),
            "first_search_s": round(time.perf_counter() - t0, 2)}


def faiss_round(index: Any, q: np.ndarray, nprobe: int, threads: int, seconds: float
                ) -> dict[str, Any]:
    """Single-query searches per second of the node's own index, `threads` threads each with
    OpenMP at one thread (the node's search threads' setting), as the node calls it."""
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def run(t: int) -> None:
        faiss.omp_set_num_threads(1)  # OpenMP's setting is per thread
        i = t
        while time.perf_counter() < stop:
            index.search(q[i % len(q): i % len(q) + 1], K, params=params)
            i += threads
            done[t] += 1

    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    c0 = time.process_time()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    wall = time.perf_counter() - t0
    return {"qps": round(sum(done) / wall),
            "cpu_per_query_us": round((time.process_time() - c0) / max(1, sum(done)) * 1e6)}


def faiss_qps(index_path: Path, shards: int, q: np.ndarray, nprobe: int, seconds: float,
              threads: int = 2) -> tuple[float, float]:
    """The node's own index (its snapshot, read with the node's loader: the same lists, the
    same training) searched in process: single-query searches per second on `threads`
    threads (the node's search threads on 2 cores), each with FAISS's OpenMP at one thread
    as the node's are (the setting is per thread), at `nprobe` through the same search
    parameters; and the resident bytes its lists hold per vector."""
    loaded = snapshot_index(index_path, shards)
    if loaded is None:
        raise RuntimeError(f"{index_path}: the node's snapshot did not load")
    index = loaded.index
    qps = faiss_round(index, q, nprobe, threads, seconds)["qps"]
    code_size = int(faiss.extract_index_ivf(index).code_size)
    return qps, code_size + 8


async def one_type(args: argparse.Namespace, itype: str, x: np.ndarray, q: np.ndarray,
                   truth: np.ndarray, root: Path, variant: str = "",
                   code: Path | None = None, extra: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    env = {"AQUILA_FSYNC": "true", "AQUILA_SNAPSHOT_INTERVAL_S": str(args.snapshot_interval),
           "AQUILA_LOG_LEVEL": "INFO", **(extra or {})}
    if code is not None:
        env["PYTHONPATH"] = code_pythonpath(code)
    node: Node
    if args.attach:
        node = AttachedNode(args.attach, env)
        data = node.data_dir.parent
    else:
        data = root / f"{itype}{variant and '-' + variant}"
        data.mkdir()
        node = Node(data / "node", data / "node.log", env)
        (data / "node").mkdir()
        node.start()
    out: dict[str, Any] = {"type": itype, "n": len(x), "dim": x.shape[1]}
    if variant:
        out["variant"] = variant
    if args.attach:
        out["attached_from_row"] = args.first_row
    raw = len(x) * x.shape[1] * 4
    peak = PeakRss(node)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
            url = node.base_url
            await wait_ready(s, node, 120)
            if not args.attach:  # a fresh node, no collection yet
                out["parts_fresh"] = await asyncio.to_thread(breakdown, node.pid, node.log_path)
            body = {"dim": x.shape[1], "metric": "l2", "index": {"type": itype}}
            if not args.attach:
                await call(s, "PUT", f"{url}/v1/collections/{COLLECTION}", orjson.dumps(body))
            peak.phase = "ingest"
            first = args.first_row
            if args.pause_at and not args.attach:
                # A first part, trained, then the rest: the retraining this makes due runs
                # beside the ingest and catches up with what comes meanwhile.
                await ingest(s, url, x[:args.pause_at], args.batch, args.clients)
                await wait_settled(s, url, args.pause_at, args.settle_timeout)
                out["rss_mib_at_pause"] = round(rss_mib_of(node.pid), 1)
                log(f"{itype}: {args.pause_at} trained; rss {out['rss_mib_at_pause']} MiB")
                first = args.pause_at
            secs, rows = await ingest_rows(s, url, x, args.batch, args.clients, first=first,
                                           stop_at=time_of_day(args.ingest_by))
            if not rows:
                raise RuntimeError("--ingest-by passed before a row was written")
            if rows < len(x):  # stopped at --ingest-by: measured on the rows written
                out["ingest_stopped_at_rows"] = rows
                x = x[:rows]
                out["n"] = rows
                raw = rows * x.shape[1] * 4
                truth = await asyncio.to_thread(exact_truth, x, q)
            out["ingest_docs_per_s"] = round((len(x) - first) / secs)
            out["ingest_s"] = round(secs, 1)
            log(f"{itype}: ingested {len(x)} in {secs:.1f}s "
                f"(rss {rss_mib_of(node.pid):.0f} MiB); waiting for training")
            peak.phase = "training"
            t0 = time.perf_counter()
            desc = await wait_settled(s, url, len(x), settle_limit(args), args.unsettled_ok)
            if desc.get("unsettled"):
                out["unsettled"] = {
                    "states": sorted({st["index_state"] for st in desc["shard_states"]}),
                    "retrain_at": [st.get("index", {}).get("retrain_at")
                                   for st in desc["shard_states"]]}
            out["settled_after_ingest_s"] = round(time.perf_counter() - t0, 1)
            out["trained_after_start_s"] = round(secs + out["settled_after_ingest_s"], 1)
            info = desc["shard_states"][0].get("index", {})
            out["nlist"], out["trained_at"] = info.get("nlist"), info.get("trained_at")
            out["compactions"] = await compactions(s, url)
            out["shards"] = desc["shards"]
            out["recall_curve"] = info.get("recall_curve")
            log(f"{itype}: trained (nlist {out['nlist']}) after "
                f"{out['settled_after_ingest_s']}s; rss {rss_mib_of(node.pid):.0f} MiB")
            peak.phase = "snapshot"
            await asyncio.sleep(args.snapshot_wait)  # the periodic snapshot catches up
            rss = rss_mib_of(node.pid)
            out["rss_mib"] = round(rss, 1)
            out["rss_over_raw"] = round(rss * 2**20 / raw, 3)
            out["rss_bytes_per_vector"] = round(rss * 2**20 / len(x), 1)
            out["memory_parts_mib"] = await memory_parts(s, url)
            # Where RSS sits (smaps, glibc), and with --trim-probe what a malloc_trim(0) then
            # gives back (it changes the node: measured last, after the figures above).
            out["parts"] = await asyncio.to_thread(breakdown, node.pid, node.log_path,
                                                   args.trim_probe)
            log(f"{itype}: parts {out['parts']}")
            out["disk_over_raw"] = round(du_bytes(data / "node") / raw, 3)
            peak.phase = "search"
            out["search"] = await recall_and_qps(s, node, q, truth, args.settings,
                                                 args.search_s, data)
            rest = [r for r in out["search"] if r.get("nprobe") == args.nprobe]
            if rest:
                out["rest_qps"], out["rest_p99_ms"] = rest[0]["qps"], rest[0]["p99_ms"]
                out["rest_nprobe"] = args.nprobe
            out["rss_mib_after_search"] = round(rss_mib_of(node.pid), 1)
            out["memory_parts_after_search_mib"] = await memory_parts(s, url)
            out["parts_after_search"] = await asyncio.to_thread(breakdown, node.pid,
                                                                node.log_path)
            for sig in (signal.SIGKILL, signal.SIGTERM):
                peak.phase = f"restart_{sig.name}"
                r = await restart_after(s, node, sig, q)
                out[f"restart_{sig.name}"] = r
                log(f"{itype}: restart after {sig.name}: {r}")
            out["restart_ready_s"] = out["restart_SIGKILL"]["ready_s"]
            desc = await call(s, "GET", f"{url}/v1/collections/{COLLECTION}")
            out["count_after_restart"] = desc["count"]
            peak.phase = "after_restart"
            await call(s, "POST", f"{url}/v1/collections/{COLLECTION}/search",
                       orjson.dumps({"vector": q[0].tolist(), "k": K, "nprobe": args.nprobe}))
            out["rss_mib_after_restart"] = round(rss_mib_of(node.pid), 1)
            out["rss_after_restart_over_raw"] = round(
                out["rss_mib_after_restart"] * 2**20 / raw, 3)
            out["memory_parts_after_restart_mib"] = await memory_parts(s, url)
            out["parts_after_restart"] = await asyncio.to_thread(breakdown, node.pid,
                                                                 node.log_path)
            per = per_vector(out.get("parts_fresh", {}), out["parts_after_restart"],
                             out["memory_parts_after_restart_mib"], len(x))
            if per is not None:  # the README's table of bytes per vector, checked
                out["heap_bytes_per_vector_after_restart"] = per
    finally:
        out["rss_peak_mib"] = peak.stop()
        node.stop()
    log(json.dumps(out))
    if out.get("nlist") and args.faiss_ref and out.get("rest_qps"):
        snap = next((data / "node").rglob("index.faiss"))  # the collection's snapshot
        qps, per_vec = await asyncio.to_thread(faiss_qps, snap, int(out["shards"]), q,
                                               args.nprobe, args.search_s)
        out["faiss_qps"] = round(qps)
        out["rest_over_faiss"] = round(out["rest_qps"] / qps, 3)
        out["faiss_ivf_flat_bytes_per_vector"] = per_vec
    out["uptime"] = load_avg()
    return out


def c_heap_mib(parts: dict[str, Any]) -> float | None:
    """The C heap in use (glibc's arenas less their free chunks, plus the blocks mapped
    apart), from `bench_memparts.breakdown`."""
    if "malloc_heap_mib" not in parts:
        return None
    return float(parts["malloc_heap_mib"] - parts["malloc_free_mib"]
                 + parts["malloc_mapped_mib"])


def per_vector(fresh: dict[str, Any], parts: dict[str, Any], rocks: dict[str, float],
               n: int) -> float | None:
    """Bytes a vector of the C heap in use, a fresh node's and RocksDB's cache taken off
    (what the README's table of memory per vector counts: the index, its ids, its hash
    table's entries, its centroids)."""
    now, base = c_heap_mib(parts), c_heap_mib(fresh)
    if now is None or base is None or not n:
        return None
    return round((now - base - rocks.get("budget_used", 0.0)) * 2**20 / n, 1)


def rss_anon_mib(pid: int) -> float:
    """The anonymous part of RSS (the heaps, no file-backed pages such as libraries')."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


def churn_figures(series: list[dict[str, Any]], minute: float = 60.0) -> dict[str, Any]:
    """The issue's figure from the samples: RSS at the first minute (the first sample at or
    after it), the largest and smallest after it, and the growth (largest over the first
    minute's, minus 1; the goal is at most 0.10)."""
    after = [r for r in series if r["t"] >= minute] or series[-1:]
    if not after:
        return {}
    first, rss = after[0]["rss"], [r["rss"] for r in after]
    # The memtables swing between flushes (up to a quarter of the budget): the sample at the
    # minute may be at either end, so the peak of the first minute is given beside it.
    peak = max([r["rss"] for r in series if r["t"] <= minute] or [first])
    out = {"rss_mib_at_first_minute": first, "rss_mib_peak_first_minute": peak,
           "rss_mib_max_after": max(rss), "rss_mib_min_after": min(rss),
           "rss_growth_after_first_minute": round(max(rss) / first - 1, 3),
           "rss_growth_over_first_minute_peak": round(max(rss) / peak - 1, 3),
           "rss_spread_after_first_minute": round(max(rss) / min(rss) - 1, 3)}
    if all("memtables" in r for r in after):
        # RSS less the memtables (as the budget counts them) in each sample: the growth
        # once their swing between flushes is taken out.
        steady = [r["rss"] - r["memtables"] for r in after]
        out["rss_less_memtables_growth_after_first_minute"] = round(
            max(steady) / steady[0] - 1, 3)
    slope = rss_slope(after)
    if slope is not None:
        out["rss_mib_per_million_deletes_after_first_minute"] = round(slope, 2)
    return out


def rss_slope(samples: list[dict[str, Any]]) -> float | None:
    """MiB of RSS a million deletes, the least-squares line through every sample (`rss`
    against `deleted`): where the goal's figure rests on one sample at the minute and one
    largest after it (each anywhere in the memtables' swing), this uses them all, and says
    whether RSS still climbs (a level reached late reads near 0 once the run is long). None
    with fewer than three samples or no deletes between them."""
    if len(samples) < 3:
        return None
    x = np.array([r["deleted"] for r in samples], np.float64) / 1e6
    y = np.array([r["rss"] for r in samples], np.float64)
    if np.ptp(x) == 0:
        return None
    return float(np.polyfit(x, y, 1)[0])


async def churn(args: argparse.Namespace, root: Path, variant: str = "",
                code: Path | None = None, extra: dict[str, str] | None = None
                ) -> dict[str, Any]:
    dim = args.churn_dim
    x = clustered(args.churn_live, dim, args.seed)
    q = clustered(200, dim, args.seed + 1)
    env = {"AQUILA_FSYNC": "true", **(extra or {})}
    if code is not None:
        env["PYTHONPATH"] = code_pythonpath(code)
    if args.rocksdb_memory_mib:
        env["AQUILA_ROCKSDB_MEMORY_MIB"] = str(args.rocksdb_memory_mib)
    if args.tombstone_grace_s:
        # Tombstones purged within the run (the default grace is a day): anti-entropy, which
        # purges them, runs as often as the grace.
        env["AQUILA_TOMBSTONE_GRACE_S"] = str(args.tombstone_grace_s)
        env["AQUILA_ANTI_ENTROPY_INTERVAL_S"] = str(max(1.0, args.tombstone_grace_s))
    name = f"churn{variant and '-' + variant}"
    node = Node(root / name, root / f"{name}.log", env)
    (root / name).mkdir()
    node.start()
    out: dict[str, Any] = {"variant": variant, "live": args.churn_live, "dim": dim,
                           "seconds": args.churn,
                           "rocksdb_memory_mib": args.rocksdb_memory_mib or "default",
                           "tombstone_grace_s": args.tombstone_grace_s or "default"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            url = node.base_url
            await wait_ready(s, node, 120)
            body = {"dim": dim, "metric": "l2", "index": {"type": "ivf_flat"}}
            await call(s, "PUT", f"{url}/v1/collections/{COLLECTION}", orjson.dumps(body))
            await ingest(s, url, x, 2000, 2)
            await wait_settled(s, url, len(x))
            search_url = f"{url}/v1/collections/{COLLECTION}/search"

            async def search_for(seconds: float, lat: list[tuple[float, float]]) -> None:
                """(time it ended, milliseconds) of each search, one after another."""
                end = time.perf_counter() + seconds
                i = 0
                while time.perf_counter() < end and deleted[0] < args.churn_deletes:
                    t = time.perf_counter()
                    async with s.post(search_url, data=orjson.dumps(
                            {"vector": q[i % len(q)].tolist(), "k": K}),
                            headers=JSON_HEADERS) as r:
                        await r.read()
                    now = time.perf_counter()
                    lat.append((now, (now - t) * 1000))
                    i += 1

            rest: list[tuple[float, float]] = []
            deleted = [0]
            await asyncio.gather(*(search_for(10, rest) for _ in range(2)))
            out["p99_ms_at_rest"] = round(pct([ms for _, ms in rest], 99), 2)
            out["searches_per_s_at_rest"] = round(len(rest) / 10)
            series: list[dict[str, Any]] = []
            during: list[tuple[float, float]] = []
            log_from = node.log_path.stat().st_size
            t0 = time.perf_counter()
            stop = t0 + args.churn
            rng = np.random.default_rng(args.seed + 2)

            async def writer() -> None:
                r = 0
                while time.perf_counter() < stop and deleted[0] < args.churn_deletes:
                    ids = [f"c{r}-{i}" for i in range(500)]
                    xs = x[rng.integers(0, len(x), 500)] + 0.01
                    await call(s, "POST", f"{url}/v1/collections/{COLLECTION}/documents",
                               columnar(ids, xs))
                    await call(s, "POST", f"{url}/v1/collections/{COLLECTION}/documents/delete",
                               orjson.dumps({"ids": ids}))
                    deleted[0] += 500
                    r += 1

            async def sampler() -> None:
                last_t, last_n, last_s = t0, 0, 0
                while time.perf_counter() < stop and deleted[0] < args.churn_deletes:
                    now = time.perf_counter()
                    parts = await memory_parts(s, url)
                    rss = round(rss_mib_of(node.pid), 1)
                    # budget_used is the node's RocksDB budget in use: blocks and the
                    # memtables charged to it; the rest is Python, FAISS's own and the heap.
                    other = rss - parts.get("faiss", 0) - parts.get("budget_used", 0) - \
                        parts.get("table_readers", 0)
                    window = [ms for t, ms in during[last_s:] if t >= last_t]
                    heap: dict[str, Any] = {}
                    if args.churn_parts and len(series) % args.churn_parts == 0:
                        heap = await asyncio.to_thread(breakdown, node.pid, node.log_path)
                        heap.pop("rss_mib", None)
                    series.append({
                        "t": round(now - t0), "rss": rss, "rss_anon": rss_anon_mib(node.pid),
                        "deleted": deleted[0],
                        "deletes_per_s": round((deleted[0] - last_n) / max(now - last_t, 1e-9)),
                        "p99_ms": round(pct(window, 99), 1) if window else None,
                        "other": round(other, 1), **parts, **heap})
                    log(f"churn: {series[-1]}")
                    last_t, last_n, last_s = now, deleted[0], len(during)
                    await asyncio.sleep(args.churn_sample)

            await asyncio.gather(writer(), sampler(),
                                 *(search_for(args.churn, during)
                                   for _ in range(args.churn_searchers)))
            elapsed = time.perf_counter() - t0
            desc = await call(s, "GET", f"{url}/v1/collections/{COLLECTION}")
            out.update(deleted=deleted[0], deletes_per_s=round(deleted[0] / elapsed),
                       count_after=desc["count"],
                       p99_ms_during=round(pct([ms for _, ms in during], 99), 2),
                       searches_per_s_during=round(len(during) / elapsed),
                       **churn_figures(series), series=series)
            out.update(swaps_during(node.log_path, log_from))
            if series and "labels_given" in series[0]:
                out.update(labels_given_first=series[0]["labels_given"],
                           labels_given_last=series[-1]["labels_given"])
            rates = [r["deletes_per_s"] for r in series[1:]]
            if rates:
                out["deletes_per_s_min_max"] = [min(rates), max(rates)]
    finally:
        node.stop()
    out["uptime"] = load_avg()
    return out


def swaps_during(log_path: Path, offset: int) -> dict[str, int]:
    """How many index swaps the node logged from `offset` on: lists compactions (each starts
    once writes pause for `Tuning.compact_quiet_s`, 5 s) and trainings; each swap is followed
    by the block cache's shed and a heap trim (`Collection._give_back`), after which the
    cache fills again."""
    with log_path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return {"lists_compactions": text.count("index lists compacted"),
            "trainings": text.count(": trained (")}


def churn_table(r: dict[str, Any]) -> str:
    """The churn run's figures, as the README quotes them."""
    return "\n".join([
        f"churn {r.get('variant', '')}: {r['live']:,} live, dim {r['dim']}, "
        f"{r['seconds']:.0f} s, RocksDB memory {r['rocksdb_memory_mib']} MiB "
        f"({r.get('uptime', '')})",
        f"  {r['deleted']:,} deletes, {r['deletes_per_s']:,}/s (per sample: "
        f"{r.get('deletes_per_s_min_max')}); live count after {r['count_after']:,}",
        f"  RSS {r.get('rss_mib_at_first_minute')} MiB at the first minute, at most "
        f"{r.get('rss_mib_max_after')} (least {r.get('rss_mib_min_after')}) after it: growth "
        f"{r.get('rss_growth_after_first_minute')} (goal <= 0.10); over the first minute's "
        f"peak ({r.get('rss_mib_peak_first_minute')} MiB) "
        f"{r.get('rss_growth_over_first_minute_peak')}; RSS less the memtables "
        f"{r.get('rss_less_memtables_growth_after_first_minute')}; "
        f"{r.get('rss_mib_per_million_deletes_after_first_minute')} MiB a million deletes "
        "after it (least squares over every sample)",
        f"  labels given {r.get('labels_given_first')} at the start of the churn, "
        f"{r.get('labels_given_last')} at its end (tombstone grace "
        f"{r.get('tombstone_grace_s')} s)",
        f"  index swaps during churn: {r.get('lists_compactions')} lists compactions, "
        f"{r.get('trainings')} trainings (each sheds the block cache)",
        f"  search p99 {r['p99_ms_during']} ms during churn "
        f"({r['searches_per_s_during']}/s), {r['p99_ms_at_rest']} ms at rest "
        f"({r['searches_per_s_at_rest']}/s)",
    ])


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="aquila-mem-"))
    log(f"working in {root}; {load_avg()}")
    results = []
    try:
        variants: list[tuple[str, Path | None, dict[str, str]]] = [("", None, {})]
        if args.base or args.env_b:
            variants = [("worktree", None, {})]
        if args.base:
            variants.insert(0, ("base", args.base.resolve(), {}))
        if args.env_b:
            variants.append(("env_b", None, dict(kv.split("=", 1) for kv in args.env_b)))
        if args.churn:
            # With --base or --env-b: the base's node, the worktree's, the worktree's with
            # those variables, one churn after another.
            for name, code, extra in variants:
                results.append(await churn(args, root, name, code, extra))
                log(json.dumps(results[-1]))
        else:
            # The queries: held-out points of the same blobs (not stored).
            both = clustered(args.n + args.queries, args.dim, args.seed)
            x, q = both[:args.n], np.ascontiguousarray(both[args.n:])
            truth = await asyncio.to_thread(exact_truth, x, q)
            log(f"{len(x)} vectors and the exact answers of {len(q)} queries ready")
            # With --base or --env-b, per type: the base's node, the worktree's, the
            # worktree's with those variables (one at a time).
            for itype in args.types.split(","):
                for name, code, extra in variants:
                    r = await one_type(args, itype, x, q, truth, root, name, code, extra)
                    log(json.dumps(r))
                    results.append(r)
    finally:
        if not args.keep:
            await asyncio.to_thread(shutil.rmtree, root, True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--types", "--index", default="ivf_flat,ivf_sq8",
                   help="index types, comma-separated")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--search-s", type=float, default=15.0)
    p.add_argument("--settings", type=parse_settings,
                   default=parse_settings("nprobe=8,nprobe=16,nprobe=64,recall=0.9,recall=0.95"),
                   help="search settings measured: nprobe=N and recall=R, comma-separated")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--settle-timeout", type=float, default=4 * 3600.0)
    p.add_argument("--settle-by", metavar="HH:MM",
                   help="wait for the training no later than this time of day (UTC)")
    p.add_argument("--ingest-by", metavar="HH:MM",
                   help="stop the ingest at this time of day (UTC) and measure the rows "
                        "written (a prefix of the N; the result says so)")
    p.add_argument("--unsettled-ok", action="store_true",
                   help="once --settle-timeout/--settle-by has passed with every row written "
                        "but a training still running or due, measure the node with the "
                        "index it has (the result says so) instead of failing")
    p.add_argument("--snapshot-interval", type=float, default=5.0)
    p.add_argument("--no-faiss-ref", dest="faiss_ref", action="store_false",
                   help="skip the in-process FAISS reference")
    p.add_argument("--snapshot-wait", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--churn", type=float, default=0.0, help="seconds of churn (churn mode)")
    p.add_argument("--churn-live", type=int, default=50_000)
    p.add_argument("--churn-dim", type=int, default=50)
    p.add_argument("--churn-searchers", type=int, default=4,
                   help="churn: clients searching meanwhile, one search at a time each")
    p.add_argument("--churn-sample", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--churn-parts", type=int, default=0, metavar="K",
                   help="churn: every K-th sample also reads glibc's and Python's own figures "
                        "(malloc_info, the arenas; gdb stops the node for a moment). For "
                        "diagnosis, not for the goal's figure: a stop of 5 s or more (under "
                        "load) is a pause in the writes, which starts an index lists "
                        "compaction and its cache shed; and malloc_info called while the "
                        "stopped thread held an arena's lock hangs the node")
    p.add_argument("--churn-deletes", type=int, default=10**12,
                   help="end the churn once this many documents are deleted (or at --churn s)")
    p.add_argument("--tombstone-grace-s", type=float, default=0.0,
                   help="churn: the node's tombstone grace period and anti-entropy interval "
                        "(0: the node's defaults, a day and 30 s: nothing purged in a run)")
    p.add_argument("--rocksdb-memory-mib", type=int, default=0,
                   help="the node's AQUILA_ROCKSDB_MEMORY_MIB (0: its default)")
    p.add_argument("--attach", type=int, default=0, metavar="PID",
                   help="go on with a node a lost run started (one type), from --first-row")
    p.add_argument("--first-row", type=int, default=0)
    p.add_argument("--pause-at", type=int, default=0, metavar="N",
                   help="ingest N rows, wait until they are trained, then the rest (a "
                        "retraining beside the ingest, as in a long bulk load)")
    p.add_argument("--base", type=Path,
                   help="also run the node of the code in DIR (DIR/node, DIR/cluster: `git "
                        "archive main node cluster | tar -x -C DIR`), before the worktree's, "
                        "per type")
    p.add_argument("--env-b", nargs="*", metavar="KEY=VALUE",
                   help="also run the worktree's node with these environment variables")
    p.add_argument("--trim-probe", action="store_true",
                   help="after the figures at rest, call malloc_trim(0) in the node (gdb) "
                        "and report the RSS it gave back")
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--keep", action="store_true")
    return p.parse_args(argv)


def table(results: list[dict[str, Any]]) -> str:
    """The per-type figures as a text table (what `bench.py --synthetic N --types ...`
    prints)."""
    lines = []
    for r in results:
        if "type" not in r:
            continue
        lines.append(f"{r['type']} {r.get('variant', '')} n={r['n']:,} dim={r['dim']}  "
                     f"({r.get('uptime', '')})")
        lines.append(f"  ingest {r.get('ingest_docs_per_s', 0):,} docs/s; trained "
                     f"{r.get('settled_after_ingest_s')} s after the last write "
                     f"(nlist {r.get('nlist')}, trained on {r.get('trained_at')}; "
                     f"index compactions {r.get('compactions')})")
        if r.get("unsettled"):
            lines.append(f"  NOT SETTLED when measured: {r['unsettled']}")
        lines.append(f"  RSS {r.get('rss_mib')} MiB = {r.get('rss_over_raw')}x raw after ingest; "
                     f"{r.get('rss_mib_after_restart')} MiB = "
                     f"{r.get('rss_after_restart_over_raw')}x after a restart; peaks "
                     f"{r.get('rss_peak_mib')}; disk {r.get('disk_over_raw')}x raw")
        for key in ("parts_fresh", "parts", "parts_after_search", "parts_after_restart"):
            if r.get(key):
                lines.append(f"  {key}: {r[key]}")
        if r.get("heap_bytes_per_vector_after_restart"):
            lines.append(f"  C heap in use per vector after a restart (a fresh node's and the "
                         f"block cache off): {r['heap_bytes_per_vector_after_restart']} bytes")
        for q in r.get("search", []):
            what = (f"nprobe {q['nprobe']}" if "nprobe" in q
                    else f"recall {q['recall']} (nprobe {q.get('nprobe_used')})")
            lines.append(f"  {what:<28} recall@10 {q['recall_at_10']:.4f}  "
                         f"{q['qps']:>6,} q/s  p99 {q['p99_ms']} ms")
        for sig in ("SIGKILL", "SIGTERM"):
            rs = r.get(f"restart_{sig}")
            if rs:
                lines.append(f"  restart after {sig}: ready {rs['ready_s']} s, first search "
                             f"{rs['first_search_s']} s (stop {rs['stop_s']} s)")
        if r.get("faiss_qps"):
            lines.append(f"  in-process FAISS ivf_flat nprobe {r.get('rest_nprobe', '')}: "
                         f"{r['faiss_qps']:,} q/s; REST/FAISS {r.get('rest_over_faiss')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def main() -> int:
    args = parse_args()
    results = run(args)
    print(json.dumps(results, indent=1))
    print(table(results))
    for r in results:
        if "deleted" in r:
            print(churn_table(r))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())

"""Crash an engine operation at a chosen step, for real: `python -m tests.crash_points DATA
SCENARIO K` opens the engine on DATA, then runs SCENARIO's operation with every file-system
step (rename, replace, mkdir, rmdir, unlink, fsync) and every store step (open, write,
drop_shard, put_meta) counted, and SIGKILLs itself just before step K. Run to the end (K past
the last step), it prints the steps it made and exits without closing anything.

The parent (tests/test_crash_safety.py) prepares DATA with `prepare`, and reads what a restart
finds with `observe`: it must be the state before the operation or the state after it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from aquila.cluster.model.digests import BUCKETS, digests
from aquila.cluster.model.documents import Incoming
from aquila.cluster.model.spec import CollectionSpec, IndexSpec
from aquila.node.blocking import Blocking
from aquila.node.storage.collection import Collection, Tuning
from aquila.node.storage.engine import Engine
from aquila.node.storage.index import global_key
from aquila.node.storage.store import Store

SPEC = CollectionSpec("c", 4, "l2", 2, 1, IndexSpec("flat"))
OTHER = CollectionSpec("other", 4, "ip", 1, 1, IndexSpec("flat"))
SCENARIOS = ("create", "drop", "recreate", "drop_shard", "add_shard", "write_and_snapshot",
             "purge", "reuse", "release", "purge_released", "revive")
# Tombstones below this version are purged by the purge scenarios.
PURGE_BEFORE = 10


def doc(i: int, version: int = 1) -> Incoming:
    return Incoming(f"d{i}", np.full(4, float(i), np.float32), orjson.dumps({"i": i}), version, "n1")


def engine_on(data: Path, blocking: Blocking) -> Engine:
    return Engine(data, blocking, Tuning(), fsync=True)


async def prepare(scenario: str, data: Path) -> None:
    """The state before the operation: `other` always, `c` unless the operation creates it."""
    blocking = Blocking(2)
    engine = engine_on(data, blocking)
    try:
        await engine.start()
        other = await engine.ensure(OTHER, [0], "o1")
        await other.write({0: [doc(i) for i in range(5)]})
        if scenario != "create":
            shards = [0] if scenario == "add_shard" else [0, 1]
            coll = await engine.ensure(SPEC, shards, "u1")
            await coll.write({s: [doc(i) for i in range(s * 10, s * 10 + 6)] for s in shards})
            await coll.write({0: [Incoming("d1", None, b"", 2, "n1")]})
            if scenario in ("purge", "reuse", "release", "purge_released", "revive"):
                # Tombstones a snapshot covers (the close's, if not this one), their labels
                # held (the snapshot alone, not the release that follows `snapshot()`).
                await coll.write({0: [Incoming(f"d{i}", None, b"", 2, "n1") for i in (2, 4)]})
                await coll._save()
            if scenario in ("purge_released", "revive"):  # their labels released
                assert await coll.release_labels() == 3
            if scenario == "reuse":  # their labels free
                assert await coll.purge_tombstones(0, PURGE_BEFORE) == 3
        await engine.close()
    finally:
        blocking.close()


async def operate(scenario: str, engine: Engine) -> None:
    if scenario == "create":
        await engine.ensure(SPEC, [0, 1], "u1")
    elif scenario == "drop":
        await engine.drop("c")
    elif scenario == "recreate":
        await engine.ensure(SPEC, [0, 1], "u2")
    elif scenario == "drop_shard":
        await engine.drop_shard("c", 1)
    elif scenario == "add_shard":
        await engine.ensure(SPEC, [0, 1], "u1")
    elif scenario == "write_and_snapshot":
        coll = engine.get("c")
        await coll.write({0: [doc(100), Incoming("d2", None, b"", 5, "n1")], 1: [doc(101)]})
        await coll._save()  # (not the release after it: see "release")
    elif scenario == "release":  # the covered tombstones' labels released
        assert await engine.get("c").release_labels() == 3
    elif scenario == "purge_released":  # tombstones holding no label purged: none freed
        assert await engine.get("c").purge_tombstones(0, PURGE_BEFORE) == 3
    elif scenario == "revive":
        # d2 revived (its tombstone has no label: it takes a free one), d1 deleted again
        # (a tombstone of no label stays so), an unknown id deleted (no label given), a new
        # document (the last free label), then a snapshot (which releases nothing).
        coll = engine.get("c")
        await coll.write({0: [doc(2, 3), Incoming("d1", None, b"", 3, "n1"),
                              Incoming("d77", None, b"", 3, "n1"), doc(300)]})
        await coll.snapshot()
    elif scenario == "purge":
        assert await engine.get("c").purge_tombstones(0, PURGE_BEFORE) == 3
    elif scenario == "reuse":  # new documents take the free labels, one more is minted
        coll = engine.get("c")
        await coll.write({0: [doc(i) for i in range(200, 204)]})
        await coll.snapshot()
    else:
        raise ValueError(scenario)


async def observe(data: Path) -> dict[str, Any]:
    """What a restart finds: per collection its incarnation, its shards and their records,
    its index's size (which must equal its live documents), and the shards its store has
    keys of (which must be the shards it holds). Per shard too, its labels: each record's,
    the free ones and the next to mint; every label below that is either a record's or free,
    never both, and the index holds exactly the live records' labels."""
    blocking = Blocking(2)
    engine = engine_on(data, blocking)
    try:
        await engine.start()
        out: dict[str, Any] = {}
        for name, coll in sorted(engine.collections.items()):
            records = {}
            for s in sorted(coll.shards):
                page, _ = await coll.stream_shard(s, None, 1000)
                records[s] = [(d.id, d.version, d.vector is None, d.metadata.decode())
                              for d in page]
            live = sum(not dead for rs in records.values() for _, _, dead, _ in rs)
            assert coll.count() == live == coll.index.ntotal, (name, coll.count(), live)
            labels = {s: await blocking.write(_labels, coll, s) for s in sorted(coll.shards)}
            indexed = sorted(coll.index.all_keys().tolist())
            assert indexed == sorted(global_key(s, lab) for s, ls in labels.items()
                                     for lab, dead in ls["records"].values() if not dead)
            present = await blocking.write(coll.store.shards_present)
            assert present <= set(coll.shards), (name, present, coll.shards)
            out[name] = {"uid": coll.uid, "shards": sorted(coll.shards), "records": records,
                         "labels": labels}
        await engine.close()
        return out
    finally:
        blocking.close()


def _labels(coll: Collection, s: int) -> dict[str, Any]:
    """A shard's labels as stored, checked against each other and against its memory."""
    records = {d: (r.label, r.tombstone) for d, r in coll.store.iter_docs(s)}
    free = coll.store.free_labels(s).tolist()
    shard = coll.shards[s]
    # Label 0: a tombstone's label released (no label), which no live record has.
    assert all(dead for lab, dead in records.values() if lab == 0), records
    held = {d: lab for d, (lab, _) in records.items() if lab != 0}
    used = sorted(held.values())
    assert sorted(used + free) == list(range(1, shard.next_label)), (used, free)
    assert sorted(shard.free.labels().tolist()) == free
    assert coll.store.ids_of_labels(s, used) == [
        d.encode() for d, _ in sorted(held.items(), key=lambda kv: kv[1])]
    # Every label key is a record's (none left of a released or purged label).
    assert [k for k, _ in coll.store._scan(b"L" + s.to_bytes(2, "big"))] == [
        b"L" + s.to_bytes(2, "big") + lab.to_bytes(8, "big") for lab in used]
    # The digests read back from the store (key G) are the records' (a batch's digests are
    # written with its records, never apart).
    scanned = [int(h, 16) for h in digests(
        ((d, r.version, r.writer) for d, r in coll.store.iter_docs(s)), BUCKETS)]
    assert shard.digests.tolist() == coll.store.digests(s, BUCKETS) == scanned
    return {"records": records, "free": free, "next": shard.next_label}


def count_steps(crash_at: int) -> list[str]:
    """Count every step from now on; SIGKILL this process just before step `crash_at`."""
    steps: list[str] = []
    lock = threading.Lock()

    def hook(owner: Any, name: str) -> None:
        orig: Callable[..., Any] = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        @functools.wraps(orig)
        def counted(*args: Any, **kwargs: Any) -> Any:
            with lock:
                if len(steps) == crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                steps.append(label)
            return orig(*args, **kwargs)

        setattr(owner, name, counted)

    for fn in ("rename", "replace", "mkdir", "rmdir", "unlink", "fsync"):
        hook(os, fn)
    for fn in ("open", "write", "drop_shard", "put_meta"):
        hook(Store, fn)
    return steps


async def child(data: Path, scenario: str, crash_at: int) -> list[str]:
    blocking = Blocking(2)
    engine = engine_on(data, blocking)
    await engine.start()
    steps = count_steps(crash_at)
    await operate(scenario, engine)
    return steps


def main() -> None:
    data, scenario, crash_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    steps = asyncio.run(child(data, scenario, crash_at))
    sys.stdout.write(orjson.dumps(steps).decode() + "\n")
    sys.stdout.flush()
    os._exit(0)  # as abruptly as a crash right after the operation: nothing closed


if __name__ == "__main__":
    main()

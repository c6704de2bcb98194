"""This node's collections: create, open at start, drop, and the periodic snapshots."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import orjson

from cluster.errors import NotFound
from cluster.spec import CollectionSpec
from node.blocking import Blocking
from node.collection import Collection, Tuning
from node.files import write_atomic
from node.paths import collection_dir

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, data_dir: Path, blocking: Blocking, tuning: Tuning, fsync: bool) -> None:
        self.root = data_dir / "collections"
        self.blocking = blocking
        self.tuning = tuning
        self.fsync = fsync
        self.collections: dict[str, Collection] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Open every collection found on disk with all the shards it holds."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.iterdir()):
            meta = path / "spec.json"
            if not meta.exists():
                # A create or drop interrupted by a crash: nothing acknowledged lives here.
                await self.blocking.write(shutil.rmtree, path, True)
                continue
            raw = orjson.loads(meta.read_bytes())
            spec = CollectionSpec.from_json(raw["spec"])
            coll = self._new(spec)
            coll.uid = str(raw.get("uid", ""))
            await coll.open(raw["shards"])
            self.collections[spec.name] = coll
            log.info("opened %s: %d documents", spec.name, coll.count())

    def _new(self, spec: CollectionSpec) -> Collection:
        root = collection_dir(self.root, spec.name)
        return Collection(spec, root, self.blocking, self.tuning, self.fsync)

    def get(self, name: str) -> Collection:
        coll = self.collections.get(name)
        if coll is None:
            raise NotFound(f"collection {name!r} does not exist")
        return coll

    def _write_meta(self, coll: Collection, shards: list[int]) -> None:
        # Written last, atomically: a directory without it is an unfinished create.
        meta = {"spec": coll.spec.to_json(), "shards": shards, "uid": coll.uid}
        write_atomic(coll.root / "spec.json", orjson.dumps(meta))

    async def ensure(self, spec: CollectionSpec, shards: Iterable[int], uid: str) -> Collection:
        """Open these shards of the collection here, creating it when new. A collection of the
        same name with other settings is a deleted-and-recreated one: its old data goes.
        Serialised: concurrent moves onto this node may ensure the same collection at once."""
        wanted = sorted(set(shards))
        async with self._lock:
            coll = self.collections.get(spec.name)
            if coll is not None and (coll.spec != spec or coll.uid != uid):
                await self._drop_locked(spec.name)
                coll = None
            if coll is None:
                coll = self._new(spec)
                coll.uid = uid
                await coll.open(wanted)
                self._write_meta(coll, wanted)
                self.collections[spec.name] = coll
                return coll
            missing = [s for s in wanted if s not in coll.shards]
            for s in missing:
                await coll.add_shard(s)
            if missing:
                self._write_meta(coll, sorted(coll.shards))
            return coll

    async def drop_shard(self, name: str, shard: int) -> None:
        coll = self.collections.get(name)
        if coll is None or shard not in coll.shards:
            return
        async with self._lock:
            await coll.drop_shard(shard)
            self._write_meta(coll, sorted(coll.shards))

    async def drop(self, name: str) -> None:
        async with self._lock:
            await self._drop_locked(name)

    async def _drop_locked(self, name: str) -> None:
        coll = self.get(name)
        del self.collections[name]
        (coll.root / "spec.json").unlink(missing_ok=True)
        await coll.destroy()

    async def snapshot_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for coll in list(self.collections.values()):
                try:
                    await coll.snapshot()
                except Exception:
                    log.exception("snapshot of %s failed", coll.spec.name)

    async def close(self) -> None:
        for coll in list(self.collections.values()):
            await coll.close()
        self.collections.clear()

"""This node's collections: create, open at start, drop, and the periodic snapshots.

On disk, `collections/<name>/` holds one collection (`spec.json`, its store, its index
snapshot). Creating and dropping one are made crash-safe by renames, each atomic and followed
by a directory fsync, so that a crash at any point leaves the old state or the new one:

- create: `collections/.creating-<token>/spec.json` is written whole, then the folder is renamed
  to its name (the commit point), and the store is created in it;
- drop: the folder is renamed to `collections/.dropping-<token>` (the commit point), then
  removed;
- re-create (another incarnation of the same name): the new one is staged, the old one renamed
  away, the staged one renamed into place.

At start, `.dropping-*` folders are removed; a `.creating-*` folder whose spec names a
collection without a folder is renamed into place (a re-create interrupted between its two
renames), any other is removed. Nothing else is ever deleted: a folder that is not a
collection is logged and left alone, and one in the way of a create is moved aside to
`collections/.lost-<name>-<token>`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from aquila.cluster.clock import Clock
from aquila.cluster.model.errors import NotFound
from aquila.cluster.model.spec import NAME_RE, CollectionSpec
from aquila.node.blocking import Blocking
from aquila.node.files import fsync_dir, remove_stale_temps, write_atomic
from aquila.node.storage.collection import SPEC_FILE, Collection, Tuning, meta_bytes
from aquila.node.storage.heap import import_early, limit_arenas
from aquila.node.storage.index import without_interrupt_checks
from aquila.node.storage.paths import collection_dir
from aquila.node.storage.store import RocksMemory

log = logging.getLogger(__name__)

CREATING = ".creating-"
DROPPING = ".dropping-"
LOST = ".lost-"


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's spec.json, None when it has none (`write_atomic` leaves it whole or
    absent; one that does not parse is damage, and raises)."""
    try:
        raw = (folder / SPEC_FILE).read_bytes()
    except FileNotFoundError:
        return None
    meta = orjson.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError(f"{folder / SPEC_FILE} is not a JSON object")
    return meta


def _token() -> str:
    return secrets.token_hex(8)


def _remove(path: Path) -> None:
    # A symbolic link is removed, not what it points to (which is outside the data folder).
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


class Engine:
    def __init__(self, data_dir: Path, blocking: Blocking, tuning: Tuning, fsync: bool) -> None:
        limit_arenas()
        import_early()
        without_interrupt_checks()
        self.root = data_dir / "collections"
        self.blocking = blocking
        self.tuning = tuning
        self.fsync = fsync
        # One RocksDB memory budget for every collection of the node.
        self.memory = RocksMemory(tuning.rocksdb_memory_bytes)
        self.collections: dict[str, Collection] = {}
        # Filtered-search planner paths taken, per shard and query, over every collection
        # (kept here so that dropping a collection does not take counts back).
        self.plan_counts: dict[str, int] = {}
        self._lock = asyncio.Lock()
        # Called with a collection's name and the seconds a training took (node metrics).
        self.on_trained: Callable[[str, float], None] | None = None

    async def start(self) -> None:
        """Finish or undo what a crash interrupted, then open every collection found on disk
        with all the shards it holds."""
        self.root.mkdir(parents=True, exist_ok=True)
        await self.blocking.write(remove_stale_temps, self.root.parent)
        await self.blocking.write(self._recover_sync)
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(LOST):
                log.warning("%s was in the way of a new collection; kept aside", path)
                continue
            raw = None
            if path.is_dir() and not path.name.startswith("."):
                raw = _read_meta(path)
            if raw is None:
                log.warning("%s is not a collection (no %s): left alone", path, SPEC_FILE)
                continue
            spec = CollectionSpec.from_json(raw["spec"])
            if spec.name != path.name:
                log.warning("%s holds collection %r: left alone", path, spec.name)
                continue
            coll = self._new(spec)
            coll.uid = str(raw.get("uid", ""))
            await coll.open(raw["shards"])
            self.collections[spec.name] = coll
            log.info("opened %s: %d documents", spec.name, coll.count())

    def _recover_sync(self) -> None:
        """Remove the drops' leftovers; roll interrupted re-creates forward and remove the
        other staging folders."""
        changed = False
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(DROPPING):
                log.info("removing %s, a dropped collection", path)
                _remove(path)
                changed = True
            elif path.name.startswith(CREATING):
                self._recover_created(path)
                changed = True
        if changed:
            fsync_dir(self.root)

    def _recover_created(self, staged: Path) -> None:
        try:
            meta = _read_meta(staged)
            name = meta["spec"]["name"] if meta is not None else None
        except (OSError, ValueError, KeyError, TypeError):
            name = None
        if isinstance(name, str) and NAME_RE.fullmatch(name):
            final = self.root / name  # a plain name: a direct child of the root
            if not os.path.lexists(final):
                log.info("finishing the interrupted creation of %s", name)
                os.rename(staged, final)
                return
        log.info("removing %s, an unfinished creation", staged)
        _remove(staged)

    def _new(self, spec: CollectionSpec) -> Collection:
        root = collection_dir(self.root, spec.name)
        coll = Collection(spec, root, self.blocking, self.tuning, self.fsync, self.plan_counts,
                          self.memory)
        if self.on_trained is not None:
            coll.on_trained = functools.partial(self.on_trained, spec.name)
        return coll

    def get(self, name: str) -> Collection:
        coll = self.collections.get(name)
        if coll is None:
            raise NotFound(f"collection {name!r} does not exist")
        return coll

    async def ensure(self, spec: CollectionSpec, shards: Iterable[int], uid: str) -> Collection:
        """Open these shards of the collection here, creating it when new. A collection of the
        same name with other settings is a deleted-and-recreated one: its old data goes.
        Serialised: concurrent moves onto this node may ensure the same collection at once."""
        wanted = sorted(set(shards))
        async with self._lock:
            coll = self.collections.get(spec.name)
            if coll is None or coll.spec != spec or coll.uid != uid:
                return await self._create_locked(spec, wanted, uid)
            missing = [s for s in wanted if s not in coll.shards]
            if missing:
                await coll.add_shards(missing)
            return coll

    async def _create_locked(self, spec: CollectionSpec, shards: list[int], uid: str) -> Collection:
        staged = await self.blocking.write(self._stage_sync, spec, uid, shards)
        old = self.collections.pop(spec.name, None)
        if old is not None:
            await old.close(snapshot=False)
        await self.blocking.write(self._swap_sync, spec.name, staged, old is not None)
        coll = self._new(spec)
        coll.uid = uid
        try:
            await coll.open(shards)
        except BaseException:
            # Nothing was ever written to it: take the new folder away again.
            await coll.close(snapshot=False)
            await self.blocking.write(self._discard_sync, coll.root)
            raise
        self.collections[spec.name] = coll
        return coll

    def _stage_sync(self, spec: CollectionSpec, uid: str, shards: list[int]) -> Path:
        """A folder holding the new collection's spec.json, whole and durable, under a name
        that is no collection's."""
        staged = self.root / f"{CREATING}{_token()}"
        staged.mkdir()
        write_atomic(staged / SPEC_FILE, meta_bytes(spec, uid, shards))
        fsync_dir(self.root)
        return staged

    def _swap_sync(self, name: str, staged: Path, replacing: bool) -> None:
        """Put the staged folder in place of the old incarnation's (if any): the old one
        renamed away first (at start a staged folder without a collection folder is rolled
        forward), then the staged one renamed into place; the old one then removed."""
        final = collection_dir(self.root, name)
        trash: Path | None = None
        if os.path.lexists(final):
            if replacing:
                trash = self.root / f"{DROPPING}{_token()}"
                os.rename(final, trash)
            else:
                # Not a collection this node holds (see `start`): kept, out of the way.
                aside = self.root / f"{LOST}{name}-{_token()}"
                log.warning("%s is in the way of a new collection: moved to %s", final, aside)
                os.rename(final, aside)
        os.rename(staged, final)
        fsync_dir(self.root)
        if trash is not None:
            _remove(trash)

    def _discard_sync(self, folder: Path) -> None:
        """Drop a collection's folder: renamed away first, so that a crash while it is
        being removed leaves no half-removed collection behind, only a folder `start`
        removes."""
        if not os.path.lexists(folder):
            return
        trash = self.root / f"{DROPPING}{_token()}"
        os.rename(folder, trash)
        fsync_dir(self.root)
        _remove(trash)

    async def drop_shard(self, name: str, shard: int) -> None:
        async with self._lock:
            # Looked up under the lock: a collection re-created meanwhile is another one,
            # whose folder the old one's record must not be written into.
            coll = self.collections.get(name)
            if coll is not None and shard in coll.shards:
                await coll.drop_shard(shard)

    async def drop(self, name: str) -> None:
        async with self._lock:
            coll = self.get(name)
            del self.collections[name]
            await coll.close(snapshot=False)
            await self.blocking.write(self._discard_sync, coll.root)

    async def snapshot_loop(self, interval_s: float, clock: Clock) -> None:
        while True:
            await clock.sleep(interval_s)
            for coll in list(self.collections.values()):
                try:
                    await coll.snapshot()
                except Exception:
                    log.exception("snapshot of %s failed", coll.spec.name)

    async def close(self) -> None:
        for coll in list(self.collections.values()):
            await coll.close()
        self.collections.clear()

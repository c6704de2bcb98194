"""The node's memory beside its indexes. The C heap (glibc's malloc, through ctypes;
elsewhere those functions do nothing): how many arenas threads spread over, which blocks are
mapped apart, giving free pages back to the system, and malloc's own figures. And RocksDB's
block and row caches, emptied of what a bulk load left in them.

`trim()` walks every arena under its lock (milliseconds to tens of them on a heap of
gigabytes), `shed_blocks()` every block of the cache: call them on a worker thread, never on
the event loop."""

from __future__ import annotations

import ctypes
import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aquila.node.storage.store import RocksMemory

# glibc's mallopt parameters. M_ARENA_MAX: how many heaps (arenas) threads may spread their
# allocations over; each keeps the memory freed in it. FAISS, RocksDB and the node's thread
# pools would otherwise get up to eight a core. M_MMAP_THRESHOLD: blocks from this size up are
# mapped apart and given back whole when freed. Set, it stays fixed; left alone glibc raises
# it to the largest block freed so far (up to 32 MiB), after which the write path's request
# buffers, RocksDB's memtable blocks and training's chunks are carved from the heaps, between
# blocks that live on, and what they leave is kept (RSS after a bulk load well above the same
# node restarted).
_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 10
# How many arenas. Two since the start of issue 14's work. One was tried against churn: the
# heap's resident pages then stayed nearer what is in use (7 MiB above it after 4.8M deletes,
# 17 MiB with two after 4.3M), but RSS moved no less (growth after the first minute 0.178
# against 0.173 over 5M deletes, `bench_memory.py --churn 1200 --churn-deletes 5000000
# --base`), and after a bulk load with a compaction it held more: not kept.
ARENAS = 2


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library's functions, through the process's own symbols: no lookup by name
    (`ctypes.util.find_library` runs `ldconfig -p` in a child process, a fork of the whole
    node each time, which held the event loop for half a second on a busy machine)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 on
        libc.mallinfo2.restype = _Mallinfo2
        libc.mallinfo2.argtypes = []
    return libc


def limit_arenas(arenas: int = ARENAS) -> None:
    """Fewer malloc arenas: memory freed by one thread is reused by the next instead of
    staying behind in an arena of its own; large blocks always mapped apart (glibc only;
    elsewhere nothing). Arenas made before the call stay: call it before threads start."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, arenas)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


# Modules the node would otherwise import in the middle of a bulk load: numpy's random
# generators at the first training (0.2 MiB of Python objects), numpy.ma at the first removal
# from an index (1 MiB: `np.unique` asks `np.ma.is_masked`, and numpy 2 imports numpy.ma on
# first use; so do `np.isin` and `np.setdiff1d` through it). Their objects, which live as long
# as the process, then sit in Python's small-object arenas among the load's temporaries and
# keep those arenas (1 MiB each, given back only once empty) resident after it: numpy.ma's
# kept 6 arenas holding 1.1 MiB of objects after 200k `ivf_sq8` (`bench_arenas.py`).
LATE_MODULES = ("numpy.random", "numpy.ma")


def import_early() -> None:
    """Import `LATE_MODULES` now (at the node's start, before any write)."""
    for name in LATE_MODULES:
        importlib.import_module(name)


def trim() -> bool:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim(0)`: the top of
    every arena and the whole free pages inside them): a training or a bulk load frees
    hundreds of megabytes in blocks that glibc would otherwise keep for later, counted in
    the node's RSS. True when something was given back. Blocking: on a worker thread."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def malloc_figures() -> dict[str, int]:
    """Bytes by glibc's `mallinfo2()`: `heap` the arenas' memory from the system (mapped
    blocks apart), `mapped` the blocks mapped apart, `in_use` what is allocated from the
    arenas, `free` what they hold free (what a trim may give back, at page granularity),
    `releasable` the free top of the main heap. Empty where there is no mallinfo2."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    m = libc.mallinfo2()
    return {"heap": int(m.arena), "mapped": int(m.hblkhd), "in_use": int(m.uordblks),
            "free": int(m.fordblks), "releasable": int(m.keepcost)}


def malloc_info() -> str:
    """glibc's `malloc_info()` (XML: every arena's sizes and free chunks), or "" where there
    is none."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_info") or not hasattr(libc, "open_memstream"):
        return ""
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p),
                                    ctypes.POINTER(ctypes.c_size_t)]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return ""
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    try:
        return ctypes.string_at(buf, size.value).decode()
    finally:
        libc.free(ctypes.cast(buf, ctypes.c_void_p))


def shed_blocks(memory: RocksMemory) -> None:
    """Drop every block RocksDB's block cache holds that no reader holds now (the pinned top
    levels of indexes and filters, and the memtables' charges, stay), then give the cache
    its capacity back. After a bulk load the cache is full of what the write path's
    look-ups read (index and filter partitions of table files compactions will rewrite, and
    the data blocks their filters' false positives read: 18-27 MiB after 1M documents),
    none of which a search wants; so is the row cache, of the values those look-ups and a
    replay's reads found (8 MiB, all of its share, after 1M documents). Blocking: on a
    worker thread."""
    for cache, capacity in ((memory.cache, memory.block_capacity),
                            (memory.rows, memory.row_capacity)):
        cache.set_capacity(0)
        cache.set_capacity(capacity)

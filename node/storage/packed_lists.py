"""The inverted lists of a fast-scan IVF index (ivf_pq: FAISS's `IndexIVFPQFastScan`, 4-bit
codes), read and written by the node itself.

FAISS keeps such a list's codes packed in blocks of `nvec` (32) entries, each code's 4-bit
sub-codes scattered over the block so that SIMD compares 32 codes at once. Its own `add_core`
(with the node's coarse assignment) writes codes unpacked, which a packed list misreads, and
no Python call packs a range of codes. Here every sub-code of every slot of a block has its
byte and its shift in the block (`nibble_map`, read off FAISS's own `CodePacker` once per
layout), so codes are gathered and scattered with numpy: a list's entries are appended,
moved into holes and read back for decoding, as `VectorIndex` does with plain lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MAPS: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}


def is_packed(index: Any, faiss: Any) -> bool:
    """Whether this FAISS index keeps block-packed lists (a fast-scan IVF index)."""
    return isinstance(index, faiss.IndexIVFFastScan)


def repair(index: Any, faiss: Any) -> Any:
    """A fast-scan index as FAISS 1.15.1 reads it back lacks the pointer to its own product
    quantizer that decoding uses (`sa_decode` crashes): set it again. Other indexes pass."""
    if is_packed(index, faiss) and index.fine_quantizer is None:
        index.fine_quantizer = index.pq
    return index


def nibble_map(index: Any, faiss: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per slot of a block (nvec) and per 4-bit sub-code of a code (2·code_size, low half of
    each code byte first, as FAISS's flat codes hold them): the byte of the block holding it
    and its shift (0 or 4). Made by packing one sub-code at a time with FAISS's packer."""
    lists = faiss.downcast_InvertedLists(index.invlists)
    key = (int(lists.n_per_block), int(lists.block_size), int(index.code_size))
    hit = _MAPS.get(key)
    if hit is not None:
        return hit
    packer = lists.packer  # the lists' own (a new one from the index would never be freed)
    nvec, block_size, code_size = int(packer.nvec), int(packer.block_size), int(packer.code_size)
    if (nvec, block_size, code_size) != key:
        raise RuntimeError("unexpected fast-scan code layout")
    where = np.zeros((nvec, 2 * code_size), dtype=np.int64)
    shift = np.zeros((nvec, 2 * code_size), dtype=np.uint8)
    block = np.zeros(block_size, dtype=np.uint8)
    code = np.zeros(code_size, dtype=np.uint8)
    for slot in range(nvec):
        for t in range(2 * code_size):
            block[:] = 0
            code[:] = 0
            code[t // 2] = 0x0F << (4 * (t % 2))
            packer.pack_1_c(faiss.swig_ptr(code), slot, faiss.swig_ptr(block))
            at = np.flatnonzero(block)
            if len(at) != 1 or int(block[at[0]]) not in (0x0F, 0xF0):
                raise RuntimeError("unexpected fast-scan code layout")
            where[slot, t] = at[0]
            shift[slot, t] = 0 if block[at[0]] == 0x0F else 4
    _MAPS[key] = (where, shift)
    return where, shift


class PackedLists:
    """The block-packed lists of one fast-scan index."""

    def __init__(self, index: Any, faiss: Any) -> None:
        self.faiss = faiss
        self.inv = index.invlists
        lists = faiss.downcast_InvertedLists(self.inv)
        self.nvec = int(lists.n_per_block)
        self.block_size = int(lists.block_size)
        self.code_size = int(index.code_size)
        self.where, self.shift = nibble_map(index, faiss)

    def _blocks(self, no: int, n: int) -> np.ndarray:
        """A view of list `no`'s packed codes (`n` entries, whole blocks)."""
        nbytes = -(-n // self.nvec) * self.block_size
        if not nbytes:
            return np.zeros(0, np.uint8)
        view: np.ndarray = self.faiss.rev_swig_ptr(self.inv.get_codes(no), nbytes)
        return view

    def _slots(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per position and sub-code, the byte of the list's codes and the shift."""
        pos = np.asarray(pos, dtype=np.int64)
        slot = pos % self.nvec
        at = (pos // self.nvec)[:, None] * self.block_size + self.where[slot]
        return at, self.shift[slot]

    def read(self, no: int, n: int, pos: np.ndarray) -> np.ndarray:
        """The flat codes (len(pos) × code_size) at these positions of list `no` (`n`
        entries)."""
        at, sh = self._slots(pos)
        nib = (self._blocks(no, n)[at] >> sh) & 0x0F
        out: np.ndarray = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
        return out

    def _write(self, blocks: np.ndarray, pos: np.ndarray, codes: np.ndarray) -> None:
        at, sh = self._slots(pos)
        nib = np.empty(at.shape, dtype=np.uint8)
        nib[:, 0::2] = codes & 0x0F
        nib[:, 1::2] = codes >> 4
        # Each byte holds one sub-code at shift 0 and one at shift 4: one pass per shift
        # writes every byte at most once.
        for s in (0, 4):
            pick = sh == s
            bytes_at = at[pick]
            keep = np.uint8(0xF0 >> s)
            blocks[bytes_at] = (blocks[bytes_at] & keep) | (nib[pick] << np.uint8(s))

    def append(self, no: int, ids: np.ndarray, codes: np.ndarray) -> None:
        """Add entries (FAISS ids, flat codes) at the end of list `no`."""
        n0 = int(self.inv.list_size(no))
        n = n0 + len(ids)
        self.inv.resize(no, n)  # new blocks come zeroed
        self.faiss.rev_swig_ptr(self.inv.get_ids(no), n)[n0:] = ids
        self._write(self._blocks(no, n), np.arange(n0, n), codes)

    def fill(self, no: int, n: int, holes: np.ndarray, movers: np.ndarray, m: int) -> None:
        """List `no` (`n` entries) cut to its first `m`: the entries at `movers` (at or past
        `m`) take the places of `holes` (below `m`), ids and codes; the slots left past `m`
        in its last block are zeroed (FAISS may OR codes into them when it packs)."""
        blocks = self._blocks(no, n)
        if len(holes):
            own = self.faiss.rev_swig_ptr(self.inv.get_ids(no), n)
            own[holes] = own[movers]
            self._write(blocks, holes, self.read(no, n, movers))
        tail = np.arange(m, min(n, -(-m // self.nvec) * self.nvec))
        if len(tail):
            self._write(blocks, tail, np.zeros((len(tail), self.code_size), np.uint8))
        self.inv.resize(no, m)

"""The inverted lists of a fast-scan IVF index (ivf_pq: FAISS's `IndexIVFPQFastScan`, 4-bit
codes), read and written by the node itself.

FAISS keeps such a list's codes packed in blocks of `nvec` (32) entries, each code's 4-bit
sub-codes scattered over the block so that SIMD compares 32 codes at once. Its `add_core`
(which takes the node's coarse assignment) writes codes unpacked, which a packed list
misreads; its `remove_ids` scans every list. Here a code is put into its slot, read from it or
moved, by the lists' own `CodePacker` (one C call a code: it sets a slot's sub-codes, leaving
the other slots' alone), so the node appends, fills holes and decodes as it does with plain
lists. FAISS 1.15.1's own removal leaves the codes of the entries it cuts off in the list's
last block, and its add ORs new codes into such slots: the slots a removal here vacates are
zeroed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_packed(index: Any, faiss: Any) -> bool:
    """Whether this FAISS index keeps block-packed lists (a fast-scan IVF index)."""
    return isinstance(index, faiss.IndexIVFFastScan)


def repair(index: Any, faiss: Any) -> Any:
    """A fast-scan index as FAISS 1.15.1 reads it back lacks the pointer to its product
    quantizer that decoding follows (`sa_decode` crashed), and one it clones keeps the
    original's (freed with it): set to its own; its lists' packer too, should a reader leave
    it out. Other indexes pass as they are."""
    if is_packed(index, faiss):
        index.fine_quantizer = index.pq
        if faiss.downcast_InvertedLists(index.invlists).packer is None:
            index.init_code_packer()
    return index


class PackedLists:
    """The block-packed lists of one fast-scan index (use it while the index is current: it
    holds the lists' packer, which the index owns)."""

    def __init__(self, index: Any, faiss: Any) -> None:
        self.faiss = faiss
        self.inv = index.invlists
        lists = faiss.downcast_InvertedLists(self.inv)
        self.packer = lists.packer  # the lists' own (one from the index would never be freed)
        self.nvec = int(lists.n_per_block)
        self.code_size = int(index.code_size)
        if self.packer is None or int(self.packer.code_size) != self.code_size:
            raise RuntimeError("a fast-scan index without its code packer")

    def read(self, no: int, pos: np.ndarray) -> np.ndarray:
        """The flat codes (len(pos) × code_size) at these positions of list `no`."""
        out = np.empty((len(pos), self.code_size), dtype=np.uint8)
        block = self.inv.get_codes(no)
        unpack, ptr = self.packer.unpack_1_c, self.faiss.swig_ptr
        for i, p in enumerate(np.asarray(pos).tolist()):
            unpack(block, p, ptr(out[i]))
        return out

    def append(self, no: int, ids: np.ndarray, codes: np.ndarray) -> None:
        """Add entries (FAISS ids, flat codes) at the end of list `no`."""
        n0 = int(self.inv.list_size(no))
        n = n0 + len(ids)
        self.inv.resize(no, n)  # (its codes may move: their pointer is taken after)
        self.faiss.rev_swig_ptr(self.inv.get_ids(no), n)[n0:] = ids
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        block = self.inv.get_codes(no)
        pack, ptr = self.packer.pack_1_c, self.faiss.swig_ptr
        for i in range(len(ids)):
            pack(ptr(codes[i]), n0 + i, block)

    def fill(self, no: int, n: int, holes: np.ndarray, movers: np.ndarray, m: int) -> None:
        """List `no` (`n` entries) cut to its first `m`: the entries at `movers` (at or past
        `m`) take the places of `holes` (below `m`), ids and codes; the slots vacated in the
        list's last block are zeroed."""
        block = self.inv.get_codes(no)
        pack, unpack, ptr = self.packer.pack_1_c, self.packer.unpack_1_c, self.faiss.swig_ptr
        code = np.zeros(self.code_size, dtype=np.uint8)
        at = ptr(code)
        if len(holes):
            own = self.faiss.rev_swig_ptr(self.inv.get_ids(no), n)
            own[holes] = own[movers]
            for h, mv in zip(holes.tolist(), movers.tolist(), strict=True):
                unpack(block, mv, at)
                pack(at, h, block)
            code[:] = 0
        for p in range(m, min(n, -(-m // self.nvec) * self.nvec)):
            pack(at, p, block)
        self.inv.resize(no, m)

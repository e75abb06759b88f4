"""Stable per-layer K / V buffers that a batch's conditionings are placed in, by row range.

Every U-Net call reads, per cross-attention layer l, one K table and one V table [R, L, C_l]
(L = 77 x the batch's CLIP chunks; the engine keeps one arena per L);
sample b reads row `base[b] + step * stride[b]`. Concatenating a batch's conditionings into new
tables for every batch would hand the U-Net new tensors (new addresses, often a new R) each time:
a captured CUDA graph would need its own copy of all 32 tables, and torch.compile would see a new
shape. Instead the engine keeps one `KVArena` per (dtype, device, L): 16 K and 16 V buffers of
`capacity` rows that live as long as the engine. A conditioning is copied into a free row range
the first time a batch needs it and stays there while it is used (least recently used ranges are
reused first), so packing a batch computes indices only, and graphs captured once stay valid.

Capacity grows (by powers of two, at least 16 rows) only when a batch needs more rows than the
arena has; then the buffers are replaced, and whoever read the old ones (captured CUDA graphs)
sees new addresses and drops them (`cudagraph.tables_key`). Rows past a conditioning's range are never read.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch


def _round_up_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class KVArena:
    """16 K and 16 V buffers [capacity, L, C_l]; `place(conds)` -> each conditioning's first row."""

    def __init__(self, k_widths: list[int], v_widths: list[int], L: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.k_widths, self.v_widths, self.L = list(k_widths), list(v_widths), L
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        # id(cond) -> (weakref to cond, start, rows); order = least recently used first.
        self._slots: OrderedDict = OrderedDict()
        self.copies = 0  # conditionings copied in so far (a test / bench statistic)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _resident(self, c) -> tuple[int, int] | None:
        s = self._slots.get(id(c))
        if s is None or s[0]() is not c:  # a dead conditioning whose id was reused: not resident
            return None
        return s[1], s[2]

    def _free_ranges(self, keep: set) -> list[tuple[int, int]]:
        """Gaps between the ranges in `keep` (ids), as (start, length), in row order."""
        used = sorted((s[1], s[2]) for i, s in self._slots.items() if i in keep)
        gaps, pos = [], 0
        for start, n in used:
            if start > pos:
                gaps.append((pos, start - pos))
            pos = max(pos, start + n)
        if pos < self.capacity:
            gaps.append((pos, self.capacity - pos))
        return gaps

    def _allocate(self, n: int, keep: set) -> int | None:
        """First fit for `n` rows, evicting least recently used ranges not in `keep` as needed."""
        while True:
            for start, length in self._free_ranges(set(self._slots)):
                if length >= n:
                    return start
            victims = [i for i in self._slots if i not in keep]
            if not victims:
                return None
            del self._slots[victims[0]]

    def _grow(self, rows: int) -> None:
        """New, empty buffers of at least `rows` rows (the caller places its batch again)."""
        self.capacity = _round_up_pow2(rows)
        kw = dict(dtype=self.dtype, device=self.device)
        self.k = [torch.zeros((self.capacity, self.L, w), **kw) for w in self.k_widths]
        self.v = [torch.zeros((self.capacity, self.L, w), **kw) for w in self.v_widths]
        self._slots.clear()

    def place(self, conds: list) -> dict[int, int]:
        """Make every conditioning in `conds` (distinct objects with per-layer `.k` / `.v` lists of
        [S, L, C_l]) resident; returns {id(cond): first row}. Marks them most recently used."""
        lengths = {t.shape[1] for c in conds for t in c.k + c.v}
        if lengths - {self.L}:
            raise ValueError(f"KVArena holds L={self.L} keys per row; got conditionings with L={sorted(lengths)}")
        need = sum(c.k[0].shape[0] for c in conds)
        if need > self.capacity:
            self._grow(need)
        for i in [i for i, s in self._slots.items() if s[0]() is None]:  # conditionings freed since
            del self._slots[i]
        keep = {id(c) for c in conds}
        starts = {}
        for c in conds:
            hit = self._resident(c)
            if hit is None:
                n = c.k[0].shape[0]
                start = self._allocate(n, keep)
                if start is None:  # fragmented: lay out just this batch from row 0 (need <= capacity)
                    self._slots.clear()
                    return self.place(conds)
                for dst, src in zip(self.k + self.v, c.k + c.v):
                    dst[start:start + n].copy_(src)
                self._slots[id(c)] = (weakref.ref(c), start, n)
                self.copies += 1
                hit = (start, n)
            self._slots.move_to_end(id(c))
            starts[id(c)] = hit[0]
        return starts

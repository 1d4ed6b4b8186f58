"""Storage of one cache layer (or one group of its KV heads): the tensors a policy reads and shrinks.

Every per-token tensor is a buffer ``(B, H, capacity, ...)`` of which the first
``n`` slots are held. Slots are always in increasing position order, per
(batch, head), so "causal by slot" equals "causal by position" as long as the
queries being answered are the newest slots (they always are: ``attend`` runs
right after their keys were appended). Buffers:

* ``k``, ``v``: the keys and values (or, when quantised, their codes plus
  per-group ``low``/``step``; see :mod:`attnzoo.cache.quant`);
* ``pos``: the absolute position of each held token (``(B, H, n)`` int32:
  half the bytes of int64; differs between heads after per-head eviction);
* ``valid``: False for padding (created by the first ``append`` that passes a
  ``key_mask``);
* ``score``: attention mass each token received so far (``track_scores``);
* ``ck``: a compact copy of the keys in the ``compact`` dtype (e.g. bfloat16),
  kept only when that is narrower than the keys' dtype and the store is not
  quantised: selectors score every key each step, and a bf16 copy halves
  the bytes an fp32 score pass reads (:meth:`score_keys`); with ``compact=int8``
  the codes of :func:`attnzoo.cache.quant.encode_rows` (a quarter of fp32 K) plus
  ``cks``, their per-token scale.

Per-page metadata (``page`` slots a page): channel-wise key ``kmin``/``kmax``
in ``page_dtype`` (rounded outward when narrower than the keys),
updated on append for the touched pages only, recomputed on compaction.
``keep`` compacts to given slots and really frees memory: when the buffers are
much larger than what is kept, they are reallocated at the kept size. The first
append (a prompt) allocates exactly its tokens; later growth is geometric: a
quarter of the length (at least 16 slots) of spare capacity, so a decode loop
copies the cache once per ``n/4`` appended tokens (with 1/128, as before, every
``n/128``: 2.5-6 ms per token at 8K). ``nbytes`` counts the held slots (and
their pages' metadata): what the cache holds; ``allocated_nbytes`` counts the
buffers as allocated, the spare capacity (at most a quarter of the held slots,
never written before it is used) included. A store with ``align`` rounds its
capacity up to a multiple of it (a select policy's page or block).
"""

from __future__ import annotations

import math

import torch

from ..core import capped
from . import quant

#: dtype of the held tokens' positions (int32: a context of 2^31 tokens is far beyond any cache)
POS_DTYPE = torch.int32
#: growth of a non-empty store: ``total // SPARE`` spare slots (geometric: amortised O(1) copies per token)
SPARE = 4
#: the slack :mod:`attnzoo.cache.ragged` grows its packed regions by (``total // GROWTH`` slots)
GROWTH = 128


def _take(buf: torch.Tensor, idx: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """``buf[b, h, idx[b, h, i]]`` -> ``(B, H, m, ...)`` with one ``index_select`` over whole rows.

    ``torch.gather`` would need the index expanded over the trailing dims and
    moves one element at a time; selecting rows of the flattened buffer copies
    each token's D values as a block (several times faster on CPU). With
    ``unit > 1``, ``idx`` is runs of ``unit`` consecutive slots, each starting at
    a multiple of ``unit`` (whole pages or blocks), and the buffer's capacity a
    multiple of ``unit``: then each run is one row of ``unit·D`` values (the
    copy moves a few large blocks instead of many small ones).
    """
    B, H, cap = buf.shape[:3]
    m = idx.shape[-1]
    if unit > 1:
        idx = idx[..., ::unit] // unit
        cap //= unit
    rows = torch.arange(B * H, device=idx.device).view(B, H, 1) * cap
    flat = buf.reshape(B * H * cap, -1)
    return flat.index_select(0, (idx + rows).flatten()).view(B, H, m, *buf.shape[3:])


def round_out(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` in ``dtype`` rounded toward +inf (``up``) or -inf: the nearest value of ``dtype`` on that side of ``x``,
    so a bound stays a bound when stored narrower (bfloat16 page bounds: at most 2^-7 relative looser)."""
    r = x.to(dtype)
    if dtype == x.dtype or dtype.itemsize > x.dtype.itemsize:  # exact: a wider float holds every value
        return r
    wrong = r.to(x.dtype) < x if up else r.to(x.dtype) > x
    return torch.where(wrong, torch.nextafter(r, torch.full_like(r, math.inf if up else -math.inf)), r)


class Store:
    """Held tokens of a uniform group of KV heads (same count per batch element and head)."""

    def __init__(self, *, bits: int | None = None, group: int = 32, page: int | None = None,
                 track_scores: bool = False, compact: torch.dtype | None = None, align: int = 1,
                 page_dtype: torch.dtype = torch.float32) -> None:
        self.bits, self.group, self.page, self.track_scores = bits, group, page, track_scores
        #: dtype of the page bounds, rounded outward into it (:meth:`page_bounds`)
        self.page_dtype = page_dtype
        self.compact = compact
        #: capacities are multiples of this (a select policy's unit: :meth:`gather` copies whole units as rows)
        self.align = align
        self.buf: dict[str, torch.Tensor] = {}
        self.pages: dict[str, torch.Tensor] = {}
        self.n = 0
        self.dtype: torch.dtype | None = None

    # ------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        return next(iter(self.buf.values())).shape[2] if self.buf else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the held slots of every buffer and of their pages' metadata (spare capacity excluded)."""
        pages = math.ceil(self.n / self.page) if self.page else 0
        return (sum(self._slot_bytes(t) * self.n for t in self.buf.values())
                + sum(self._slot_bytes(t) * pages for t in self.pages.values()))

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of every buffer as allocated: :attr:`nbytes` plus the spare capacity of the last growth."""
        return sum(t.numel() * t.element_size() for t in (*self.buf.values(), *self.pages.values()))

    @staticmethod
    def _slot_bytes(t: torch.Tensor) -> int:
        """Bytes of one slot (or page) of a ``(B, H, capacity, ...)`` buffer."""
        return t[:, :, :1].numel() * t.element_size()

    @property
    def positions(self) -> torch.Tensor:
        """``(B, H, n)`` absolute positions of the held tokens."""
        return self.buf["pos"][:, :, : self.n]

    @property
    def valid(self) -> torch.Tensor | None:
        """``(B, H, n)`` False where a held slot is padding, or None when there is none."""
        return self.buf["valid"][:, :, : self.n] if "valid" in self.buf else None

    @property
    def scores(self) -> torch.Tensor:
        """``(B, H, n)`` accumulated attention mass (``track_scores`` stores only)."""
        return self.buf["score"][:, :, : self.n]

    # ------------------------------------------------------------ reads
    def keys(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Held keys of slots ``[start, stop)`` (a view for float storage, decoded when quantised)."""
        return self._read("k", start, self.n if stop is None else stop)

    def values(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._read("v", start, self.n if stop is None else stop)

    def _read(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self.bits is None:
            return self.buf[name][:, :, start:stop]
        return quant.decode(*(self.buf[name + s][:, :, start:stop] for s in ("", "_low", "_step")),
                            self.bits, self.group, self.dtype)

    def score_keys(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys of slots ``[start, stop)`` for scoring and their per-token scale: the compact copy when one is
        kept (int8 codes come with their scale ``(B, H, m)``; a float copy with None), else :meth:`keys`."""
        stop = self.n if stop is None else stop
        if "ck" in self.buf:
            scale = self.buf.get("cks")
            return self.buf["ck"][:, :, start:stop], None if scale is None else scale[:, :, start:stop]
        return self.keys(start, stop), None

    def gather(self, idx: torch.Tensor, unit: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at slots ``idx (B, H, m)`` (GQA-free: one index list per KV head).

        ``unit``: ``idx`` is whole units (runs of ``unit`` slots from multiples of ``unit``, e.g. quest's pages),
        copied one row per unit when the capacity is aligned to it (``align``).
        """
        unit = unit if unit > 1 and self.capacity % unit == 0 else 1
        return self._rows("k", idx, unit), self._rows("v", idx, unit)

    def gather_keys(self, idx: torch.Tensor) -> torch.Tensor:
        """Keys at slots ``idx (B, H, m)`` (a selection's scoring reads no values)."""
        return self._rows("k", idx, 1)

    def _rows(self, x: str, idx: torch.Tensor, unit: int) -> torch.Tensor:
        """Rows of ``x`` ("k" or "v") at ``idx``, dequantised when the store is quantised."""
        if self.bits is None:
            return _take(self.buf[x], idx, unit)
        return quant.decode(*(_take(self.buf[x + part], idx, unit) for part in ("", "_low", "_step")), self.bits,
                            self.group, self.dtype)

    # ------------------------------------------------------------ writes
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               key_mask: torch.Tensor | None = None) -> None:
        """Add ``n`` tokens at ``positions (n,)``; ``key_mask (B, n)`` False marks padding."""
        B, H, n = k.shape[:3]
        self.dtype = k.dtype
        rows: dict[str, torch.Tensor] = {}
        if self.bits is None:
            rows["k"], rows["v"] = k, v
        else:
            for x, t in (("k", k), ("v", v)):
                quant.check_group(t.shape[-1], self.group, self.bits, "key" if x == "k" else "value")
                rows[x], rows[x + "_low"], rows[x + "_step"] = quant.encode(t, self.bits, self.group)
        if self.bits is None and self.compact is not None and self.compact.itemsize < k.dtype.itemsize:
            if self.compact == torch.int8:
                rows["ck"], rows["cks"] = quant.encode_rows(k)
            else:
                rows["ck"] = k.to(self.compact)
        rows["pos"] = positions.to(POS_DTYPE).view(1, 1, n).expand(B, H, n)
        if key_mask is not None or "valid" in self.buf:
            if "valid" not in self.buf and self.buf:
                self.buf["valid"] = torch.ones_like(self.buf["pos"], dtype=torch.bool)
            mask = torch.ones(B, n, dtype=torch.bool, device=k.device) if key_mask is None else key_mask
            rows["valid"] = mask.view(B, 1, n).expand(B, H, n)
        if self.track_scores:
            rows["score"] = torch.zeros(B, H, n, dtype=torch.float32, device=k.device)
        self._reserve(self.n + n, rows)
        for name, r in rows.items():
            self.buf[name][:, :, self.n : self.n + n] = r
        n0, self.n = self.n, self.n + n
        self._update_pages(n0)

    def append_rows(self, k: torch.Tensor, v: torch.Tensor, start: int, check: bool) -> tuple[float, float] | None:
        """:meth:`append` of ``n`` tokens at positions ``start, start + 1, ...`` (no padding) in one C++ call,
        with ``check`` the scan of ``max |k|`` and ``max |v|`` first: returns them (``(0, 0)`` unchecked), and
        writes nothing when one is not finite. None, with nothing done, where it does not apply: a store with more
        than keys, values and positions (padding, a compact copy, scores, quantised), no room left (growth), not
        CPU float32/64 with unit last strides, or no extension. A decode step's append costs ~20 small tensor
        ops otherwise, and each costs more than the copy of one token."""
        n, kb = k.shape[2], self.buf.get("k")
        if (kb is None or self.buf.keys() != {"k", "v", "pos"} or self.n + n > self.capacity
                or kb.dtype != k.dtype or v.dtype != k.dtype or k.stride(3) != 1 or v.stride(3) != 1
                or not capped.applies(k, v)):
            return None
        if self.page:
            kmin = self.pages.get("kmin")
            if (kmin is None or self.page_dtype not in (torch.float32, torch.bfloat16)
                    or kmin.shape[2] * self.page < self.n + n):
                return None
        peaks = torch.ops.attnzoo.append_rows(k, v, kb, self.buf["v"], self.buf["pos"], self.pages.get("kmin"),
                                              self.pages.get("kmax"), self.n, start, self.page or 0, check)
        if math.isfinite(peaks[0]) and math.isfinite(peaks[1]):
            self.n += n
        return peaks[0], peaks[1]

    def _reserve(self, total: int, like: dict[str, torch.Tensor]) -> None:
        """Grow every buffer to hold ``total`` slots: exactly on the first append, then with
        ``total // SPARE`` (at least 16) spare slots, so appends are amortised O(1)."""
        if total <= self.capacity and set(like) <= set(self.buf):
            return
        if total <= self.capacity or self.n == 0:
            cap = max(total, self.capacity)
        else:
            cap = total + max(total // SPARE, 16)
        self._reallocate(cap, like)

    def _aligned(self, cap: int) -> int:
        return -(-cap // self.align) * self.align

    def _reallocate(self, cap: int, like: dict[str, torch.Tensor] | None = None) -> None:
        cap = self._aligned(cap)
        like = like or {}
        for name in set(self.buf) | set(like):
            ref = self.buf.get(name, like.get(name))
            new = ref.new_empty(*ref.shape[:2], cap, *ref.shape[3:])
            if name in self.buf:
                new[:, :, : self.n] = self.buf[name][:, :, : self.n]
            self.buf[name] = new

    def keep(self, idx: torch.Tensor, reserve: int = 1) -> None:
        """Compact to the slots ``idx (B, H, m)`` (sorted per row); frees memory beyond ``m + reserve``."""
        m = idx.shape[-1]
        kept = {name: _take(t, idx) for name, t in self.buf.items()}
        self.n = m
        if self.capacity > self._aligned(m + reserve):
            cap = self._aligned(m + reserve)
            self.buf = {name: t.new_empty(*t.shape[:2], cap, *t.shape[3:]) for name, t in kept.items()}
        for name, t in kept.items():
            self.buf[name][:, :, :m] = t
        self.pages = {}
        self._update_pages(0)

    def crop(self, length: int) -> None:
        """Forget tokens at positions ``>= length``; heads left with fewer tokens get padding slots."""
        counts = (self.positions < length).sum(dim=-1)
        m = int(counts.max()) if counts.numel() else 0
        if bool((counts != m).any()):
            if "valid" not in self.buf:
                self.buf["valid"] = torch.ones_like(self.buf["pos"], dtype=torch.bool)
            self.buf["valid"][:, :, :m] &= self.buf["pos"][:, :, :m] < length
        self.n = m
        self._update_pages(m - m % self.page if self.page else 0)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Batch rows in the order ``beam_idx`` (beam search)."""
        self.buf = {name: t.index_select(0, beam_idx) for name, t in self.buf.items()}
        self.pages = {name: t.index_select(0, beam_idx) for name, t in self.pages.items()}

    # ------------------------------------------------------------ page metadata
    def page_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kmin, kmax)``, each ``(B, H, ceil(n / page), D)`` in ``page_dtype``: channel-wise key bounds per
        page, rounded outward (``kmin`` <= every key's channel <= ``kmax``, also when narrower than the keys)."""
        n_pages = math.ceil(self.n / self.page)
        return self.pages["kmin"][:, :, :n_pages], self.pages["kmax"][:, :, :n_pages]

    def _update_pages(self, first_slot: int) -> None:
        """Recompute the bounds of the pages touched since slot ``first_slot`` (only those)."""
        if not self.page or self.n == 0:
            return
        p0, n_pages = first_slot // self.page, math.ceil(self.n / self.page)
        for name in ("kmin", "kmax"):
            t = self.pages.get(name)
            if t is None or t.shape[2] < n_pages:
                dim = self.buf["k"].shape[-1] if self.bits is None else self.keys(0, 1).shape[-1]
                grown = self.buf["pos"].new_empty(*self.buf["pos"].shape[:2], math.ceil(max(self.capacity, self.n)
                                                                                        / self.page), dim,
                                                  dtype=self.page_dtype)
                if t is not None:
                    grown[:, :, :p0] = t[:, :, :p0]
                self.pages[name] = grown
        k = self.buf["k"]
        if (self.bits is None and k.device.type == "cpu" and k.dtype in capped.DTYPES
                and self.page_dtype in (torch.float32, torch.bfloat16) and capped.available()):
            # a decode step's append touches one page: one C++ call instead of ~20 small tensor ops
            torch.ops.attnzoo.page_bounds(k, self.pages["kmin"], self.pages["kmax"], p0, self.n, self.page)
            return
        keys = self.keys(p0 * self.page, self.n)
        short = n_pages * self.page - self.n
        if short:
            keys = torch.cat([keys, keys[:, :, -1:].expand(-1, -1, short, -1)], dim=2)
        chunks = keys.unflatten(2, (n_pages - p0, self.page))
        for name, fn, up in (("kmin", torch.amin, False), ("kmax", torch.amax, True)):
            self.pages[name][:, :, p0:n_pages] = round_out(fn(chunks, dim=3), self.page_dtype, up)

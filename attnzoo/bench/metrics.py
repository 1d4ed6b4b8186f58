"""What the benchmark measures: time, peak memory, error vs exact, attention-mass recall, FLOP rate.

Peak memory (CPU) — the resident-set high-water mark of the benchmark's worker
process, reset before each measured call: on Linux, writing ``5`` to
``/proc/self/clear_refs`` sets ``VmHWM`` back to the current ``VmRSS``, so
``VmHWM`` after the call minus ``VmRSS`` before it is the most extra memory the
call (its temporaries and its output) held at any instant. This is what the OS
had to give, including allocator overhead, and it costs microseconds, so every
case can run in one long-lived worker instead of a fresh process each (a fresh
process per case reading ``ru_maxrss`` is as honest but costs an interpreter and
a torch import, ~3 s, per case). Just before the measured call glibc's
``malloc_trim(0)`` hands every freed block back to the OS, so memory an earlier
call freed cannot be silently reused and hidden from the RSS; the timed calls
run with the allocator untouched. Where ``clear_refs`` is unavailable (not
Linux) the peak is reported as unknown (None), never guessed.

Attention-mass recall — the fraction of exact attention probability mass that
falls on the keys a method reads, averaged over query rows. Exact-family methods
read every key: recall 1 by definition. A method that is exact softmax over a
subset of the keys (the local, static-sparse, dynamic-sparse and hashing
families: :data:`SUBSET_FAMILIES`) and returns its log-sum-exp has, per query
row, recall ``exp(lse_method - lse_exact)``: its normaliser is the exact one
restricted to the keys it read. A method can instead define
``visible(q, k, *, causal, key_padding_mask, **inputs)`` returning a bool tensor
broadcastable to ``(B, Hq, Nq, Nk)`` (True = read), or None when it reads every
visible key (the hook wins when both apply). Methods that change the scores
themselves (linear, low-rank, hybrid, quantised) are not a subset of softmax
attention: recall is not applicable (None), never a made-up number.

Density — the share of the visible (query, key) pairs (the causal triangle
when causal) a method reads: 1 for the exact family; for a method with a
``visible`` hook, the pairs it marks; for a method that attends over the
layouts it builds (``layouts(q, k, ...)``, every block-sparse method), the pairs
those layouts hold after their masks, counted by attending them with zero
queries and keys (each row's log-sum-exp is then log(keys read)); otherwise
None (not measured: the method does not expose what it reads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..checks import Problem
from ..core.exact import naive_attention
from ..core.masks import visible_mask
from ..registry import Family, Method

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim


_TRIM = _malloc_trim()


# -------------------------------------------------------------------- time
#: where Linux counts the time the calling thread spent waiting in the run queue for a core (ns, 2nd field)
_SCHEDSTAT = Path("/proc/thread-self/schedstat")


def bench_clock(device: torch.device | str = "cpu") -> str:
    """The clock :func:`time_calls` should use here: ``own`` for single-threaded CPU work where Linux reports
    run-queue waits, else ``wall``.

    ``own`` is the wall time less the time the thread waited for a core while
    other processes held it. On the shared 2-core box a 5 ms call measured 9 to
    22 ms of wall time (4 ms scheduler slices of other processes) and 4.8 to
    5.4 ms ``own``, which, unlike CPU time, still counts a call's sleeps and
    waits. With several threads (or a GPU) one thread's waits say too little,
    so those keep the wall clock.
    """
    single_cpu = torch.get_num_threads() == 1 and torch.device(device).type == "cpu"
    return "own" if single_cpu and _SCHEDSTAT.exists() else "wall"


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``len(runs)`` timed calls after the caller's warm-up, on ``clock``."""

    runs: tuple[float, ...]
    threads: int
    clock: str = "wall"
    #: the reference's calls, one after each of ``runs`` (empty without ``alongside``)
    ref_runs: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def ref_median(self) -> float | None:
        return statistics.median(self.ref_runs) if self.ref_runs else None

    @property
    def spread(self) -> float:
        """(max - min) / median over the timed runs: how noisy this measurement was."""
        return (max(self.runs) - min(self.runs)) / self.median if self.median > 0 else 0.0


def time_calls(fn: Callable[[], Any], *, repeat: int, budget_s: float, min_time_s: float = 0.0,
               clock: str = "wall", alongside: Callable[[], Any] | None = None) -> Timing:
    """Time ``fn`` at least ``repeat`` times and until ``min_time_s`` is measured (so a fast call's median
    rests on many samples), stopping early once ``budget_s`` of wall time is spent (at least once).

    ``clock``: ``wall``, or ``own`` (see :func:`bench_clock`): each call's wall
    time less the run-queue wait the thread accrued during it. ``alongside``: a
    reference timed after each call of ``fn`` (``Timing.ref_runs``), so that the
    two medians see the same machine: their ratio stays put when the whole
    machine slows down (other processes' cache and memory traffic), which no
    clock can leave out.
    """
    if clock not in ("wall", "own"):
        raise ValueError(f"clock: expected 'wall' or 'own', got {clock!r}")
    fd = os.open(_SCHEDSTAT, os.O_RDONLY) if clock == "own" else None  # this thread's file: read it from here

    def waited() -> float:
        return 0.0 if fd is None else int(os.pread(fd, 128, 0).split()[1]) * 1e-9

    def timed(f: Callable[[], Any]) -> float:
        t0, w0 = time.perf_counter(), waited()
        f()
        w1, t1 = waited(), time.perf_counter()
        return max(t1 - t0 - (w1 - w0), 0.0)

    runs: list[float] = []
    ref_runs: list[float] = []
    measured, start = 0.0, time.perf_counter()
    try:
        while (len(runs) < repeat or measured < min_time_s) and (not runs or time.perf_counter() - start < budget_s):
            runs.append(timed(fn))
            measured += runs[-1]
            if alongside is not None:
                ref_runs.append(timed(alongside))
    finally:
        if fd is not None:
            os.close(fd)
    return Timing(tuple(runs), torch.get_num_threads(), clock, tuple(ref_runs))


# ------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_supported() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """``(fn(), extra bytes at the peak of the call)``; the peak is None where it cannot be measured."""
    if not peak_memory_supported():
        return fn(), None
    if _TRIM is not None:
        _TRIM(0)
    before = _status_kb("VmRSS")
    _CLEAR_REFS.write_text("5")
    result = fn()
    return result, max(0, _status_kb("VmHWM") - before) * 1024


# ------------------------------------------------------------------- error
def output_errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error, max abs error and mean row cosine of ``out`` against ``ref``."""
    out, ref = out.double(), ref.double()
    diff = out - ref
    ref_norm = float(ref.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    dot = (out * ref).sum(-1)
    norms = out.norm(dim=-1) * ref.norm(dim=-1)
    both_zero = (out.norm(dim=-1) == 0) & (ref.norm(dim=-1) == 0)
    cosine = torch.where(both_zero, torch.ones_like(dot), dot / norms.clamp_min(1e-300))
    return {"rel_error": rel, "max_abs_error": float(diff.abs().max()), "cosine": float(cosine.mean())}


# ------------------------------------------------------------------ recall
def mass_recall(q: torch.Tensor, k: torch.Tensor, keys_read: torch.Tensor, *, scale: float, causal: bool,
                key_padding_mask: torch.Tensor | None = None) -> float:
    """Mean over query rows (with a visible key) of the exact attention mass on ``keys_read``.

    ``keys_read`` is bool, broadcastable to ``(B, Hq, Nq, Nk)``. Computed one
    (batch, head) at a time so memory stays O(Nq·Nk).
    """
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    groups = heads // k.shape[1]
    keys_read = keys_read.expand(batch, heads, len_q, len_k)
    total, rows = 0.0, 0
    for b in range(batch):
        pad = None if key_padding_mask is None else key_padding_mask[b:b + 1]
        for h in range(heads):
            qh, kh = q[b:b + 1, h:h + 1].double(), k[b:b + 1, h // groups:h // groups + 1].double()
            scores = (qh @ kh.transpose(-1, -2)) * scale
            seen = visible_mask(len_q, len_k, causal=causal, key_padding_mask=pad)
            if seen is not None:
                scores = scores.masked_fill(~seen, float("-inf"))
            probs = torch.softmax(scores, dim=-1)[0, 0]
            live = torch.isfinite(scores[0, 0]).any(dim=-1)
            mass = (probs * keys_read[b, h]).sum(-1)
            total += float(mass[live].sum())
            rows += int(live.sum())
    return total / rows if rows else 1.0


#: families whose methods compute exact softmax attention over a subset of the keys
SUBSET_FAMILIES = (Family.LOCAL, Family.STATIC_SPARSE, Family.DYNAMIC_SPARSE, Family.HASHING)


def lse_recall(lse: torch.Tensor, lse_exact: torch.Tensor) -> float:
    """Mean over rows with a visible key of ``exp(lse - lse_exact)`` (a row that read nothing: 0)."""
    live = torch.isfinite(lse_exact)
    share = torch.exp((lse.double() - lse_exact.double()).clamp(max=0.0))  # -inf - finite -> 0
    return float(share[live].mean()) if bool(live.any()) else 1.0


def recall_applies(method: Method) -> bool:
    """Whether recall means something for ``method`` (exact, a subset of keys, or a ``visible`` hook)."""
    family = type(method).family
    return (family is Family.EXACT or callable(getattr(method, "visible", None))
            or (family in SUBSET_FAMILIES and type(method).supports.lse))


def method_recall(method: Method, q, k, v=None, *, scale: float, causal: bool, key_padding_mask=None,
                  **inputs) -> float | None:
    """Recall of ``method`` by the protocol in the module docstring (None = not applicable)."""
    if type(method).family is Family.EXACT:
        return 1.0
    visible = getattr(method, "visible", None)
    if callable(visible):
        keys_read = visible(q, k, causal=causal, key_padding_mask=key_padding_mask, **inputs)
        if keys_read is None:
            return 1.0
        return mass_recall(q, k, keys_read.bool(), scale=scale, causal=causal, key_padding_mask=key_padding_mask)
    if v is None or not recall_applies(method):
        return None
    from ..core.exact import tiled_attention

    _, lse = method(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, return_lse=True,
                    **inputs)
    _, lse_exact = tiled_attention(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask)
    return lse_recall(lse, lse_exact)


# ----------------------------------------------------------------- density
def method_density(method: Method, q, k, *, causal: bool, key_padding_mask=None, **inputs) -> float | None:
    """Share of the visible (query, key) pairs ``method`` reads on ``q``/``k`` (see the module docstring)."""
    if type(method).family is Family.EXACT:
        return 1.0
    len_q, len_k = q.shape[2], k.shape[2]
    seen = visible_mask(len_q, len_k, causal=causal, key_padding_mask=key_padding_mask)
    seen = torch.ones(1, 1, len_q, len_k, dtype=torch.bool) if seen is None else seen.bool()
    total = float(seen.expand(q.shape[0], q.shape[1], len_q, len_k).sum())
    visible = getattr(method, "visible", None)
    if callable(visible):
        keys_read = visible(q, k, causal=causal, key_padding_mask=key_padding_mask, **inputs)
        if keys_read is None:
            return 1.0
        read = float((keys_read.bool() & seen).expand(q.shape[0], q.shape[1], len_q, len_k).sum())
        return read / total if total else 1.0
    layouts = getattr(method, "layouts", None)
    if not callable(layouts):
        return None
    from ..core.blocksparse import attend_all

    lays = layouts(q, k, causal=causal, key_padding_mask=key_padding_mask)
    zq, zk = q.new_zeros(*q.shape[:3], 1), k.new_zeros(*k.shape[:3], 1)
    _, lse = attend_all(zq, zk, k.new_ones(*k.shape[:3], 1), lays, scale=1.0, causal=causal,
                        key_padding_mask=key_padding_mask)
    # each row's count is a whole number: round away the float32 lse's error (exp(-inf) = 0: a row that read none)
    read = float(torch.exp(lse.double()).nan_to_num(0.0).round().sum())
    return min(1.0, read / total) if total else 1.0


# -------------------------------------------------------------------- flops
def visible_pairs(len_q: int, len_k: int, causal: bool) -> int:
    """(query, key) pairs exact attention scores (bottom-right causal alignment)."""
    if not causal:
        return len_q * len_k
    offset = len_k - len_q
    return sum(max(0, min(len_k, i + offset + 1)) for i in range(len_q))


def attention_flops(prob: Problem, causal: bool) -> int:
    """FLOPs of exact attention: ``2·(D + Dv)`` per visible pair per head (QKᵀ and PV)."""
    return 2 * prob.batch * prob.heads_q * visible_pairs(prob.len_q, prob.len_k, causal) * (prob.dim + prob.dim_v)


def method_flops(method: Method, prob: Problem, causal: bool) -> tuple[int, str]:
    """The method's own FLOP count when it defines ``flops(prob, causal)``, else exact attention's."""
    own = getattr(method, "flops", None)
    if callable(own):
        return int(own(prob, causal)), "method"
    return attention_flops(prob, causal), "exact-equivalent"


def gemm_ceiling_gflops(n: int = 1024, repeat: int = 5) -> float:
    """GFLOP/s of an ``n×n @ n×n`` float32 matmul on this machine, median of ``repeat`` (after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    timing = time_calls(lambda: a @ b, repeat=repeat, budget_s=float("inf"))
    return 2 * n ** 3 / timing.median / 1e9


# ---------------------------------------------------------------- heatmaps
def _pool(m: torch.Tensor, size: int) -> torch.Tensor:
    if max(m.shape) <= size:
        return m.float()
    return F.adaptive_avg_pool2d(m[None, None].float(), (min(size, m.shape[0]), min(size, m.shape[1])))[0, 0]


def exact_map(q, k, *, scale: float, causal: bool, head: int = 0, size: int = 128) -> torch.Tensor:
    """Exact attention probabilities of batch 0, query head ``head``, average-pooled to at most size×size."""
    groups = q.shape[1] // k.shape[1]
    qh, kh = q[:1, head:head + 1].double(), k[:1, head // groups:head // groups + 1].double()
    eye = torch.eye(k.shape[2], dtype=torch.float64)[None, None]
    probs, _ = naive_attention(qh, kh, eye, scale=scale, causal=causal)
    return _pool(probs[0, 0], size)


#: the longest prefix a causal problem's heatmaps are read on (``v = I`` costs N³ per head)
MAP_TOKENS = 512


def map_inputs(q, k, *, causal: bool, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The q/k the heatmaps read: a causal self-attention problem longer than :data:`MAP_TOKENS` (and without
    extra per-token inputs) is cut to its first MAP_TOKENS tokens, whose causal attention is the same
    problem's; anything else is used whole."""
    n = k.shape[2]
    if causal and not inputs and q.shape[2] == n > MAP_TOKENS:
        return q[:, :, :MAP_TOKENS], k[:, :, :MAP_TOKENS]
    return q, k


def method_map(method: Method, q, k, *, causal: bool, head: int = 0, size: int = 128, **inputs) -> torch.Tensor:
    """The attention matrix a method applies, read off by feeding ``v = I`` (Dv = Nk).

    Exact for every method whose output is linear in v (softmax-based, sparse,
    kernelised, linear-recurrent); pooled like :func:`exact_map`.
    """
    eye = torch.eye(k.shape[2], dtype=q.dtype).expand(k.shape[0], k.shape[1], -1, -1).contiguous()
    with torch.no_grad():
        out = method(q, k, eye, causal=causal, **inputs)
    return _pool(out[0, head], size)

"""Sequence-parallel attention: per-rank time, peak memory and bytes sent vs P, on gloo/CPU.

Ring, TokenRing and Ulysses (local method ``exact``), non-causal (``--causal``
for causal, which adds the zig-zag re-layout, counted apart), fp32,
B=1, Hq=Hkv=8, D=64, P in {1, 2, 4} local processes (``run_local``).

- Strong scaling (fixed total N): per-rank forward and forward+backward time
  (median over rounds, each round starts with a barrier; the slowest rank is
  reported), compared with single-process SDPA on the whole sequence in the
  P=1 run; per-rank peak extra resident memory of one forward+backward
  (``attnzoo.bench.metrics.peak_memory``: ``/proc/self/clear_refs`` + ``VmHWM``).
- Weak scaling (fixed N/P): bytes each rank sends in one forward, counted by
  ``attnzoo.parallel.comm_stats()`` (the shape check's few bytes excluded),
  next to the analytic formulas (element size e, n = N/P):
    ring        (P-1)·B·n·Hkv·(D+Dv)·e                       grows with N
    token ring  (P-1)·B·n·Hq·(D·e + (Dv+1)·4)                grows with N
    ulysses     (P-1)/P·B·n·(Hq·(D+Dv) + Hkv'·(D+Dv))·e      constant in P at fixed n
  (Hkv' = KV heads after replication to a multiple of P.)

Every rank (and the SDPA baseline) runs one thread. The P processes share
this machine's cores, so on a small machine the time columns measure the
algorithms' overheads, not a speed-up; the byte columns are exact.

    python benchmarks/parallel.py            # N = 4096 strong, n = 1024 weak
    python benchmarks/parallel.py --quick    # N = 1024 strong, n = 256 weak (< 1 min)
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import statistics
import time

import torch
import torch.distributed as dist

from attnzoo import parallel as azp
from attnzoo.bench.metrics import peak_memory

ALGORITHMS = {"ring": azp.ring_attention, "token_ring": azp.token_ring_attention, "ulysses": azp.ulysses_attention}


def _sent() -> tuple[int, int]:
    """Bytes sent by the algorithm itself and by the causal zig-zag re-layout (the shape check excluded)."""
    stats = azp.comm_stats()
    relayout = stats.sent_by_op.get("relayout", 0)
    return stats.bytes_sent - stats.sent_by_op.get("shape check", 0) - relayout, relayout


def _shards(rank: int, world: int, n_total: int, heads: int, kv_heads: int, dim: int):
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, h, n_total, dim, generator=g) for h in (heads, kv_heads, kv_heads)]
    return [azp.shard_sequence(t, rank, world).contiguous() for t in full]


def _peak_extra_bytes(fn, q, k, v) -> int:
    """Resident memory added at the peak of one forward+backward (run first in a fresh worker,
    so no allocator cache from earlier calls hides it)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    return peak_memory(lambda: fn(*leaves).sum().backward())[1]


def _median_time(call, repeat: int, barrier: bool) -> float:
    times = []
    for r in range(repeat + 1):  # round 0 warms up
        if barrier:
            dist.barrier()
        t0 = time.perf_counter()
        call()
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(rank: int, world: int, algo: str, n_total: int, heads: int, kv_heads: int, dim: int, causal: bool,
            repeat: int, timed: bool) -> dict:
    """One rank (one thread): forward bytes; with ``timed``, peak memory and forward / forward+backward times."""
    torch.set_num_threads(1)
    fn = functools.partial(ALGORITHMS[algo], causal=causal)
    tiny = _shards(rank, world, 2 * world, heads, kv_heads, dim)
    fn(*(t.requires_grad_() for t in tiny)).sum().backward()  # load every code path first
    q, k, v = _shards(rank, world, n_total, heads, kv_heads, dim)
    result = {"peak": _peak_extra_bytes(fn, q, k, v)} if timed else {}
    azp.comm_stats().reset()
    with torch.no_grad():
        fn(q, k, v)
    result["sent"], result["relayout"] = _sent()
    if not timed:
        return result

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        fn(*(t.clone().requires_grad_() for t in (q, k, v))).sum().backward()

    result["fwd"] = _median_time(forward, repeat, barrier=True)
    result["both"] = _median_time(forward_backward, repeat, barrier=True)
    if world == 1:  # the single-process baseline on the whole sequence
        result["sdpa"] = _median_time(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), repeat, barrier=False)
    return result


def analytic_forward_bytes(algo: str, world: int, n: int, heads: int, kv_heads: int, dim: int, e: int = 4) -> int:
    if algo == "ring":
        return (world - 1) * n * kv_heads * 2 * dim * e
    if algo == "token_ring":
        return (world - 1) * n * heads * (dim * e + (dim + 1) * 4)
    kv = kv_heads * (world // math.gcd(kv_heads, world))
    return (world - 1) * n * (heads + kv) * 2 * dim * e // world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1024 strong scaling, n = 256 weak scaling")
    ap.add_argument("--length", type=int, help="total N of the strong-scaling table")
    ap.add_argument("--per-rank", type=int, help="N/P of the weak-scaling table")
    ap.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--causal", action="store_true", help="causal attention (zig-zag layout inside each call)")
    args = ap.parse_args()
    n_total = args.length or (1024 if args.quick else 4096)
    per_rank = args.per_rank or (256 if args.quick else 1024)
    shape = (args.heads, args.kv_heads, args.dim, args.causal)

    print(f"# torch {torch.__version__}, gloo, {platform.processor() or platform.machine()}, "
          f"B=1 Hq={args.heads} Hkv={args.kv_heads} D={args.dim} fp32 {'causal' if args.causal else 'non-causal'}; median of {args.repeat}; "
          f"no GPU in this run, so no NCCL numbers")
    print(f"\n## strong scaling: N = {n_total} in total (slowest rank; time vs single-process SDPA on all N)")
    header = (f"{'algorithm':>10} {'P':>2} {'N/P':>6} {'fwd ms':>9} {'vs SDPA':>8} {'fwd+bwd ms':>11} "
              f"{'peak MiB':>9} {'MB sent fwd':>12}")
    print(header)
    print("-" * len(header))
    sdpa = None
    for world in args.worlds:
        for algo in ALGORITHMS:
            rows = azp.run_local(measure, world, algo, n_total, *shape, args.repeat, True, wall_timeout=1800.0)
            sdpa = sdpa or rows[0].get("sdpa")
            fwd = max(r["fwd"] for r in rows)
            ratio = f"{fwd / sdpa:>8.2f}" if sdpa else f"{'n/a':>8}"
            print(f"{algo:>10} {world:>2} {n_total // world:>6} {fwd * 1e3:>9.1f} {ratio} "
                  f"{max(r['both'] for r in rows) * 1e3:>11.1f} {max(r['peak'] for r in rows) / 2**20:>9.1f} "
                  f"{max(r['sent'] + r['relayout'] for r in rows) / 1e6:>12.3f}")
    if sdpa:
        print(f"{'sdpa':>10} {1:>2} {n_total:>6} {sdpa * 1e3:>9.1f} {1.0:>8.2f}")

    print(f"\n## weak scaling: N/P = {per_rank} per rank; forward bytes sent per rank, measured vs formula")
    header = (f"{'algorithm':>10} {'P':>2} {'N':>6} {'MB measured':>12} {'MB formula':>11} {'ratio':>6} "
              f"{'+ relayout MB':>14}")
    print(header)
    print("-" * len(header))
    for algo in ALGORITHMS:
        for world in args.worlds:
            rows = azp.run_local(measure, world, algo, per_rank * world, *shape, args.repeat, False)
            formula = analytic_forward_bytes(algo, world, per_rank, *shape[:3])
            sent = max(r["sent"] for r in rows)
            ratio = f"{sent / formula:>6.3f}" if formula else f"{'-':>6}"
            relayout = max(r["relayout"] for r in rows)
            print(f"{algo:>10} {world:>2} {per_rank * world:>6} {sent / 1e6:>12.3f} {formula / 1e6:>11.3f} {ratio} "
                  f"{relayout / 1e6:>14.3f}")


if __name__ == "__main__":
    main()

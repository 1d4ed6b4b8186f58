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

- USP (``--tables usp``): bytes each rank sends in one forward for the ring,
  Ulysses and every ``(P/U) × U`` mesh, against (non-causal, n = N/P, Hkv'
  after replication to a multiple of U, R = P/U):
    usp         (U-1)/U·B·n·(Hq·(D+Dv) + Hkv'·(D+Dv))·e + (R-1)·B·n·Hkv'·(D+Dv)·e
  (P = 8 runs 8 processes on however many cores there are: bytes only).
- LightSeq (``--tables lightseq``): a stack of transformer layers (attention by
  ring attention or USP, then an MLP), forward+backward with no checkpointing,
  plain checkpointing (``torch.utils.checkpoint``: attention recomputed) and
  LightSeq checkpointing (attention output and lse kept): per-rank resident
  memory held after the forward and peak of forward+backward, time, bytes.
- Numerics (``--tables numerics``): forward and gradient error against
  single-process float64 for P = 1, 2, 4, 8 (fp32 and bf16 shards, fp32 merges).

Every rank (and the SDPA baseline) runs one thread. The P processes share
this machine's cores, so on a small machine the time columns measure the
algorithms' overheads, not a speed-up; the byte columns are exact.

    python benchmarks/parallel.py            # N = 4096 strong, n = 1024 weak
    python benchmarks/parallel.py --quick    # N = 1024 strong, n = 256 weak (< 1 min)
    python benchmarks/parallel.py --tables usp lightseq numerics --quick
"""

from __future__ import annotations

import argparse
import functools
import ctypes
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


# ------------------------------------------------------------------- USP bytes
def usp_measure(rank: int, world: int, ulysses: int | None, n: int, heads: int, kv_heads: int, dim: int) -> int:
    """Bytes this rank sends in one non-causal forward (``ulysses=None``: the ring alone)."""
    q, k, v = _shards(rank, world, n * world, heads, kv_heads, dim)
    azp.comm_stats().reset()
    with torch.no_grad():
        if ulysses is None:
            azp.ring_attention(q, k, v)
        else:
            azp.usp_attention(q, k, v, ulysses=ulysses)
    return _sent()[0]


def usp_formula(world: int, ulysses: int, n: int, heads: int, kv_heads: int, dim: int, e: int = 4) -> int:
    kv = kv_heads * (ulysses // math.gcd(kv_heads, ulysses))
    ring = world // ulysses
    return (ulysses - 1) * n * (heads + kv) * 2 * dim * e // ulysses + (ring - 1) * n * kv * 2 * dim * e


def usp_table(args, per_rank: int) -> None:
    print(f"\n## USP: forward bytes sent per rank, N/P = {per_rank}, B=1 Hq={args.heads} Hkv={args.kv_heads} "
          f"D={args.dim} fp32, non-causal; the ring alone, Ulysses alone (U = P) and every mesh")
    header = f"{'P':>2} {'mesh R×U':>9} {'MB measured':>12} {'MB formula':>11} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for world in args.usp_worlds:
        for ulysses in [None] + [u for u in range(1, world + 1) if world % u == 0 and args.heads % u == 0]:
            sent = max(azp.run_local(usp_measure, world, ulysses, per_rank, args.heads, args.kv_heads, args.dim,
                                     wall_timeout=1800.0))
            formula = (analytic_forward_bytes("ring", world, per_rank, args.heads, args.kv_heads, args.dim)
                       if ulysses is None else
                       usp_formula(world, ulysses, per_rank, args.heads, args.kv_heads, args.dim))
            mesh = "ring" if ulysses is None else f"{world // ulysses}×{ulysses}"
            ratio = f"{sent / formula:>6.3f}" if formula else f"{'-':>6}"
            print(f"{world:>2} {mesh:>9} {sent / 1e6:>12.3f} {formula / 1e6:>11.3f} {ratio}")


# ---------------------------------------------------------------- LightSeq
class Layer(torch.nn.Module):
    """A pre-norm transformer layer whose attention is sequence-parallel (``attend``), then a 4× MLP."""

    def __init__(self, attend, d: int, heads: int):
        super().__init__()
        self.attend, self.heads = attend, heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):  # (B, n, d): this rank's positions
        B, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attend(q, k, v, causal=True).transpose(1, 2).reshape(B, n, d))
        return x + self.mlp(self.norm2(x))


def _mmap_threshold(nbytes: int) -> None:
    """glibc: allocations of at least ``nbytes`` come straight from mmap and go back to the OS when freed
    (small: resident memory tracks live tensors; large: the heap caches them, the fast default)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024


WRAPS = ("none", "plain", "lightseq")


def lightseq_measure(rank: int, world: int, attend_name: str, n_total: int, d: int, heads: int, layers: int,
                     repeat: int) -> dict:
    """One rank, one thread: a stack of ``layers`` layers, forward+backward, unwrapped and wrapped each way
    (the same weights); memory and bytes per wrap, then time in interleaved rounds (minimum per wrap)."""
    torch.set_num_threads(1)
    _mmap_threshold(1 << 16)  # before any large allocation, so that no cached heap block hides the memory held
    attend = {"ring": azp.ring_attention,
              "usp": functools.partial(azp.usp_attention, ulysses=2 if world % 2 == 0 else 1)}[attend_name]
    torch.manual_seed(0)
    stack = torch.nn.ModuleList(Layer(attend, d, heads) for _ in range(layers))
    models = {"none": torch.nn.Sequential(*stack)}
    for wrap in WRAPS[1:]:
        models[wrap] = torch.nn.Sequential(*(azp.LightSeqCheckpoint(layer, lightseq=wrap == "lightseq")
                                             for layer in stack))
    x = azp.shard_sequence(torch.randn(1, n_total, d), rank, world, dim=1).contiguous()
    tiny = azp.shard_sequence(torch.randn(1, 2 * world, d), rank, world, dim=1)
    for model in models.values():  # load every code path first
        model(tiny.clone().requires_grad_()).sum().backward()
    held: dict[str, int] = {}

    def step(wrap: str):  # the caller frees the last gradients first, so that they do not hide in "before"
        xs = x.clone().requires_grad_()
        before = _rss()
        y = models[wrap](xs)
        held[wrap] = _rss() - before
        y.square().mean().backward()

    result = {}
    for wrap in WRAPS:
        stack.zero_grad(set_to_none=True)
        _, peak = peak_memory(lambda: step(wrap))
        result[wrap] = {"held": held[wrap], "peak": peak or 0}
        stack.zero_grad(set_to_none=True)
        azp.comm_stats().reset()
        step(wrap)
        stats = azp.comm_stats()
        result[wrap]["sent"] = stats.bytes_sent - stats.sent_by_op.get("shape check", 0)
    _mmap_threshold(1 << 25)
    times: dict[str, list[float]] = {wrap: [] for wrap in WRAPS}
    for _ in range(repeat):
        for wrap in WRAPS:
            stack.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            step(wrap)
            times[wrap].append(time.perf_counter() - t0)
    for wrap in WRAPS:
        result[wrap]["time"] = min(times[wrap])
    return result


def lightseq_table(args, n_total: int) -> None:
    world = 4
    print(f"\n## LightSeq checkpointing: {args.layers} layers, d={args.d_model}, {args.heads} heads, N = {n_total} "
          f"(N/P = {n_total // world}), P = {world}, causal, fp32, fwd+bwd; per rank (max over ranks); "
          f"resident memory (VmRSS after the forward, VmHWM peak of fwd+bwd, extra over the start; measured with "
          f"glibc returning blocks >= 64 KiB to the OS, timed with its default caching; time = min of "
          f"{args.repeat} interleaved rounds); MB sent includes the zig-zag re-layout and all-to-alls, which the "
          f"rerun repeats")
    header = (f"{'attention':>9} {'checkpoint':>10} {'held MiB':>9} {'peak MiB':>9} {'fwd+bwd ms':>11} "
              f"{'MB sent':>8}")
    print(header)
    print("-" * len(header))
    for attend in ("ring", "usp"):
        rows = azp.run_local(lightseq_measure, world, attend, n_total, args.d_model, args.heads, args.layers,
                             args.repeat, wall_timeout=3600.0)
        for wrap in WRAPS:
            def worst(key: str) -> float:
                return max(r[wrap][key] for r in rows)
            print(f"{attend:>9} {wrap:>10} {worst('held') / 2**20:>9.1f} {worst('peak') / 2**20:>9.1f} "
                  f"{worst('time') * 1e3:>11.1f} {worst('sent') / 1e6:>8.2f}")


# ---------------------------------------------------------------- numerics
def numerics_measure(rank: int, world: int, dtype_name: str, n_total: int, heads: int, kv_heads: int,
                     dim: int) -> dict:
    """Max relative error (max-abs / max|ref|) of the output and of dq, dk, dv on this rank, per algorithm."""
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(4321)
    q, k, v, d_out = [torch.randn(2, h, n_total, dim, generator=g, dtype=torch.float64)
                      for h in (heads, kv_heads, kv_heads, heads)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    ref.backward(d_out)
    algos = {"ring": azp.ring_attention, "token_ring": azp.token_ring_attention, "ulysses": azp.ulysses_attention,
             "usp": functools.partial(azp.usp_attention, ulysses=2 if world % 2 == 0 else 1)}
    result = {}
    for name, fn in algos.items():
        mine = [azp.shard_sequence(t, rank, world).to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*mine, causal=True)
        out.backward(azp.shard_sequence(d_out, rank, world).to(dtype))

        def rel(a, b):  # relative to the whole sequence's max, so that every P uses the same yardstick
            shard = azp.shard_sequence(b, rank, world).detach()
            return float((a.detach().double() - shard).abs().max() / b.detach().abs().max()) if shard.numel() else 0.0
        result[name] = (rel(out, ref), max(rel(a.grad, b.grad) for a, b in zip(mine, leaves)))
    return result


def numerics_table(args) -> None:
    n_total, heads, kv_heads, dim = args.numerics_shape
    print(f"\n## numerics vs P: causal, B=2 N={n_total} Hq={heads} Hkv={kv_heads} D={dim}; max relative error "
          f"(max-abs error over all ranks / max|ref| over the whole sequence) against single-process float64; "
          f"fp32 merges throughout")
    header = f"{'inputs':>6} {'algorithm':>10} " + " ".join(f"{'P=' + str(p) + ' out':>10} {'grad':>8}"
                                                           for p in args.numerics_worlds)
    print(header)
    print("-" * len(header))
    for dtype, label in (("float32", "fp32"), ("bfloat16", "bf16")):
        per_world = {p: azp.run_local(numerics_measure, p, dtype, n_total, heads, kv_heads, dim,
                                      wall_timeout=1800.0) for p in args.numerics_worlds}
        for algo in per_world[args.numerics_worlds[0]][0]:
            cells = []
            for p in args.numerics_worlds:
                out = max(r[algo][0] for r in per_world[p])
                grad = max(r[algo][1] for r in per_world[p])
                cells.append(f"{out:>10.1e} {grad:>8.1e}")
            print(f"{label:>6} {algo:>10} " + " ".join(cells))


def strong_table(args, n_total: int, shape: tuple) -> None:
    print(f"\n## strong scaling: N = {n_total} in total (slowest rank; × SDPA = single-process SDPA time on all N "
          f"÷ this per-rank time)")
    header = (f"{'algorithm':>10} {'P':>2} {'N/P':>6} {'fwd ms':>9} {'× SDPA':>8} {'fwd+bwd ms':>11} "
              f"{'peak MiB':>9} {'MB sent fwd':>12}")
    print(header)
    print("-" * len(header))
    sdpa = None
    for world in args.worlds:
        for algo in ALGORITHMS:
            rows = azp.run_local(measure, world, algo, n_total, *shape, args.repeat, True, wall_timeout=1800.0)
            sdpa = sdpa or rows[0].get("sdpa")
            fwd = max(r["fwd"] for r in rows)
            ratio = f"{sdpa / fwd:>8.2f}" if sdpa else f"{'n/a':>8}"
            print(f"{algo:>10} {world:>2} {n_total // world:>6} {fwd * 1e3:>9.1f} {ratio} "
                  f"{max(r['both'] for r in rows) * 1e3:>11.1f} {max(r['peak'] for r in rows) / 2**20:>9.1f} "
                  f"{max(r['sent'] + r['relayout'] for r in rows) / 1e6:>12.3f}")
    if sdpa:
        print(f"{'sdpa':>10} {1:>2} {n_total:>6} {sdpa * 1e3:>9.1f} {1.0:>8.2f}")


def weak_table(args, per_rank: int, shape: tuple) -> None:
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
    ap.add_argument("--tables", nargs="*", default=["strong", "weak", "usp", "lightseq", "numerics"],
                    choices=["strong", "weak", "usp", "lightseq", "numerics"], help="which tables (default: all)")
    ap.add_argument("--usp-worlds", type=int, nargs="*", default=[4, 8], help="P of the USP bytes table")
    ap.add_argument("--layers", type=int, default=4, help="layers of the LightSeq stack (default 4)")
    ap.add_argument("--d-model", type=int, default=256, help="width of the LightSeq layers (default 256)")
    ap.add_argument("--numerics-worlds", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--numerics-shape", type=int, nargs=4, default=[256, 8, 2, 32], metavar=("N", "HQ", "HKV", "D"),
                    help="N Hq Hkv D of the numerics table (default 256 8 2 32)")
    args = ap.parse_args()
    n_total = args.length or (1024 if args.quick else 4096)
    per_rank = args.per_rank or (256 if args.quick else 1024)
    shape = (args.heads, args.kv_heads, args.dim, args.causal)

    print(f"# torch {torch.__version__}, gloo, {platform.processor() or platform.machine()}, "
          f"B=1 Hq={args.heads} Hkv={args.kv_heads} D={args.dim} fp32 {'causal' if args.causal else 'non-causal'}; "
          f"median of {args.repeat}; "
          f"no GPU in this run, so no NCCL numbers")
    if "strong" in args.tables:
        strong_table(args, n_total, shape)
    if "weak" in args.tables:
        weak_table(args, per_rank, shape)
    if "usp" in args.tables:
        usp_table(args, per_rank)
    if "lightseq" in args.tables:
        lightseq_table(args, 1024 if args.quick else 4096)
    if "numerics" in args.tables:
        numerics_table(args)


if __name__ == "__main__":
    main()

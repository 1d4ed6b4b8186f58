"""How the CPU paths scale with threads: each at 1 thread and at ``--threads`` (default: every core), in one run.

B=1, H=8 (2 KV heads), D=64, fp32, causal, N=4K by default. Rows: SDPA causal (PyTorch's own threading, the
yardstick), attnzoo exact, block_topk (the block kernel, csrc/blocksparse_attention.cpp), vertical_slash (the
same kernel on a token layout), sliding_window with a soft cap (the capped kernel, csrc/capped_attention.cpp),
and sliding_window forward + backward (the band kernels) next to SDPA's forward + backward. The C++ kernels
split their work items over torch's threads (built with -fopenmp) and run each item's GEMMs on one thread, so
a second core should help, never hurt.

Calls are timed round-robin (every row at every thread count once per round, after a warm-up round) and the
minimum over rounds is reported. Columns: ms at each thread count, ``× 1 thread`` = the row's 1-thread time ÷
its N-thread time (bigger is better), and ``× SDPA`` at N threads = SDPA's time ÷ the row's (the fwd+bwd row
against SDPA's fwd+bwd).

    python benchmarks/threads.py                      # 4K, 1 vs every core, 3 rounds
    python benchmarks/threads.py --length 8192 --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import mods


def _rows(q, k, v):
    """name -> (a call timing one row, the SDPA row it is compared with)."""
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def method(**kw):
        return lambda q, k, v: az.attention(q, k, v, causal=True, **kw)

    def train(attend):
        def call():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            attend(qq, kk, vv).sum().backward()
        return call

    window = method(method="sliding_window", window=512)
    return {"SDPA causal": (lambda: sdpa(q, k, v), "SDPA causal"),
            "exact": (lambda: method(method="exact")(q, k, v), "SDPA causal"),
            "block_topk": (lambda: method(method="block_topk")(q, k, v), "SDPA causal"),
            "vertical_slash": (lambda: method(method="vertical_slash")(q, k, v), "SDPA causal"),
            "sliding_window 512 + softcap": (lambda: method(method="sliding_window", window=512,
                                                            score_mod=mods.softcap(20.0))(q, k, v), "SDPA causal"),
            "SDPA causal fwd+bwd": (train(sdpa), "SDPA causal fwd+bwd"),
            "sliding_window 512 fwd+bwd": (train(window), "SDPA causal fwd+bwd")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, args.length, 64, generator=g)
    k, v = (torch.randn(1, 2, args.length, 64, generator=g) for _ in range(2))
    rows, counts = _rows(q, k, v), (1, args.threads)
    best = {(name, n): float("inf") for name in rows for n in counts}
    before = torch.get_num_threads()
    try:
        for r in range(args.rounds + 1):  # round 0 warms up (extension builds, layout caches)
            for name, (call, _) in rows.items():
                for n in counts:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    call()
                    if r:
                        best[name, n] = min(best[name, n], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    n = args.threads
    print(f"N={args.length}, B=1, H=8/2, D=64, fp32, causal; min of {args.rounds} rounds; torch {torch.__version__}")
    print(f"| row | 1 thread ms | {n} threads ms | × 1 thread | × SDPA at {n} |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, sdpa) in rows.items():
        one, many = best[name, 1] * 1e3, best[name, n] * 1e3
        print(f"| {name} | {one:.1f} | {many:.1f} | {one / many:.2f} | {best[sdpa, n] * 1e3 / many:.2f} |")


if __name__ == "__main__":
    main()

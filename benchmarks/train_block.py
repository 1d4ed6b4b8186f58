"""Training through block_topk: forward + backward against SDPA causal and the slot loop, in one run.

B=1, H=8, D=64, fp32, causal, N in {4K, 8K}; block_topk with its defaults (block 64, topk 1/8 of the key
blocks, the sparse path forced: ``dense_below=0, dense_from=1``). Rows, per N:

- ``SDPA causal``: ``scaled_dot_product_attention(is_causal=True)`` and its autograd backward (no score mod);
- ``block_topk``: the block kernel's forward (``core/csrc/blocksparse_attention.cpp``) and its backward
  kernel (``core/csrc/block_backward.cpp``);
- ``block_topk (slot loop)``: the same forward, the generic executor's backward (slot by slot; what runs
  where the kernel does not build, ``ATTNZOO_CPP=0``, and for user functions not lowered to a bias);
- per ``--mods`` (default ``none alibi softcap table learned user``) both block_topk rows again: ALiBi (the
  slopes of :func:`attnzoo.mods.alibi_slopes`), a soft cap of 20, a relative-position table without gradient
  (:func:`attnzoo.mods.relative_bias`, distances -64..64 per head), ``learned``: the same table with
  ``requires_grad`` (the kernel sums its gradient per distance), ``user``: a user function of ``q_idx - kv_idx``
  (a clamped linear distance penalty per head) that :mod:`attnzoo.core.lowering` lowers to a distance table.

The layout is estimated on the modified scores in each call (part of the forward's time). Each call is timed
as its forward (grad enabled) and its backward (``out.sum().backward()``) separately, round-robin in this
process (one call of each per round, after a warm-up round), minimum over rounds. ``× SDPA`` = SDPA's fwd+bwd
time ÷ the row's (bigger is better); ``bwd ×slot``: the slot loop's backward time ÷ the row's;
``mod/plain``: the row's fwd+bwd time ÷ the plain (no mod) row's of the same backward.

    python benchmarks/train_block.py                           # the sizes above (~5 min at 1 thread)
    python benchmarks/train_block.py --lengths 4096 --repeat 2 --mods none alibi   # a first look
"""

from __future__ import annotations

import argparse
import platform
import time
from unittest import mock

import torch

import attnzoo as az
from attnzoo import mods
from attnzoo.core import blockbackward, blocksparse

MODS = ("none", "alibi", "softcap", "table", "learned", "user")
#: block_topk on its sparse path at every length (the benchmark measures the sparse path's training step)
PARAMS = dict(dense_below=0, dense_from=1.0)


def _score_mod(name: str, heads: int):
    if name == "user":  # lowered to a distance table (a user function of the distance alone)
        slopes = mods.alibi_slopes(heads)

        def distance_penalty(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx).clamp(max=256)

        return distance_penalty
    table = torch.randn(heads, 129, generator=torch.Generator().manual_seed(1)) * 0.5
    return {"none": None, "alibi": mods.alibi(mods.alibi_slopes(heads)), "softcap": mods.softcap(20.0),
            "table": mods.relative_bias(table), "learned": mods.relative_bias(table.clone().requires_grad_())}[name]


def _step(name: str, q, k, v, score_mod=None) -> tuple[float, float]:
    """One forward and one backward of ``name``: their times in seconds."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    if name == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = az.attention(q, k, v, method="block_topk", causal=True, score_mod=score_mod, **PARAMS)
    t1 = time.perf_counter()
    if name == "slot loop":  # the generic executor's backward: the kernel's route switched off for this call
        with mock.patch.object(blocksparse.blockbackward, "applies", return_value=False):
            out.sum().backward()
    else:
        out.sum().backward()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, help="KV heads (GQA; default: --heads)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--mods", nargs="*", choices=MODS, default=list(MODS), help="score mods of the block_topk rows")
    ap.add_argument("--no-slot-loop", action="store_true", help="leave out the slot-loop rows (faster)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernel = blockbackward.available()  # builds the extension first
    hkv = args.kv_heads or args.heads
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"B=1 H={args.heads} Hkv={hkv} D={args.dim} fp32 causal; block_topk defaults, sparse path; minimum of "
          f"{args.repeat}; block backward kernel {'built' if kernel else 'NOT available (both rows: slot loop)'}")
    header = (f"{'N':>6} {'':<34} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'× SDPA':>7} {'bwd ×slot':>9} "
              f"{'mod/plain':>9}")
    print(header)
    print("-" * len(header))
    backwards = ("kernel",) if args.no_slot_loop else ("kernel", "slot loop")
    for n in args.lengths:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, args.heads, n, args.dim, generator=g)
        k, v = (torch.randn(1, hkv, n, args.dim, generator=g) for _ in range(2))
        cases = [("sdpa", "none")] + [(name, m) for m in args.mods for name in backwards]
        score_mods = {m: _score_mod(m, args.heads) for m in args.mods}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {c: [] for c in cases}
        for r in range(args.repeat + 1):
            for name, m in cases:
                t = _step(name, q, k, v, score_mods.get(m))
                if r:  # round 0 is the warm-up
                    times[(name, m)].append(t)
        best = {c: (min(f for f, _ in ts), min(b for _, b in ts), min(f + b for f, b in ts)) for c, ts in times.items()}
        sdpa = best[("sdpa", "none")]
        for (name, m), (f, b, tot) in best.items():
            label = {"sdpa": "SDPA causal", "kernel": "block_topk",
                     "slot loop": "block_topk (slot loop)"}[name] + ("" if m == "none" else f" + {m}")
            slot = best.get(("slot loop", m))
            plain = best.get((name, "none"))
            print(f"{n:>6} {label:<34} {f * 1e3:>8.1f} {b * 1e3:>8.1f} {tot * 1e3:>9.1f} {sdpa[2] / tot:>6.2f}x "
                  + (f"{slot[1] / b:>8.2f}x " if slot and name != "sdpa" else f"{'':>9} ")
                  + (f"{tot / plain[2]:>8.2f}x" if plain and name != "sdpa" else ""), flush=True)
    print("× SDPA = SDPA causal's fwd+bwd time / the row's (bigger is better); bwd ×slot: the slot loop's backward "
          "/ the row's; mod/plain: the row's fwd+bwd / the same backward's without a mod")


if __name__ == "__main__":
    main()

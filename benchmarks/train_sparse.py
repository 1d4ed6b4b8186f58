"""Training through a sparse method's backward kernel: forward + backward against SDPA causal, in one run.

B=1, H=8, D=64, fp32, causal. One method per run:

- ``sliding_window`` (N in {4K, 8K, 16K}, windows 512 and 1024): the band forward (:mod:`attnzoo.core.fused`) and
  the band backward kernel (``core/csrc/band_backward.cpp``);
- ``block_topk`` (N in {4K, 8K}; its defaults, block 64 and top-k 1/8 of the key blocks, the sparse path forced:
  ``dense_below=0, dense_from=1``): the block kernel's forward (``core/csrc/blocksparse_attention.cpp``) and its
  backward kernel (``core/csrc/block_backward.cpp``); its layout is estimated on the modified scores in each call
  (part of the forward's time).

Rows, per N (and window):

- ``SDPA causal``: ``scaled_dot_product_attention(is_causal=True)`` and its autograd backward (no score mod:
  SDPA would need a dense (H, N, N) float mask for ALiBi and cannot soft-cap);
- the method with its backward kernel;
- ``(slot loop)``: the same forward, the generic executor's backward (recomputing slot by slot; what runs where
  the kernel does not build, ``ATTNZOO_CPP=0``, and for mods whose tensors need a gradient and are not lowered);
- per ``--mods`` both rows again with a score mod: ALiBi (the slopes of :func:`attnzoo.mods.alibi_slopes`), a
  soft cap of 20, both composed, a relative-position table without gradient (:func:`attnzoo.mods.relative_bias`,
  distances -64..64 per head), ``learned``: the same table with ``requires_grad`` (the kernels sum its gradient
  per distance), ``user``: a user function of ``q_idx - kv_idx`` (a clamped linear distance penalty per head)
  that :mod:`attnzoo.core.lowering` lowers to a distance table.

Each call is timed as its forward (grad enabled) and its backward (``out.sum().backward()``) separately, the
variants round-robin in this process (one call of each per round, after a warm-up round), so machine noise hits
them alike; the minimum over rounds is reported. ``× SDPA`` = SDPA's fwd+bwd time ÷ the row's (bigger is
better); ``bwd × SDPA``: the same for the backward alone; ``bwd ×slot``: the slot loop's backward time ÷ the
row's; ``mod/plain``: the row's fwd+bwd time ÷ the same backward's without a mod.

    python benchmarks/train_sparse.py sliding_window            # the sizes above (~5 min at 1 thread)
    python benchmarks/train_sparse.py block_topk                # (~5 min at 1 thread)
    python benchmarks/train_sparse.py sliding_window --lengths 4096 --windows 512 --repeat 2   # a first look
    python benchmarks/train_sparse.py block_topk --lengths 4096 --mods none alibi --no-slot-loop
"""

from __future__ import annotations

import argparse
import platform
import time
from unittest import mock

import torch

import attnzoo as az
from attnzoo import mods
from attnzoo.core import blockbackward, blocksparse, fused

MODS = ("none", "alibi", "softcap", "alibi+softcap", "table", "learned", "user")
#: per method: default lengths and mods, the call's parameters, whether its backward kernel is built (building the
#: extension first) and where the kernel's route is switched off
METHODS = {
    "sliding_window": dict(lengths=[4096, 8192, 16384], mods=["none", "alibi", "softcap"],
                           params=lambda window: dict(window=window),
                           kernel_built=lambda: fused.band_backward_applies(*(torch.zeros(1, 1, 1, 1),) * 3),
                           kernel_route=(blocksparse, "band_backward_applies")),
    "block_topk": dict(lengths=[4096, 8192], mods=["none", "alibi", "softcap", "table", "learned", "user"],
                       params=lambda window: dict(dense_below=0, dense_from=1.0),
                       kernel_built=blockbackward.available,
                       kernel_route=(blocksparse.blockbackward, "applies")),
}


def _score_mod(name: str, heads: int):
    slopes = mods.alibi_slopes(heads)
    if name == "user":  # lowered to a distance table (a user function of the distance alone)
        def distance_penalty(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx).clamp(max=256)

        return distance_penalty
    table = torch.randn(heads, 129, generator=torch.Generator().manual_seed(1)) * 0.5
    return {"none": None, "alibi": mods.alibi(slopes), "softcap": mods.softcap(20.0),
            "alibi+softcap": mods.compose(mods.alibi(slopes), mods.softcap(20.0)),
            "table": mods.relative_bias(table), "learned": mods.relative_bias(table.clone().requires_grad_())}[name]


def _step(route: str, method: str, q, k, v, window: int, score_mod=None) -> tuple[float, float]:
    """One forward and one backward (``route``: sdpa, kernel or slot loop): their times in seconds."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    if route == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = az.attention(q, k, v, method=method, causal=True, score_mod=score_mod,
                           **METHODS[method]["params"](window))
    t1 = time.perf_counter()
    if route == "slot loop":  # the generic executor's backward: the kernel's route switched off for this call
        with mock.patch.object(*METHODS[method]["kernel_route"], return_value=False):
            out.sum().backward()
    else:
        out.sum().backward()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=list(METHODS))
    ap.add_argument("--lengths", type=int, nargs="*", help="default: the method's (see above)")
    ap.add_argument("--windows", type=int, nargs="*", default=[512, 1024], help="sliding_window's windows")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, help="KV heads (GQA; default: --heads)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--mods", nargs="*", choices=MODS, help="score mods of the method's rows (default: the method's)")
    ap.add_argument("--no-slot-loop", action="store_true", help="leave out the slot-loop rows (faster)")
    args = ap.parse_args()
    spec = METHODS[args.method]
    lengths, mod_names = args.lengths or spec["lengths"], args.mods or spec["mods"]
    windows = args.windows if args.method == "sliding_window" else [0]
    torch.set_num_threads(args.threads)
    kernel = spec["kernel_built"]()
    hkv = args.kv_heads or args.heads
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"B=1 H={args.heads} Hkv={hkv} D={args.dim} fp32 causal; {args.method}; minimum of {args.repeat}; "
          f"backward kernel {'built' if kernel else 'NOT available (both rows: slot loop)'}")
    header = (f"{'N':>6} {'window':>6} {'':<44} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'× SDPA':>7} "
              f"{'bwd × SDPA':>10} {'bwd ×slot':>9} {'mod/plain':>9}")
    print(header)
    print("-" * len(header))
    routes = ("kernel",) if args.no_slot_loop else ("kernel", "slot loop")
    score_mods = {m: _score_mod(m, args.heads) for m in mod_names}
    for n in lengths:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, args.heads, n, args.dim, generator=g)
        k, v = (torch.randn(1, hkv, n, args.dim, generator=g) for _ in range(2))
        cases = [("sdpa", 0, "none")] + [(r, w, m) for w in windows for m in mod_names for r in routes]
        times: dict[tuple[str, int, str], list[tuple[float, float]]] = {c: [] for c in cases}
        for rnd in range(args.repeat + 1):
            for route, w, m in cases:
                t = _step(route, args.method, q, k, v, w, score_mods.get(m))
                if rnd:  # round 0 is the warm-up
                    times[(route, w, m)].append(t)
        best = {c: (min(f for f, _ in ts), min(b for _, b in ts), min(f + b for f, b in ts)) for c, ts in times.items()}
        sdpa = best[("sdpa", 0, "none")]
        for (route, w, m), (f, b, tot) in best.items():
            label = {"sdpa": "SDPA causal", "kernel": args.method,
                     "slot loop": f"{args.method} (slot loop)"}[route] + ("" if m == "none" else f" + {m}")
            slot, plain = best.get(("slot loop", w, m)), best.get((route, w, "none"))
            own = route != "sdpa"
            print(f"{n:>6} {w or '':>6} {label:<44} {f * 1e3:>8.1f} {b * 1e3:>8.1f} {tot * 1e3:>9.1f} "
                  f"{sdpa[2] / tot:>6.2f}x {sdpa[1] / b:>9.2f}x "
                  + (f"{slot[1] / b:>8.2f}x " if slot and own else f"{'':>9} ")
                  + (f"{tot / plain[2]:>8.2f}x" if plain and own else ""), flush=True)
    print("× SDPA = SDPA causal's fwd+bwd time / the row's (bigger is better); bwd × SDPA: the backward alone; "
          "bwd ×slot: the slot loop's backward / the row's; mod/plain: the row's fwd+bwd / the same backward's "
          "without a mod")


if __name__ == "__main__":
    main()

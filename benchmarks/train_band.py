"""Training through a sliding window: forward + backward against SDPA causal, in one run.

B=1, H=8, D=64, fp32, causal, N in {4K, 8K, 16K}, windows 512 and 1024. Rows, per N:

- ``SDPA causal``: ``scaled_dot_product_attention(is_causal=True)`` and its autograd backward (no score mod:
  SDPA would need a dense (H, N, N) float mask for ALiBi and cannot soft-cap);
- ``sliding_window``: attnzoo's band forward (:mod:`attnzoo.core.fused`) and the band backward kernel
  (``core/csrc/band_backward.cpp``);
- ``sliding_window (slot loop)``: the same forward, the backward of the generic executor (recomputing slot
  by slot; what runs where the kernel does not build, ``ATTNZOO_CPP=0``, and for mods whose tensors need a
  gradient);
- with ``--mods`` (default ``none alibi softcap``) both sliding_window rows again per score mod: ALiBi
  (a distance bias, the head slopes of :func:`attnzoo.mods.alibi_slopes`) or a soft cap of 20.

Every call is timed as its forward (grad enabled) and its backward (``out.sum().backward()``) separately.
The variants are timed round-robin in this process (one call of each per round, after a warm-up round), so
machine noise hits them alike; the minimum over rounds is reported. ``× SDPA`` = SDPA's time ÷ the row's
(bigger is better), for fwd+bwd and for the backward alone.

    python benchmarks/train_band.py                          # the sizes above (~5 min at 1 thread)
    python benchmarks/train_band.py --lengths 4096 --windows 512 --repeat 2   # a first look
    python benchmarks/train_band.py --lengths 4096 8192 --windows 512 --mods none alibi softcap alibi+softcap
"""

from __future__ import annotations

import argparse
import platform
import time
from unittest import mock

import torch

import attnzoo as az
from attnzoo import mods
from attnzoo.core import blocksparse, fused

MODS = ("none", "alibi", "softcap", "alibi+softcap")


def _score_mod(name: str, heads: int):
    alibi = mods.alibi(mods.alibi_slopes(heads))
    return {"none": None, "alibi": alibi, "softcap": mods.softcap(20.0),
            "alibi+softcap": mods.compose(alibi, mods.softcap(20.0))}[name]


def _step(name: str, q, k, v, window: int, score_mod=None) -> tuple[float, float]:
    """One forward and one backward of ``name``: their times in seconds."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    if name == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = az.attention(q, k, v, method="sliding_window", window=window, causal=True, score_mod=score_mod)
    t1 = time.perf_counter()
    if name == "slot loop":  # the generic executor's backward: the kernel's route switched off for this call
        with mock.patch.object(blocksparse, "band_backward_applies", return_value=False):
            out.sum().backward()
    else:
        out.sum().backward()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384])
    ap.add_argument("--windows", type=int, nargs="*", default=[512, 1024])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, help="KV heads (GQA; default: --heads)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--mods", nargs="*", choices=MODS, default=["none", "alibi", "softcap"],
                    help="score mods of the sliding_window rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernel = fused.band_backward_applies(*(torch.zeros(1, 1, 1, 1),) * 3)  # builds the extension first
    hkv = args.kv_heads or args.heads
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"B=1 H={args.heads} Hkv={hkv} D={args.dim} fp32 causal; minimum of {args.repeat}; "
          f"band backward kernel {'built' if kernel else 'NOT available (both sliding_window rows: slot loop)'}")
    header = (f"{'N':>6} {'window':>6} {'':<42} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'× SDPA':>7} "
              f"{'bwd × SDPA':>10}")
    print(header)
    print("-" * len(header))
    for n in args.lengths:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, args.heads, n, args.dim, generator=g)
        k, v = (torch.randn(1, hkv, n, args.dim, generator=g) for _ in range(2))
        cases = [("sdpa", 0, "none")] + [(name, w, m) for w in args.windows for m in args.mods
                                         for name in ("kernel", "slot loop")]
        times: dict[tuple[str, int, str], list[tuple[float, float]]] = {c: [] for c in cases}
        for r in range(args.repeat + 1):
            for name, w, m in cases:
                t = _step(name, q, k, v, w, _score_mod(m, args.heads))
                if r:  # round 0 is the warm-up
                    times[(name, w, m)].append(t)
        best = {c: (min(f for f, _ in ts), min(b for _, b in ts), min(f + b for f, b in ts)) for c, ts in times.items()}
        sdpa = best[("sdpa", 0, "none")]
        for (name, w, m), (f, b, tot) in best.items():
            label = {"sdpa": "SDPA causal", "kernel": "sliding_window",
                     "slot loop": "sliding_window (slot loop)"}[name] + ("" if m == "none" else f" + {m}")
            print(f"{n:>6} {w or '':>6} {label:<42} {f * 1e3:>8.1f} {b * 1e3:>8.1f} {tot * 1e3:>9.1f} "
                  f"{sdpa[2] / tot:>6.2f}x {sdpa[1] / b:>9.2f}x", flush=True)
    print("× SDPA = SDPA causal's fwd+bwd time / the row's (bigger is better); bwd × SDPA: the backward alone")


if __name__ == "__main__":
    main()

"""score_mod overhead and packed (varlen) batches against padded ones (B=1, H=8, D=64, fp32, causal).

1. score_mod at N (default 4096): each method with and without a mod (alibi, softcap, relative_bias, and
   "user softcap" / "user alibi" / "user table": the same written as plain functions, which
   ``attnzoo.core.lowering`` traces and runs as the built-ins; the table declared ``mods.positional``; "user
   softcap, eager": a function reading the batch row, which cannot be lowered: the eager path),
   inference and training (forward + backward; relative_bias with a learnable table); ``mod ÷ plain`` is
   the overhead (target <= 1.3 on CPU for inference), ``× SDPA`` = SDPA time ÷ ours (forward + backward:
   SDPA's). Methods: exact (SDPA without a mod, the tiled engine with one), exact_tiled, sliding_window
   (window 512: the band path) and block_topk (its defaults: gathered key blocks on the fused kernel). A soft
   cap runs on the C++ soft-cap kernel (``attnzoo.core.capped``) where it builds; a distance bias inside
   PyTorch's fused kernel (exact family, band path); anything else the eager paths (``explain`` says which).
2. varlen: ``--docs`` sequences of random lengths (seeded) summing to ``--total`` tokens, packed
   (``cu_seqlens``, each sequence its own call) against the same sequences as a right-padded batch with a
   key padding mask (one SDPA call); ``padded ÷ packed`` is the speed-up (target >= 1.5).

    python benchmarks/routes.py                 # N=4096; 8 documents summing to 16K
    python benchmarks/routes.py --quick         # small sizes, seconds
    python benchmarks/routes.py --only score_mod --methods sliding_window,block_topk --modes inference

Times are the minimum of ``--repeats`` calls (``attnzoo.bench.metrics.time_calls``, ``--clock``) after one warm-up, one
torch thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnzoo as az  # noqa: E402
from attnzoo import mods  # noqa: E402
from attnzoo.core import capped  # noqa: E402
from attnzoo.bench.metrics import time_calls  # noqa: E402

H, D = 8, 64


def best(fn, repeats: int, clock: str = "wall") -> float:
    """The fastest of ``repeats`` timed calls after a warm-up (the machine is shared: the minimum is the signal);
    ``clock="own"`` leaves out the time the thread waited for a core."""
    fn()
    return min(time_calls(fn, repeat=repeats, budget_s=120.0, clock=clock).runs)


METHODS = {"exact": {}, "exact_tiled": {}, "sliding_window": {"window": 512}, "block_topk": {}}
MODES = ("inference", "fwd+bwd")


def score_mod_table(n: int, repeats: int, methods=tuple(METHODS), modes=MODES, clock: str = "wall") -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    table = torch.randn(H, 257, generator=g)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    tab = table.clone().requires_grad_(True)
    def user_table(s, b, h, q_idx, kv_idx):  # relative_bias written as a plain function
        return s + table[h, (kv_idx - q_idx).clamp(-128, 128) + 128]

    slopes = mods.alibi_slopes(H)
    mod_list = {"alibi": mods.alibi(slopes), "softcap": mods.softcap(30.0),
                "relative_bias": mods.relative_bias(tab),
                "user softcap": lambda s, b, h, q_idx, kv_idx: torch.tanh(s / 30.0) * 30.0,  # a plain function
                "user alibi": lambda s, b, h, q_idx, kv_idx: s + slopes[h] * (kv_idx - q_idx),
                "user table": user_table, "positional(user table)": mods.positional(user_table, H),
                # reads the batch row: not lowerable, the eager path (what every user function cost before)
                "user softcap, eager": lambda s, b, h, q_idx, kv_idx: torch.tanh(s / 30.0) * 30.0 + 0 * b}
    sdpa = best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats, clock)
    sdpa_train = best(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).sum().backward(), repeats, clock)
    print(f"\n## score_mod at N={n} (B=1, H={H}, D={D}, causal, fp32, {torch.get_num_threads()} thread(s))\n")
    print(f"SDPA causal: {sdpa:.3f} s forward, {sdpa_train:.3f} s forward + backward; `exact` without a mod is "
          "SDPA, with one the tiled engine (plain tiled: the exact_tiled rows)\n")
    print(f"soft-cap C++ kernel (attnzoo.core.capped): {'built' if capped.available() else 'NOT built: eager paths'}\n")
    print("| method | mod | mode | plain s | with mod s | mod ÷ plain | × SDPA (with mod) |\n|---|---|---|---|---|---|---|")
    for method in methods:
        params = METHODS[method]
        def infer(score_mod=None):
            with torch.no_grad():
                az.attention(q, k, v, method=method, causal=True, score_mod=score_mod, **params)

        def train(score_mod=None):
            az.attention(qg, kg, vg, method=method, causal=True, score_mod=score_mod, **params).sum().backward()

        for mode, fn, ref in (("inference", infer, sdpa), ("fwd+bwd", train, sdpa_train)):
            if mode not in modes:
                continue
            plain = best(fn, repeats, clock)
            for name, m in mod_list.items():
                t = best(lambda: fn(m), repeats, clock)
                print(f"| {method} | {name} | {mode} | {plain:.3f} | {t:.3f} | {t / plain:.2f} | {ref / t:.2f} |",
                      flush=True)


def varlen_table(total: int, docs: int, repeats: int, clock: str = "wall") -> None:
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(total - 1, generator=g)[: docs - 1] + 1).values.tolist()
    bounds = [0, *cuts, total]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v = (torch.randn(1, H, total, D, generator=g) for _ in range(3))
    longest = max(lengths)
    mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # right padding

    def padded_batch(t):
        out = t.new_zeros(docs, H, longest, D)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            out[i, :, : b - a] = t[0, :, a:b]
        return out

    pq, pk, pv = padded_batch(q), padded_batch(k), padded_batch(v)
    with torch.no_grad():
        packed = best(lambda: az.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu), repeats, clock)
        padded = best(lambda: az.attention(pq, pk, pv, causal=True, key_padding_mask=mask), repeats, clock)
        attn_mask = mask[:, None, None, :] & torch.ones(longest, longest, dtype=torch.bool).tril()
        sdpa = best(lambda: F.scaled_dot_product_attention(pq, pk, pv, attn_mask=attn_mask), repeats, clock)
        # same result on the real tokens
        a = az.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
        b = az.attention(pq, pk, pv, causal=True, key_padding_mask=mask)
        err = max(float((a[0, :, x:y] - b[i, :, : y - x]).abs().max())
                  for i, (x, y) in enumerate(zip(bounds, bounds[1:])))
    print(f"\n## varlen: {docs} documents, lengths {lengths} (total {total}, padded to {docs} × {longest})\n")
    print("| call | s | × SDPA (padded batch) |\n|---|---|---|")
    print(f"| exact, packed (cu_seqlens) | {packed:.3f} | {sdpa / packed:.2f} |")
    print(f"| exact, padded batch + key_padding_mask | {padded:.3f} | {sdpa / padded:.2f} |")
    print(f"\npadded ÷ packed = {padded / packed:.2f}× (max |packed - padded| on real tokens: {err:.1e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="sequence length of the score_mod table")
    ap.add_argument("--total", type=int, default=16384, help="packed tokens of the varlen table")
    ap.add_argument("--docs", type=int, default=8, help="documents of the varlen table")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "own"), default="wall",
                    help="own: each call's wall time less its wait for a core (attnzoo.bench.metrics.bench_clock)")
    ap.add_argument("--quick", action="store_true", help="N=512, 8 documents summing to 2K")
    ap.add_argument("--only", choices=("score_mod", "varlen"), help="run one table")
    ap.add_argument("--methods", default=",".join(METHODS), help="score_mod table: comma-separated methods")
    ap.add_argument("--modes", default=",".join(MODES), help="score_mod table: inference and/or fwd+bwd")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.quick:
        a.n, a.total, a.repeats = 512, 2048, 2
    if a.only != "varlen":
        methods, modes = a.methods.split(","), a.modes.split(",")
        bad = [m for m in methods if m not in METHODS] + [m for m in modes if m not in MODES]
        if bad:
            ap.error(f"unknown --methods/--modes entries {bad}; choose from {list(METHODS)} and {list(MODES)}")
        score_mod_table(a.n, a.repeats, methods, modes, a.clock)
    if a.only != "score_mod":
        varlen_table(a.total, a.docs, a.repeats, a.clock)


if __name__ == "__main__":
    main()

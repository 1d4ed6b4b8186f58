"""Per attention call decode latency of the select policies against the ``full`` cache, min of repeats.

One decode step = append one token + attend its query, on a KVCache that holds
``L`` random tokens. The policies' steps are interleaved (one step of each per
round), so every ratio comes from the same stretch of a shared machine's load;
each row is the minimum over ``--rounds`` rounds. ``× full`` = full's time ÷ the
row's (bigger is better). Each policy gets ``attnzoo eval``'s parameters for the
budget fraction ``--budget / --length`` (defaults such as tokenselect's sinks and
local window scaled down with it). The SDPA row is what the model runs without attnzoo:
transformers' DynamicCache appends by concatenation and SDPA reads every key (``× SDPA``). Shapes default to SmolLM2-135M's layers (9 query
heads, 3 KV heads, D=64); ``--heads 32 --heads-kv 8 --dim 128`` is
benchmarks/decode.py's.

    python benchmarks/decode_call.py --length 8192 --budget 1024
"""

from __future__ import annotations

import argparse
import time

import torch

from attnzoo.cache import KVCache
from attnzoo.eval.cases import policy_params

#: the baseline row: transformers' DynamicCache (append by torch.cat) read by SDPA
SDPA = "SDPA (DynamicCache: cat + SDPA)"
ROWS = {
    "full": ("full", {}),
    "quest": ("quest", {}),
    "quest (page 16, fp32 bounds: session 5)": ("quest", dict(page=16, bound_dtype="float32")),
    "quest (page 16, bf16 bounds)": ("quest", dict(page=16)),
    "tokenselect (default: page-first, pages=1, page 64)": ("tokenselect", {}),
    "tokenselect (page-first, pages=1, page 32)": ("tokenselect", dict(page=32)),
    "tokenselect (page-first, pages=2)": ("tokenselect", dict(pages=2.0)),
    "tokenselect (exact vote, fp32 scores: pages=0)": ("tokenselect", dict(pages=0.0)),
    "tokenselect (exact vote, bf16 scores)": ("tokenselect", dict(pages=0.0, score_dtype="bfloat16")),
    "tokenselect (exact vote, int8 scores)": ("tokenselect", dict(pages=0.0, score_dtype="int8")),
    "infllm": ("infllm", {}),
    "recycled (every 8)": ("recycled", dict(every=8)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--heads-kv", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    L, Hq, Hkv, D = args.length, args.heads, args.heads_kv, args.dim
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, Hkv, L, D, generator=g), torch.randn(1, Hkv, L, D, generator=g)
    caches = {}
    for label, (policy, params) in ROWS.items():
        if policy != "full":
            params = policy_params(policy, params, args.budget / L, L)
        cache = KVCache(policy, **params)
        cache.append(k, v)
        cache.attend(torch.randn(1, Hq, 32, D, generator=g))
        caches[label] = cache
    best = dict.fromkeys([SDPA, *caches], float("inf"))
    sdpa_kv = k, v
    for _ in range(args.rounds):
        q, kt, vt = torch.randn(1, Hq, 1, D, generator=g), torch.randn(1, Hkv, 1, D, generator=g), \
            torch.randn(1, Hkv, 1, D, generator=g)
        t0 = time.perf_counter()  # transformers' DynamicCache appends by concatenation, then SDPA reads it all
        sdpa_kv = torch.cat([sdpa_kv[0], kt], 2), torch.cat([sdpa_kv[1], vt], 2)
        torch.nn.functional.scaled_dot_product_attention(q, *sdpa_kv, enable_gqa=True)
        best[SDPA] = min(best[SDPA], time.perf_counter() - t0)
        for label, cache in caches.items():
            t0 = time.perf_counter()
            cache.append(kt, vt)
            cache.attend(q)
            best[label] = min(best[label], time.perf_counter() - t0)
    print(f"# decode per attention call: L={L}, budget={args.budget}, Hq={Hq}, Hkv={Hkv}, D={D}, fp32, "
          f"threads={args.threads}, min of {args.rounds} interleaved rounds")
    print("| policy | ms/call | × full | × SDPA | MiB held | × full held | MiB allocated |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    full = caches["full"].nbytes
    for label, t in best.items():
        cache = caches.get(label)
        held = (full, "", "") if cache is None else (cache.nbytes, f"{cache.nbytes / full:.3f}",
                                                      f"{cache.allocated_nbytes / 2**20:.1f}")
        print(f"| {label} | {t * 1e3:.2f} | {best['full'] / t:.2f} | {best[SDPA] / t:.2f} | {held[0] / 2**20:.1f} | "
              f"{held[1]} | {held[2]} |")


if __name__ == "__main__":
    main()

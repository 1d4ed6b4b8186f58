"""Decode-step latency, held bytes, mass recall and output error of every KVCache policy.

H=32 query heads, 8 KV heads, D=128, fp32, B=1. For each context length L the
cache receives L tokens (the last ``--observe`` of them as one chunk whose
queries are attended, as at the end of a prefill: it also warms every code
path up), then ``--steps`` decode steps each append one token and attend its
query. Reported per step, as the mean over all steps (the default 8 steps are
one period of ``recycled`` and two of LServe's reuse, so their amortised cost shows):

* ``ms/step``, ``× SDPA``, ``× flash_decode``: latency of append + attend, and
  the latency of one ``scaled_dot_product_attention`` (resp. the ``flash_decode``
  method) over the whole context, no cache, divided by it. ``flash_decode`` is
  timed right after each step of the row (paired: the machine's load moves a lot
  on a shared box), SDPA once per length before the rows;
* ``1st step``: the first decode step alone (one-time costs land there, e.g. the
  faiss index build);
* ``MiB held``: ``KVCache.nbytes`` after the last step;
* ``recall``: attention mass of the keys the policy read, ``exp(lse - lse_full)``,
  averaged over heads and decode steps, at most 1; ``-`` where the policy changes the
  scores rather than choosing keys (``quantized``, ``razor`` with its compensation
  token), since there the ratio is no share of the mass; ``needle recall``: the same over
  the decode queries that carry a planted needle;
* ``rel err``: ``‖out - out_full‖ / ‖out_full‖``.

Workloads: ``random`` (docs/methods.md, Benchmark workloads) and ``needle`` (G2:
needles + sink + locality). The needle and sink strengths grow with ``ln L``
(needle ``ln L + 4``, sink ``ln L``) so that, as in a retrieval head of a real
model, a needle holds most of its query's mass at every length (with the
generator's fixed strength 10 a needle holds under 5% of the mass at 128K, and
no 2048-token budget could recall 95%: ``--workloads needle10`` keeps those
strengths); about four needles per query are planted, so almost every decode
query carries one. The generator points a needle key along its query, sink
direction included, so needle keys also draw mass from other queries.

    python benchmarks/decode.py            # L in {4K, 32K, 128K}
    python benchmarks/decode.py --quick    # L = 4K, a few steps (< 1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script lives in

import attnzoo  # noqa: E402
from attnzoo import checks  # noqa: E402
from attnzoo.bench import workloads  # noqa: E402
from attnzoo.cache import KVCache, policies  # noqa: E402

HEADS, HEADS_KV, DIM = 32, 8, 128


def policy_table(budget: int) -> dict[str, tuple[str, dict]]:
    """Row label -> (policy, parameters) at a read/hold budget of ``budget`` tokens."""
    half = tuple(h % 2 == 0 for h in range(HEADS_KV))
    return {
        "full (KVCache)": ("full", {}),
        "quantized int8": ("quantized", dict(bits=8)),
        "quantized int4": ("quantized", dict(bits=4)),
        "streaming": ("streaming", dict(sinks=4, window=budget - 4)),
        "h2o": ("h2o", dict(budget=budget)),
        "snapkv (interval 32)": ("snapkv", dict(budget=budget, interval=32)),
        "razor (2/8 full)": ("razor", dict(retrieval_heads=(0, 1), sinks=4, window=budget - 4)),
        "duo (4/8 full)": ("duo", dict(plan=half, sinks=64, window=budget - 64)),
        "tokenselect": ("tokenselect", dict(budget=budget)),
        "tokenselect (exact vote, bf16 scores)": ("tokenselect", dict(budget=budget, pages=0.0, score_dtype="bfloat16")),
        "quest": ("quest", dict(budget=budget, page=16)),
        "quest LServe (64/16, r=4)": ("quest", dict(budget=budget, page=16, phys_page=64, reuse=4)),
        "infllm": ("infllm", dict(budget=budget)),
        "recycled (every 8)": ("recycled", dict(budget=budget, every=8)),
        "retrieval (exact)": ("retrieval", dict(budget=budget, index="exact")),
        "retrieval (faiss HNSW)": ("retrieval", dict(budget=budget, index="faiss")),
    }


def select_rows(spec: str, table: dict) -> list[str]:
    """Row labels from a comma-separated list (labels may contain commas themselves)."""
    rows, piece = [], ""
    for part in spec.split(","):
        piece = f"{piece},{part}" if piece else part
        if piece.strip() in table:
            rows.append(piece.strip())
            piece = ""
    if piece:
        raise SystemExit(f"--policies: unknown row label {piece.strip()!r}; expected some of {sorted(table)}")
    return rows


def skip_reason(label: str, length: int) -> str | None:
    """Why a row is not run at this length (None: it runs)."""
    if "faiss" in label:
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss-cpu not installed"
        if length > 32768:
            return "HNSW build over 8 heads x L keys takes more than 5 minutes here"
    return None


def make_inputs(workload: str, length: int, steps: int, observe: int, seed: int):
    """q for the last ``observe`` context tokens and the ``steps`` decode tokens; k/v for all."""
    if workload == "random":
        name, extra = "gaussian", {}
    elif workload == "needle":
        name, extra = "needle", dict(needles=4 * (observe + steps), strength=math.log(length) + 4, sink=math.log(length))
    else:  # "needle10": the generator's default strengths (needle 10, sink 4) whatever L
        name, extra = "needle", dict(needles=4 * (observe + steps))
    return workloads.make(name, batch=1, heads=HEADS, heads_kv=HEADS_KV, length=length + steps,
                          len_q=observe + steps, dim=DIM, seed=seed, **extra)


def run_cache(policy: str, params: dict, qkv, length: int, steps: int, observe: int, paired=None):
    """Fill, attend the observation chunk, then decode; returns per-step times, outputs, lses, nbytes.

    ``paired(q, k, v)``, when given, is timed right after each step over the same context and its
    times are returned too, so a ratio compares steps taken under the same machine load.
    """
    q, k, v = qkv.q, qkv.k, qkv.v
    cache = KVCache(policy, **params)
    cache.append(k[:, :, : length - observe], v[:, :, : length - observe])
    cache.append(k[:, :, length - observe: length], v[:, :, length - observe: length])
    cache.attend(q[:, :, :observe])
    times, pair_times, outs, lses = [], [], [], []
    for t in range(steps):
        pos = length + t
        qt = q[:, :, observe + t: observe + t + 1]
        t0 = time.perf_counter()
        cache.append(k[:, :, pos: pos + 1], v[:, :, pos: pos + 1])
        out, lse = cache.attend(qt, return_lse=True)
        t1 = time.perf_counter()
        if paired is not None:
            paired(qt, k[:, :, : pos + 1], v[:, :, : pos + 1])
        pair_times.append(time.perf_counter() - t1)
        times.append(t1 - t0)
        outs.append(out)
        lses.append(lse)
    nbytes = cache.nbytes
    del cache
    gc.collect()
    return times, pair_times, outs, lses, nbytes


def time_plain(fn, qkv, length: int, steps: int, observe: int) -> list[float]:
    """Per-step time of a cache-less call over the whole context (SDPA, the flash_decode method)."""
    times = []
    for t in range(steps):
        n = length + t + 1
        qt = qkv.q[:, :, observe + t: observe + t + 1]
        t0 = time.perf_counter()
        fn(qt, qkv.k[:, :, :n], qkv.v[:, :, :n])
        times.append(time.perf_counter() - t0)
    return times


def per_step(times: list[float]) -> float:
    return statistics.mean(times)


def reads_a_subset(policy: str, params: dict) -> bool:
    """True when the policy's read is exact attention over a subset of the held keys (recall is a mass)."""
    cls = policies()[policy]
    if policy == "quantized":
        return False
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    return not params.get("compensation", fields.get("compensation", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L = 4K only")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--observe", type=int, default=32)
    ap.add_argument("--workloads", default="random,needle")
    ap.add_argument("--policies", default="", help="comma-separated row labels (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (on a shared 2-core machine, 1 avoids thread-sync stalls)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [4096] if args.quick else [int(x) for x in args.lengths.split(",")]
    steps = args.steps
    checks.CHECK_FINITE = False  # the inputs are generated finite; skip the scan of the whole context per call
    table = policy_table(args.budget)
    if args.policies:
        table = {k: table[k] for k in select_rows(args.policies, table)}
    flash = attnzoo.get("flash_decode")

    def flash_step(q, k, v):
        return flash(q, k, v, causal=True)

    print(f"# decode benchmark: B=1, Hq={HEADS}, Hkv={HEADS_KV}, D={DIM}, fp32, budget={args.budget}, "
          f"{steps} steps, torch threads={torch.get_num_threads()}")
    print("| workload | L | method | ms/step | 1st step | × SDPA | × flash_decode | MiB held | recall | needle recall "
          "| rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        for length in lengths:
            qkv = make_inputs(workload, length, steps, args.observe, args.seed)
            with torch.no_grad():
                sdpa = per_step(time_plain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                           qkv, length, steps, args.observe))
                fd = per_step(time_plain(flash_step, qkv, length, steps, args.observe))
            kv_mib = 2 * qkv.k[:, :, :length].numel() * 4 / 2**20
            row = f"| {workload} | {length // 1024}K |"
            print(f"{row} full (SDPA) | {sdpa * 1e3:.1f} | | 1.00 | {fd / sdpa:.2f} | {kv_mib:.0f} (K+V) | 1 | 1 | 0 |",
                  flush=True)
            print(f"{row} flash_decode | {fd * 1e3:.1f} | | {sdpa / fd:.2f} | 1.00 | - | 1 | 1 | 0 |", flush=True)
            needle_steps = sorted({i - args.observe for i, _ in qkv.meta.get("needles", []) if i >= args.observe})
            ref_out = ref_lse = None
            for label, (policy, params) in table.items():
                if policy == "full" and ref_out is not None:
                    continue
                reason = skip_reason(label, length)
                if reason:
                    print(f"{row} {label} | skipped: {reason} | | | | | | | |", flush=True)
                    continue
                times, fd_times, outs, lses, nbytes = run_cache(policy, params, qkv, length, steps, args.observe,
                                                                paired=flash_step)
                if ref_out is None:  # the first row is the full cache: the reference of every other row
                    if policy != "full":
                        _, _, ref_out, ref_lse, _ = run_cache("full", {}, qkv, length, steps, args.observe)
                    else:
                        ref_out, ref_lse = outs, lses
                recalls = [torch.exp(a - b).mean().item() for a, b in zip(lses, ref_lse)]
                if reads_a_subset(policy, params):
                    recall = f"{statistics.mean(recalls):.3f}"
                    needle = f"{statistics.mean(recalls[t] for t in needle_steps):.3f}" if needle_steps else "-"
                else:  # changed scores (quantised keys, a compensation token): exp(lse - lse_full) is no mass
                    recall = needle = "-"
                err = statistics.mean(((a - b).norm() / b.norm()).item() for a, b in zip(outs, ref_out))
                ms = per_step(times)
                print(f"{row} {label} | {ms * 1e3:.1f} | {times[0] * 1e3:.1f} | {sdpa / ms:.2f} | "
                      f"{per_step(fd_times) / ms:.2f} | "
                      f"{nbytes / 2**20:.1f} | "
                      f"{recall} | {needle} | {err:.2e} |", flush=True)
            del qkv, ref_out, ref_lse
            gc.collect()


if __name__ == "__main__":
    main()

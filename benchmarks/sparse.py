"""Sparse attention on CPU: attnzoo's block-sparse engine vs SDPA and compiled FlexAttention.

B=1, H=8, D=64, fp32, causal. Times are medians of ``--runs`` runs after one
warm-up (layout/mask building and compilation reported separately); the
window methods also report the resident memory their call adds at its peak. Dynamic
methods run on the seeded ``vertical_slash`` workload and report attention-mass
recall (mean over 256 sampled rows of exp(lse_method - lse_exact)) and the time
of ``block_sparse`` replaying the layout they chose.

    python benchmarks/sparse.py            # N in 4K, 16K, 64K
    python benchmarks/sparse.py --quick    # N = 1K, 2K
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench import workloads
from attnzoo.bench.metrics import peak_memory, time_calls

H, D = 8, 64


def timed(fn, runs):
    """Median of ``runs`` timed calls after one warm-up; ``runs=0`` times the single (cold) call."""
    if runs:
        fn()
    return time_calls(fn, repeat=max(runs, 1), budget_s=math.inf).median


def sampled_recall(q, k, lse, rows=256):
    """Mean over sampled rows of the exact softmax mass on the method's keys (causal)."""
    n = q.shape[2]
    idx = torch.linspace(n // 8, n - 1, rows).long()
    s = torch.matmul(q[:, :, idx], k.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.arange(n).view(1, -1) > idx.view(-1, 1), -math.inf)
    return float(torch.exp(lse[:, :, idx] - torch.logsumexp(s, -1)).mean())


def flex_row(q, k, v, window, runs):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        n = q.shape[2]

        def sliding(b, h, qi, kj):
            return (kj <= qi) & (qi - kj < window)

        t = time.perf_counter()
        # past 16K the mask build is compiled: eager builds a dense N x N mask (4 Gi elements at 64K)
        build_mask = torch.compile(create_block_mask) if n > 16384 else create_block_mask
        mask = build_mask(sliding, None, None, n, n, device="cpu")
        build = time.perf_counter() - t
        compiled = torch.compile(flex_attention)
        t = time.perf_counter()
        compiled(q, k, v, block_mask=mask)
        compile_s = time.perf_counter() - t
        return timed(lambda: compiled(q, k, v, block_mask=mask), runs), f"mask {build:.1f}s, compile {compile_s:.1f}s"
    except Exception as e:  # report, never hide
        return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    sizes = args.sizes or ([1024, 2048] if args.quick else [4096, 16384, 65536])
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'N':>6} {'method':<44} {'time s':>9} {'× SDPA':>8} {'density':>8} {'recall':>7}  note")
    for n in sizes:
        q, k, v, _ = workloads.make("vertical_slash", length=n, heads=H, dim=D, seed=0)
        rows = []
        with torch.no_grad():
            if n <= 16384:
                sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.runs)
                note = ""
            else:  # ~5 min per run on 2 cores: one run on 1 of the 8 heads, scaled by 8
                sdpa = 8 * timed(lambda: F.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1], is_causal=True), 0)
                note = "1 head x 8 (full run > 5 min)"
            rows.append(("SDPA causal", sdpa, None, None, note))
            if n <= 16384:
                i = torch.arange(n)
                dense = (i.view(1, -1) <= i.view(-1, 1)) & (i.view(-1, 1) - i.view(1, -1) < 512)
                rows.append(("SDPA dense bool mask (window 512)",
                             timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), args.runs),
                             512 / (n / 2), None, ""))
            else:
                rows.append(("SDPA dense bool mask (window 512)", None, None, None,
                             f"skipped: mask {n * n / 2**30:.0f} GiB"))
            flex = None
            if not args.no_flex:
                flex, note = flex_row(q, k, v, 512, args.runs)
                rows.append(("flex_attention compiled (window 512)", flex, None, None, note))
            for name, params in (("sliding_window", dict(window=512)), ("streaming", dict(sinks=4, window=512))):
                m = az.get(name, **params)
                t0 = time.perf_counter()
                m(q, k, v, causal=True)  # builds and caches the layout and its band plan
                first = time.perf_counter() - t0
                t = timed(lambda: m(q, k, v, causal=True), args.runs)
                _, peak = peak_memory(lambda: m(q, k, v, causal=True))
                vs_flex = "" if flex is None else f", {flex / t:.2f}x flex"
                mem = "" if peak is None else f", peak +{peak / 2**20:.0f} MiB (output {q.numel() * 4 / 2**20:.0f})"
                rows.append((f"{name}{tuple(params.values())}", t, m.layouts(q, k, causal=True)[0].density(True),
                             None, f"first call {first:.1f}s (builds the plan){vs_flex}{mem}"))
            nkb = n // 64
            dyn = (("block_topk", dict(block=64, topk=max(1, round(0.075 * nkb / 2)))),
                   ("vertical_slash", dict(block=64, n_vertical=max(16, n // 64), n_slash=max(2, n // 2048))))
            for name, params in dyn:
                m = az.get(name, **params)
                t = timed(lambda: m(q, k, v, causal=True), args.runs)
                _, lse = m(q, k, v, causal=True, return_lse=True)
                lays = tuple(m.layouts(q, k, causal=True))
                replay = az.get("block_sparse", layout=lays)
                tr = timed(lambda: replay(q, k, v, causal=True), args.runs)
                dens = lays[0].density(True) + (sum(int((lay.kv_tokens >= 0).sum()) * 64 for lay in lays[1:])
                                                / (H * n * n / 2))
                label = ", ".join(f"{a}={b}" for a, b in params.items() if a != "block")
                rows.append((f"{name}({label})", t, dens, sampled_recall(q, k, lse), f"{t / tr:.2f}x block_sparse replay ({tr:.2f}s)"))
        for name, t, dens, rec, note in rows:
            ts = "-" if t is None else f"{t:9.3f}"
            ratio = "-" if t is None else f"{sdpa / t:7.1f}x"
            print(f"{n:>6} {name:<44} {ts:>9} {ratio:>8} {'-' if dens is None else f'{dens:.3f}':>8} "
                  f"{'-' if rec is None else f'{rec:.3f}':>7}  {note}", flush=True)


if __name__ == "__main__":
    main()

"""Grid attention patterns on CPU: attnzoo's sorted block-sparse path vs dense SDPA under the same mask.

Swin windows (``window2d``), DiNA / NATTEN neighbourhoods (``neighborhood2d``) on 64×64 and 128×128 grids
and the Attention Tile video pattern (``tile3d``) on a 16×32×32 video, all in one run. B=1, H=1, D=32,
fp32, one thread (a dense 16K×16K score matrix is 1 GiB per head). Times are the minimum of ``--runs``
calls after a warm-up (the first call also builds and caches the layout: reported as "first").
"× SDPA" = plain SDPA time (no mask, all keys) ÷ ours; "× masked" = dense SDPA with the bool mask ÷ ours.
Peak = resident memory the call adds at its peak (the mask itself is built before and not counted);
"kept" = what the method's cached layout holds between calls (block lists and the fused path's kernel masks).

    python benchmarks/vision.py            # the full table
    python benchmarks/vision.py --quick    # 32×32 grids and an 8×16×16 video
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import grid as G
from attnzoo.bench.metrics import output_errors, peak_memory, time_calls

D = 32


def cases(quick: bool):
    s1, s2 = (32, 48) if quick else (64, 128)
    video = (8, 16, 16) if quick else (16, 32, 32)
    out = []
    for side in (s1, s2):
        g = (side, side)
        out += [("swin w8 s4", "window2d", g, dict(window=8, shift=4), G.window_mask_mod(g, 8, 4)),
                ("dina k7 d1", "neighborhood2d", g, dict(kernel=7, dilation=1), G.neighborhood_mask_mod(g, 7, 1)),
                (f"dina k7 d{side // 7}", "neighborhood2d", g, dict(kernel=7, dilation=side // 7),
                 G.neighborhood_mask_mod(g, 7, side // 7))]
    T, H, W = video
    out += [("tile (1,H,W) r1", "tile3d", video, dict(ref_frames=1), G.tile3d_mask_mod(video, (1, H, W), 1)),
            ("tile (2,H/2,W/2) r1", "tile3d", video, dict(tile=(2, H // 2, W // 2), ref_frames=1),
             G.tile3d_mask_mod(video, (2, H // 2, W // 2), 1))]
    return out


def held_bytes(layout) -> int:
    """Bytes of the tensors a layout holds: its block lists and what its executor keeps (kernel masks, the
    band plan's masks)."""
    kept = []
    for v in (layout.mask_cache or {}).values():
        kept += v if isinstance(v, tuple) else list(vars(v).values()) if hasattr(v, "__dataclass_fields__") else [v]
    return sum(t.numel() * t.element_size() for t in [layout.kv_blocks, layout.partial, *kept]
               if isinstance(t, torch.Tensor))


def best(fn, runs):
    fn()
    return min(time_calls(fn, repeat=runs, budget_s=math.inf).runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"B=1 H=1 D={D} fp32, threads=1, min of {args.runs} runs; peak = RSS added by the call")
    head = (f"{'pattern':<20}{'grid':>12}{'N':>7}{'density':>9}{'first s':>9}{'ours ms':>9}{'masked ms':>10}"
            f"{'SDPA ms':>9}{'× masked':>9}{'× SDPA':>8}{'peak MiB':>9}{'kept MiB':>9}{'masked MiB':>11}{'rel err':>9}")
    print(head)
    for label, method, grid, params, mm in cases(args.quick):
        n = math.prod(grid)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, n, D, generator=gen) for _ in range(3))
        m = az.get(method, grid=grid, **params)
        t0 = time.perf_counter()
        m(q, k, v)
        first = time.perf_counter() - t0
        ours = best(lambda: m(q, k, v), args.runs)
        out, peak = peak_memory(lambda: m(q, k, v))
        idx = torch.arange(n)
        mask = torch.cat([mm(0, 0, idx[i:i + 1024, None], idx[None]) for i in range(0, n, 1024)])
        density = float(mask.float().mean())
        masked = best(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.runs)
        ref, peak_masked = peak_memory(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        sdpa = best(lambda: F.scaled_dot_product_attention(q, k, v), args.runs)
        err = output_errors(out, ref)["rel_error"]
        kept = held_bytes(m.layout(n, q.device))
        mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
        print(f"{label:<20}{'×'.join(map(str, grid)):>12}{n:>7}{density:>9.4f}{first:>9.2f}{ours * 1e3:>9.1f}"
              f"{masked * 1e3:>10.1f}{sdpa * 1e3:>9.1f}{masked / ours:>9.1f}{sdpa / ours:>8.1f}{mib(peak):>9}"
              f"{kept / 2**20:>9.1f}{mib(peak_masked):>11}{err:>9.1e}", flush=True)
        del mask, ref, out


if __name__ == "__main__":
    main()

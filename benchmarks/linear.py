"""Benchmark of the chunked linear-recurrence engine (B=1, H=8, D=64, fp32, causal).

For each N: ``lightning`` and ``gla`` in the chunked form, the recurrent
(token-by-token) loop, the quadratic parallel form where it fits in memory,
SDPA causal, and flash-linear-attention's naive reference implementations when
they import on this machine (numerical agreement with ours is printed). Then
the fitted time exponent of the chunked form in N and a chunk-size sweep.

    python benchmarks/linear.py            # N in 2K, 4K, 8K, 32K, 64K
    python benchmarks/linear.py --quick    # small sizes, under a minute

Times are medians of ``--repeats`` runs after one warm-up; cases whose
estimated time exceeds ``--budget`` seconds or whose memory would exceed
``--max-gb`` are skipped and marked so.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnzoo.bench.metrics import time_calls  # noqa: E402
from attnzoo.core.linear import linear_attention  # noqa: E402

B, H, D = 1, 8, 64


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    return time_calls(fn, repeat=repeats, budget_s=math.inf).median


def timed_once(fn) -> float:
    """Wall time of one cold call (for cases too slow to repeat)."""
    return time_calls(fn, repeat=1, budget_s=math.inf).median


def load_fla_naive():
    """flash-linear-attention's naive references, loaded by file path (its package ``__init__`` needs triton)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None, "fla-core is not installed (pip install -e \".[fla]\")"
    root = Path(list(spec.submodule_search_locations)[0]) / "ops"
    try:
        mods = {}
        for name in ("gla", "simple_gla"):
            s = importlib.util.spec_from_file_location(f"_fla_naive_{name}", root / name / "naive.py")
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
            mods[name] = mod
        return mods, ""
    except Exception as e:  # noqa: BLE001  (report why the peer is skipped)
        return None, f"fla naive references do not import on this machine: {type(e).__name__}: {e}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def inputs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, H, n, D, generator=gen) + 3) / 4  # GLA-like gates, alpha ~ 0.99
    lam = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))  # RetNet decay, as `lightning` uses
    return q, k, v, g, torch.log(lam).float().view(1, H, 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    ap.add_argument("--sizes", type=int, nargs="*", help="sequence lengths (default 2048 4096 8192 32768 65536)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=300.0, help="skip a case whose one run is estimated longer (s)")
    ap.add_argument("--max-gb", type=float, default=3.0, help="skip the parallel form above this memory")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    sizes = args.sizes or ([256, 1024, 2048] if args.quick else [2048, 4096, 8192, 32768, 65536])
    sweep_n = 1024 if args.quick else 16384
    repeats = 1 if args.quick else args.repeats
    budget = min(args.budget, 3.0) if args.quick else args.budget
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fla, fla_why = load_fla_naive()
    print(f"# linear engine benchmark: B={B} H={H} D={D} fp32 causal; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"# flash-linear-attention naive peer: {'loaded' if fla else 'SKIPPED - ' + fla_why}")

    cols = ["N", "lightning chunked", "gla chunked", "recurrent loop", "parallel", "SDPA causal",
            "fla naive_chunk_simple_gla", "fla naive_recurrent_gla", "SDPA/lightning", "recurrent/chunked",
            "rel err vs fla"]
    rows, chunked_times = [], {}
    last = {}

    def maybe(name: str, n: int, power: float, fn):
        """Time ``fn`` unless extrapolating the previous size by N^power exceeds the budget.

        Cases expected to take over 5 s run once without warm-up (a long loop needs none).
        """
        estimate = None
        if name in last:
            n0, t0 = last[name]
            estimate = t0 * (n / n0) ** power
            if estimate > budget:
                return None, f"skip (~{estimate:.0f}s est.)"
        t = timed(fn, repeats) if estimate is None or estimate < 5 else timed_once(fn)
        last[name] = (n, t)
        return t, f"{t * 1e3:.1f} ms"

    for n in sizes:
        q, k, v, g, log_lam = inputs(n)
        scale = D**-0.5
        qs = q * scale
        gate_l = log_lam.expand(B, H, n, 1)
        with torch.no_grad():
            t_light, s_light = maybe("light", n, 1.0, lambda: linear_attention(qs, k, v, gate=gate_l, chunk=64))
            t_gla, s_gla = maybe("gla", n, 1.0, lambda: linear_attention(qs, k, v, gate=g, chunk=64))
            t_rec, s_rec = maybe("rec", n, 1.0, lambda: linear_attention(qs, k, v, gate=gate_l, form="recurrent"))
            par_gb = 5 * B * H * n * n * 4 / 2**30
            if par_gb > args.max_gb:
                t_par, s_par = None, f"skip (~{par_gb:.0f} GB)"
            else:
                t_par, s_par = maybe("par", n, 2.0, lambda: linear_attention(qs, k, v, gate=gate_l, form="parallel"))
            t_sdpa, s_sdpa = maybe("sdpa", n, 2.0, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            s_fc = s_fr = err = "-"
            if fla:
                t_fc, s_fc = maybe("fla_chunk", n, 1.0, lambda: fla["simple_gla"].naive_chunk_simple_gla(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate_l[..., 0].transpose(1, 2)))
                t_fr, s_fr = maybe("fla_rec", n, 1.0, lambda: fla["gla"].naive_recurrent_gla(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.transpose(1, 2)))
                ours_gla, _ = linear_attention(qs, k, v, gate=g, chunk=64)
                ours_light, _ = linear_attention(qs, k, v, gate=gate_l, chunk=64)
                errs = []
                if t_fc is not None:
                    ref, _ = fla["simple_gla"].naive_chunk_simple_gla(q.transpose(1, 2), k.transpose(1, 2),
                                                                      v.transpose(1, 2), gate_l[..., 0].transpose(1, 2))
                    errs.append(f"lightning {rel(ours_light, ref.transpose(1, 2)):.1e}")
                if t_fr is not None:
                    ref, _ = fla["gla"].naive_recurrent_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            g.transpose(1, 2))
                    errs.append(f"gla {rel(ours_gla, ref.transpose(1, 2)):.1e}")
                err = "; ".join(errs) or "-"
        chunked_times[n] = t_light
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.1f}x"  # noqa: E731
        rows.append([str(n), s_light, s_gla, s_rec, s_par, s_sdpa, s_fc, s_fr, ratio(t_sdpa, t_light),
                     ratio(t_rec, t_light), err])
        print(f"#   done N={n}", flush=True)

    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r) + " |")

    fit = [(n, t) for n, t in sorted(chunked_times.items()) if t is not None and (args.quick or n >= 8192)]
    while len(fit) >= 2 and fit[1][1] <= fit[0][1]:  # overhead-dominated short lengths: time does not grow yet
        fit = fit[1:]
    slope = None
    if len(fit) >= 2:
        xs, ys = [math.log(n) for n, _ in fit], [math.log(t) for _, t in fit]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope is not None and slope > 0:
        print(f"\nchunked lightning: fitted time exponent in N over N in {[n for n, _ in fit]}: {slope:.2f}")
    else:
        print("\nchunked lightning: no time exponent fitted: the time does not grow over these lengths "
              "(fixed costs dominate; run without --quick for longer ones)")

    print(f"\nchunk-size sweep at N={sweep_n} (chunked form, ms):")
    q, k, v, g, log_lam = inputs(sweep_n)
    gate_l = log_lam.expand(B, H, sweep_n, 1)
    print("| chunk | lightning | gla |\n|---|---|---|")
    with torch.no_grad():
        for c in (16, 32, 64, 128, 256):
            t_l = timed(lambda: linear_attention(q * D**-0.5, k, v, gate=gate_l, chunk=c), repeats)
            t_g = timed(lambda: linear_attention(q * D**-0.5, k, v, gate=g, chunk=c), repeats)
            print(f"| {c} | {t_l * 1e3:.1f} | {t_g * 1e3:.1f} |")


if __name__ == "__main__":
    main()

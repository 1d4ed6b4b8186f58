"""Exact attention: attnzoo's `exact` and `exact_tiled` against PyTorch SDPA, in one run.

B=1, H=8, D=64, fp32, N in {1K, 2K, 4K, 8K, 16K}, causal and not.

- Time: the three implementations are timed round-robin in this process
  (one call of each per round, after a warm-up round), so machine noise hits
  them alike; the minimum over rounds is reported (the least disturbed run; timings on a shared machine
  are noisy) with the spread, and ``× SDPA`` = SDPA time ÷ method time (bigger is better).
- ``--grad`` times forward + backward instead (exact_tiled's custom backward vs SDPA's autograd).
- Peak memory: each case also runs once in a fresh subprocess, measured by
  ``attnzoo.bench.metrics.peak_memory`` (the kernel's resident-set high-water
  mark is reset after the inputs exist; its growth is the call's peak extra
  memory: working buffers + output).
- Attention GFLOP/s is compared with a GEMM ceiling (a square fp32 matmul)
  measured by the same script.

    python benchmarks/exact.py            # the issue's sizes (~15 min on 2 cores)
    python benchmarks/exact.py --quick    # N in {1K, 2K}, for a first look
    python benchmarks/exact.py --lengths 4096 8192 16384 --threads 2 --no-memory   # exact_tiled's target sizes
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from attnzoo.bench.metrics import peak_memory


def _call(name: str, q, k, v, causal: bool, grad: bool = False):
    import attnzoo as az
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if name == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = az.attention(q, k, v, method=name, causal=causal)
    if grad:
        out.sum().backward()
    return out


def peak_extra_bytes(name: str, n: int, causal: bool, heads: int, dim: int) -> int:
    """Inside a fresh process: resident memory added at the peak of one call."""
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
    with torch.no_grad():
        _call(name, q[:, :, :64], k[:, :, :64], v[:, :, :64], causal)  # load lazy kernels first
        return peak_memory(lambda: _call(name, q, k, v, causal))[1]


def time_round_robin(names, n: int, causal: bool, heads: int, dim: int, repeat: int,
                     grad: bool = False) -> dict[str, list[float]]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.set_grad_enabled(grad):
        for r in range(repeat + 1):
            for name in names:
                t0 = time.perf_counter()
                _call(name, q, k, v, causal, grad)
                if r:  # round 0 is the warm-up
                    times[name].append(time.perf_counter() - t0)
    return times


def gemm_ceiling(size: int = 2048, repeat: int = 5) -> float:
    """GFLOP/s of a square fp32 matmul on this machine (the attainable compute ceiling)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def _row(causal: bool, n: int, name: str, times: list[float], sdpa_time: float, flops: float, ceiling: float,
         peak: str) -> str:
    best = min(times)
    return (f"{causal!s:>6} {n:>6} {name:>12} {best * 1e3:>9.1f} {(max(times) - best) * 1e3:>7.1f} "
            f"{sdpa_time / best:>7.2f}x {flops / best / 1e9:>8.1f} {100 * flops / best / 1e9 / ceiling:>6.1f}% {peak}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N in {1K, 2K} only")
    ap.add_argument("--lengths", type=int, nargs="*", help="override the sequence lengths")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--grad", action="store_true", help="time forward + backward (no memory column)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess per case")
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print JSON
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        name, n, causal = args.case.split(",")
        print(peak_extra_bytes(name, int(n), causal == "1", args.heads, args.dim))
        return
    lengths = args.lengths or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384])
    ceiling = gemm_ceiling()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"GEMM ceiling {ceiling:.1f} GFLOP/s; B=1 H={args.heads} D={args.dim} fp32; "
          f"{'forward + backward' if args.grad else 'forward'}; minimum of {args.repeat}")
    header = (f"{'causal':>6} {'N':>6} {'method':>12} {'time ms':>9} {'spread':>7} {'× SDPA':>8} "
              f"{'GFLOP/s':>8} {'% GEMM':>7} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
        for n in lengths:
            names = ("sdpa", "exact", "exact_tiled")
            times = time_round_robin(names, n, causal, args.heads, args.dim, args.repeat, args.grad)
            flops = 4 * args.heads * n * n * args.dim * (0.5 if causal else 1.0) * (3.5 if args.grad else 1.0)
            sdpa_time = min(times["sdpa"])
            for name in names:
                if args.grad or args.no_memory:
                    print(_row(causal, n, name, times[name], sdpa_time, flops, ceiling, ""), flush=True)
                    continue
                cmd = [sys.executable, __file__, "--case", f"{name},{n},{int(causal)}", "--heads", str(args.heads),
                       "--dim", str(args.dim), "--threads", str(torch.get_num_threads())]
                res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                peak = (f"{int(res.stdout.split()[-1]) / 2**20:>9.1f}" if res.returncode == 0
                        else f" failed: {res.stderr.strip().splitlines()[-1]}")
                print(_row(causal, n, name, times[name], sdpa_time, flops, ceiling, peak), flush=True)
    print("× SDPA = SDPA time / method time (bigger is better; exact_tiled's target: >= 0.8, i.e. within 1.25x); "
          "peak MiB = growth of resident memory at the peak of one call "
          f"(inputs excluded; q, k, v and out are {4 * args.heads * args.dim * 1024 / 2**20:.1f} MiB per 1K tokens each)")


if __name__ == "__main__":
    main()

"""GPU check and timings of attnzoo's Triton kernels, in one call of a few minutes (issue 15's Targets).

    python benchmarks/gpu.py                  # CUDA test subset, then every timing; writes gpu-results.json
    python benchmarks/gpu.py --skip-tests     # timings only
    python benchmarks/gpu.py --quick          # N = 8K only, fewer repeats (a smoke run)

bf16, B=1, H=32, Hkv=8, D=128, causal. Every row is timed in this run against
its peer in this run: torch SDPA (flash backend), compiled FlexAttention on the
same block mask (mask building excluded from flex, included in ours), compiled
flex with the same score_mod (softcap, ALiBi rows), fla's ``chunk_gla`` where fla imports, the copy bandwidth of the bytes a decode step
reads, and a bf16 GEMM ceiling measured here (TFLOP/s columns are / ceiling).
``× peer`` = peer time ÷ ours (bigger is better). Times: CUDA events, the
minimum of ``--repeats`` calls after warm-up. Exits with a message (status 2)
on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

B, H, HKV, D = 1, 32, 8, 128
DT = torch.bfloat16


def cuda_time(fn, repeats: int) -> float:
    """Minimum over ``repeats`` of one call's time in seconds (CUDA events), after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def gemm_ceiling(repeats: int) -> float:
    """bf16 GEMM TFLOP/s (8192³), the roof the attention rows are compared with."""
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    t = cuda_time(lambda: a @ b, repeats)
    return 2 * 8192 ** 3 / t / 1e12


def copy_bandwidth(repeats: int) -> float:
    """Device copy bandwidth in GB/s (bytes read + written by a 1 GiB clone)."""
    x = torch.empty(1 << 29, device="cuda", dtype=DT)
    t = cuda_time(lambda: x.clone(), repeats)
    return 2 * x.numel() * x.element_size() / t / 1e9


def qkv(n: int, n_q: int | None = None):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, n_q or n, D, device="cuda", dtype=DT, generator=g)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(B, HKV, n, D, device="cuda", dtype=DT, generator=g)
    return q, k, v


def sdpa_flash(q, k, v):
    """SDPA's flash backend, causal (GQA: K/V expanded for the kernel, as PyTorch's own GQA fallback does)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kk, vv = (t.repeat_interleave(H // HKV, 1) for t in (k, v))

    def call():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    return call


def causal_tflops(n: int, t: float) -> float:
    return 4 * B * H * n * n * D / 2 / t / 1e12


def rows_dense(ns, repeats, ceiling):
    import attnzoo as az
    out = []
    for n in ns:
        q, k, v = qkv(n)
        ours = cuda_time(lambda: az.attention(q, k, v, causal=True, backend="triton"), repeats)
        peer = cuda_time(sdpa_flash(q, k, v), repeats)
        out.append(dict(row="dense exact fwd", n=n, ours_ms=ours * 1e3, peer="sdpa flash", peer_ms=peer * 1e3,
                        x_peer=peer / ours, tflops=causal_tflops(n, ours),
                        of_ceiling=causal_tflops(n, ours) / ceiling, target="x_peer >= 0.9 at 16K"))
    return out


def rows_tiles(repeats, n=16384):
    """The dense forward's tile sizes at 16K (the dispatch uses 64 x 64): which default a GPU wants."""
    from attnzoo.kernels.attention import flash_attention
    q, k, v = qkv(n)
    out = []
    for bm, bn in ((64, 64), (128, 64), (64, 128), (128, 128)):
        try:
            t = cuda_time(lambda: flash_attention(q, k, v, scale=D ** -0.5, causal=True, block_m=bm, block_n=bn),
                          repeats)
            out.append(dict(row=f"dense tiles {bm}x{bn}", n=n, ours_ms=t * 1e3, tflops=causal_tflops(n, t)))
        except Exception as e:  # e.g. out of shared memory on a smaller GPU
            out.append(dict(row=f"dense tiles {bm}x{bn}", n=n, error=f"{type(e).__name__}: {e}"[:300]))
    return out


def rows_sparse(ns, repeats):
    import attnzoo as az
    from attnzoo.kernels.flex import block_mask, _compiled
    out = []
    for n in ns:
        q, k, v = qkv(n)
        for method, params in (("sliding_window", dict(window=2048, block=128)), ("block_topk", dict(block=128))):
            m = az.get(method, **params)
            ours = cuda_time(lambda: m(q, k, v, causal=True, backend="triton"), repeats)  # layout building included
            lay = m.layouts(q, k, causal=True)
            if len(lay) != 1:
                out.append(dict(row=method, n=n, ours_ms=ours * 1e3, peer="flex", note=f"{len(lay)} layouts"))
                continue
            bm = block_mask(lay[0], batch=B, heads_q=H, heads_kv=HKV, causal=True)
            flex = _compiled()
            peer = cuda_time(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), repeats)
            out.append(dict(row=method, n=n, ours_ms=ours * 1e3, peer="compiled flex (same mask)", peer_ms=peer * 1e3,
                            x_peer=peer / ours, density=lay[0].density(True), target="x_peer >= 1.2 at 32K"))
    return out


def rows_mods(ns, repeats):
    """score_mods as kernel specialisations (softcap at Gemma 2's 50, ALiBi with the paper's slopes), forward and
    forward+backward, against the same kernel without a mod (the overhead) and compiled FlexAttention with the
    same score_mod on a causal block mask (the peer; its mask building excluded); plus a learnable relative
    table's fwd+bwd (its gradient is added by per-element atomics: the row shows what they cost)."""
    import attnzoo as az
    from attnzoo.kernels.flex import _compiled
    from torch.nn.attention.flex_attention import create_block_mask

    out = []
    for n in ns:
        q, k, v = qkv(n)
        slopes = az.mods.alibi_slopes(H).to(q.device)
        cases = {"softcap": (az.mods.softcap(50.0), lambda s, b, h, qi, ki: 50.0 * torch.tanh(s / 50.0)),
                 "alibi": (az.mods.alibi(slopes), lambda s, b, h, qi, ki: s + slopes[h] * (ki - qi))}
        plain = cuda_time(lambda: az.attention(q, k, v, causal=True, backend="triton"), repeats)
        bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, n, n, device=q.device)
        flex = _compiled()
        for name, (mod, flex_mod) in cases.items():
            ours = cuda_time(lambda: az.attention(q, k, v, causal=True, score_mod=mod, backend="triton"), repeats)
            row = dict(row=f"{name} fwd", n=n, ours_ms=ours * 1e3, plain_ms=plain * 1e3, overhead=ours / plain,
                       target="overhead <= 1.3")
            try:
                peer = cuda_time(lambda: flex(q, k, v, score_mod=flex_mod, block_mask=bm, enable_gqa=True), repeats)
                row.update(peer="compiled flex (same mod)", peer_ms=peer * 1e3, x_peer=peer / ours)
            except Exception as e:  # flex compile failure must not cost the row
                row["note"] = f"flex: {type(e).__name__}: {e}"[:300]
            out.append(row)
        if n > 8192:
            continue
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        seed = torch.randn_like(q)
        base = cuda_time(lambda: az.attention(qg, kg, vg, causal=True, backend="triton").backward(seed), repeats)
        table = torch.zeros(H, 257, device=q.device, requires_grad=True)  # learnable: its gradient by atomics
        trained = {**{name: mod for name, (mod, _) in cases.items()}, "relative_bias(R=128, learnable)":
                   az.mods.relative_bias(table)}
        for name, mod in trained.items():
            t = cuda_time(lambda: az.attention(qg, kg, vg, causal=True, score_mod=mod, backend="triton").backward(seed),
                          repeats)
            out.append(dict(row=f"{name} fwd+bwd", n=n, ours_ms=t * 1e3, plain_ms=base * 1e3, overhead=t / base))
    return out


def rows_gla(ns, repeats):
    import attnzoo as az
    out = []
    try:
        from fla.ops.gla import chunk_gla
    except Exception as e:  # fla not installed here, or its import failed
        chunk_gla, why = None, f"fla unavailable: {type(e).__name__}: {e}"
    for n in ns:
        q, k, v = qkv(n)
        k, v = (t.repeat_interleave(H // HKV, 1) for t in (k, v))
        g = torch.nn.functional.logsigmoid(torch.randn(B, H, n, D, device="cuda")) / 16
        torch.backends.cuda.matmul.allow_tf32 = True  # our gla kernel runs in fp32: TF32 dots, like fla's
        try:
            ours = cuda_time(lambda: az.attention(q, k, v, method="gla", causal=True, g=g, backend="triton"),
                             repeats)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        row = dict(row="gla chunked fwd", n=n, ours_ms=ours * 1e3, peer="fla chunk_gla", target="x_peer >= 0.8 at 16K")
        if chunk_gla is None:
            row["note"] = why
        else:
            qt, kt, vt, gt = (t.transpose(1, 2).contiguous() for t in (q, k, v, g.to(DT)))  # fla: (B, N, H, D)
            peer = cuda_time(lambda: chunk_gla(qt, kt, vt, gt, scale=D ** -0.5), repeats)
            row.update(peer_ms=peer * 1e3, x_peer=peer / ours)
        out.append(row)
    return out


def rows_decode(repeats, bandwidth, n=131072):
    from attnzoo.kernels.attention import split_k
    q, k, v = qkv(n, n_q=1)
    t = cuda_time(lambda: split_k(q, k, v, scale=D ** -0.5, causal=True, splits=64), repeats)
    read = 2 * k.numel() * k.element_size()
    achieved = read / t / 1e9
    return [dict(row="split-K decode", n=n, ours_ms=t * 1e3, peer="copy bandwidth", gb_s=achieved,
                 peer_gb_s=bandwidth, x_peer=achieved / bandwidth, target="x_peer >= 0.9 at 128K")]


def rows_sage(ns, repeats):
    import attnzoo as az
    out = []
    for n in ns:
        q, k, v = qkv(n)
        ours = cuda_time(lambda: az.attention(q, k, v, method="sage", causal=True, backend="triton"), repeats)
        peer = cuda_time(sdpa_flash(q, k, v), repeats)
        got = az.attention(q, k, v, method="sage", causal=True, backend="triton").float()
        ref = sdpa_flash(q, k, v)().float()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0).item()
        out.append(dict(row="sage int8", n=n, ours_ms=ours * 1e3, peer="sdpa flash", peer_ms=peer * 1e3,
                        x_peer=peer / ours, cosine=cos, target="x_peer >= 1.5 and cosine >= 0.999 at 16K"))
    return out


def run_tests() -> int:
    """The kernel tests on CUDA (every method included: the slow marker too; not the no-GPU compile check)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "slow or not slow", "-k", "not compiles",  # really runs them
           "tests/test_kernels.py", "tests/test_backends.py"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 8K only, 3 repeats")
    ap.add_argument("--skip-tests", action="store_true", help="timings only")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="gpu-results.json", help="where the rows go (JSON)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); this script times the "
              "Triton kernels on a GPU. On CPU the kernels are checked by the test suite under TRITON_INTERPRET=1.",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/gpu.py: Triton is not installed (pip install 'attnzoo[gpu]')", file=sys.stderr)
        return 2
    started = time.time()
    status = 0 if args.skip_tests else run_tests()
    repeats = 3 if args.quick else args.repeats
    ns = [8192] if args.quick else [8192, 16384, 32768, 65536]
    header = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  tests_status=status)
    rows = []
    sections = [("gemm", lambda: [dict(row="bf16 GEMM ceiling", tflops=ceiling)]),
                ("dense", lambda: rows_dense(ns, repeats, ceiling)),
                ("tiles", lambda: rows_tiles(repeats)),
                ("sparse", lambda: rows_sparse([n for n in ns if n >= 16384] or ns, repeats)),
                ("gla", lambda: rows_gla([n for n in ns if n <= 16384], repeats)),
                ("decode", lambda: rows_decode(repeats, bandwidth)),
                ("sage", lambda: rows_sage([n for n in ns if n <= 16384], repeats)),
                ("mods", lambda: rows_mods([n for n in ns if n <= 16384], repeats))]
    ceiling = gemm_ceiling(repeats)
    bandwidth = copy_bandwidth(repeats)
    header.update(gemm_tflops=ceiling, copy_gb_s=bandwidth)
    for name, section in sections:
        try:
            new = section()
        except Exception as e:  # one failing section must not cost the others (GPU time is scarce)
            new = [dict(row=name, error=f"{type(e).__name__}: {e}")]
        for r in new:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        rows += new
        torch.cuda.empty_cache()
    header["seconds"] = time.time() - started
    with open(args.out, "w") as f:
        json.dump(dict(header=header, rows=rows), f, indent=1)
    print(f"wrote {args.out} ({header['seconds']:.0f} s; tests exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Compile every Triton kernel for CUDA targets without a GPU (Triton's bundled LLVM and ptxas), and print
each kernel's shared memory. Run in its own process: TRITON_INTERPRET must be unset when the kernels are
defined. Exits 1 when a kernel fails to compile for sm_90 (H100/H200) or needs more shared memory than it offers.
(sm_80 / A100, 163 KiB: the fp32 linear gradient kernel needs 176 KiB at D=128 and would not launch there.)"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnzoo.kernels import _attn, linear  # noqa: E402

#: usable shared memory per block (bytes): H100/H200
LIMITS = {90: 227 * 1024}


def compile_one(fn, ptrs, consts, arch, **options):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if "scale" in n else "i32") for n in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options=options).metadata.shared


def cases():
    base = dict(D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, BLOCK_M=64, BLOCK_N=64, ROW_TILE=64, KEY_UNIT=64,
                CAUSAL=True, HAS_PAD=True, PAD_HDIV=1, PREC="tf32")
    plain = dict(ALIBI=False, REL=False, SOFTCAP=False, VARLEN=False, POS=False)
    common = dict(TAB="*i32", PIDX="*i32", PM="*i8", PAD="*i8", LSE="*fp32", SLOPES="*fp32", TABLE="*fp32",
                  CUQ="*i32", CUK="*i32", QPOS="*i32", KPOS="*i32", SINKS="*fp32", DSLOPES="*fp32", DTABLE="*fp32", cap="fp32")
    fwd = dict(common, Q="*bf16", K="*bf16", V="*bf16", O="*bf16", QS="*fp32", KS="*fp32")
    bwd = dict(common, Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", DELTA="*fp32", DQ="*bf16", DK="*fp32",
               DV_="*fp32")
    for mode in (0, 1, 2):
        for quant in ((False, True) if mode == 0 else (False,)):
            t = "*i8" if quant else "*bf16"
            yield (_attn._fwd_kernel, dict(fwd, Q=t, K=t),
                   dict(base, **plain, MODE=mode, MASK=mode, QUANT=quant, Q_BLOCK=128, K_BLOCK=128, SINK=False), {})
        yield _attn._bwd_kernel, bwd, dict(base, **plain, MODE=mode, MASK=mode, BIAS_GRAD=False), {}
    # the score_mod / sinks / varlen / positions specialisations: every mod at once, dense and layouts, varlen
    # dense and on layouts (blocks, tokens), mods at reordered positions (blocks)
    every, softcap = dict(ALIBI=True, REL=True, SOFTCAP=True), dict(ALIBI=False, REL=False, SOFTCAP=True)
    for mods, mode, varlen, pos in ((every, 0, False, False), (every, 1, False, False), (every, 0, True, False),
                                    (softcap, 0, False, False), (every, 1, True, False), (every, 2, True, False),
                                    (every, 1, False, True)):
        spec = dict(base, **mods, VARLEN=varlen, POS=pos, MODE=mode, MASK=mode, HAS_PAD=not varlen)
        yield (_attn._fwd_kernel, fwd, dict(spec, QUANT=False, Q_BLOCK=128, K_BLOCK=128, SINK=True), {})
        yield _attn._bwd_kernel, bwd, dict(spec, BIAS_GRAD=True), {}
    p = "*fp32"
    lc = dict(BLOCK_C=linear.CHUNK, BLOCK_K=128, BLOCK_V=128, PREC="tf32")
    yield linear._states, dict(Q=p, K=p, V=p, G=p, S0=p, HS=p, FINAL=p), lc, dict(num_stages=1)
    yield linear._dstates, dict(Q=p, DO=p, G=p, DFINAL=p, HD=p, DS0=p), lc, dict(num_stages=1)
    for pc in (False, True):
        yield linear._outputs, dict(Q=p, K=p, V=p, G=p, HS=p, O=p), dict(lc, PER_CHANNEL=pc), {}
        yield (linear._grads, dict(Q=p, K=p, V=p, G=p, DO=p, HS=p, HD=p, DQ=p, DK_=p, DV_=p),
               dict(lc, PER_CHANNEL=pc), {})


def main() -> int:
    bad = 0
    for arch, limit in LIMITS.items():
        for fn, ptrs, consts, options in cases():
            flags = ("ALIBI", "SOFTCAP", "VARLEN", "POS")
            tag = {k: v for k, v in consts.items() if k in ("MODE", "QUANT", "PER_CHANNEL", *flags)
                   and (k not in flags or v)}
            try:
                shared = compile_one(fn, ptrs, consts, arch, **options)
            except Exception as e:  # a compile error is the finding
                print(f"sm_{arch} {fn.__name__} {tag}: FAILED {type(e).__name__}: {str(e)[:500]}")
                bad += 1
                continue
            ok = shared <= limit
            bad += not ok
            print(f"sm_{arch} {fn.__name__} {tag}: shared {shared // 1024} KiB{'' if ok else ' > limit'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

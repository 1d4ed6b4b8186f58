"""Every C++ extension gives the same bits at any thread count.

The extensions are built with ``-fopenmp`` (``attnzoo.core.cpp``), so their ``at::parallel_for`` work items
run on torch's threads, and every item runs its GEMMs on single-threaded BLAS (``SequentialBlas`` in
``csrc/flash_common.h``): the items depend on the shapes only, so 1, 3 and 2 threads must agree exactly. A
race between items (shared scratch, an output written by two items) or MKL threading inside an item would
show here. ``torch.set_num_threads`` also switches MKL's dynamic mode off, which changed how MKL threaded the
kernels' GEMMs before each item pinned it. (The band backward has its own test in test_band_backward.py.)
"""

import pytest
import torch

import attnzoo as az
from attnzoo.cache import read
from attnzoo.core import blockkernel, capped


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _same_bits_at_1_3_2_threads(run):
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3, 2):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results[0]))

@pytest.mark.parametrize("method,params", [("block_topk", dict(block=16, topk=4, dense_below=0, dense_from=1.0)),
                                           ("vertical_slash", dict(n_vertical=24, n_slash=4, block=16, last_q=16))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_kernel(monkeypatch, method, params, dtype):
    """Block layouts (one item per query block and head group) and token layouts (their shared columns
    packed per head by a second parallel loop)."""
    if not blockkernel.available():
        pytest.skip("block kernel not built")
    calls = []
    kernel = blockkernel.attend_blocks
    monkeypatch.setattr(blockkernel, "attend_blocks", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    q, k, v = _randn(2, 6, 200, 16, seed=1, dtype=dtype), _randn(2, 2, 200, 16, seed=2, dtype=dtype), \
        _randn(2, 2, 200, 16, seed=3, dtype=dtype)
    _same_bits_at_1_3_2_threads(lambda: az.attention(q, k, v, method=method, causal=True, return_lse=True,
                                                     **params))
    assert calls

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_lse(dtype):
    """block_topk's ``score="lse"`` estimate (float32 operands on MKL's bfloat16 GEMM)."""
    if not blockkernel.available():
        pytest.skip("block kernel not built")
    q, k = _randn(2, 6, 40, 16, seed=4, dtype=dtype), _randn(2, 2, 300, 16, seed=5, dtype=dtype)
    limit = torch.arange(40) * 7
    _same_bits_at_1_3_2_threads(lambda: (blockkernel.block_lse(q, k, 16, scale=0.25, limit=limit),))

def test_capped_kernel():
    """The capped exact kernel: soft cap, causal, a sinks + window call skipping the rows between."""
    if not capped.available():
        pytest.skip("capped kernel not built")
    q, k, v = _randn(2, 4, 150, 16, seed=6), _randn(2, 4, 300, 16, seed=7), _randn(2, 4, 300, 8, seed=8)
    _same_bits_at_1_3_2_threads(lambda: capped.capped_attention(q, k, v, scale=0.25, cap=5.0, causal=True,
                                                                offset=150))
    _same_bits_at_1_3_2_threads(lambda: capped.capped_attention(q[:, :, -1:], k, v, scale=0.25, cap=None,
                                                                skip=(16, 200)))

def test_decode_selection_kernels():
    """quest's and tokenselect's one-call decode steps (one item per batch row and KV head)."""
    if not capped.available():
        pytest.skip("capped kernel not built")
    B, Hkv, G, n, page, D = 2, 3, 3, 320, 16, 16
    q, k, v = _randn(B, Hkv, G, D, seed=9), _randn(B, Hkv, n, D, seed=10), _randn(B, Hkv, n, D, seed=11)
    pages = k.view(B, Hkv, n // page, page, D)
    kmin, kmax = pages.amin(dim=3).float(), pages.amax(dim=3).float()
    _same_bits_at_1_3_2_threads(lambda: capped.quest_attention(q, k, v, kmin, kmax, scale=0.25, page=page,
                                                               unit=page, lo=16, hi=288, n=n, take=4))
    _same_bits_at_1_3_2_threads(lambda: capped.tokenselect_attention(q, k, v, None, None, scale=0.25, page=0,
                                                                     lo=16, hi=288, n=n, candidates=0, take=40))

def test_mass_kernel():
    """Attention of the newest queries and each key's attention mass in one pass (the eviction policies)."""
    q, k, v = _randn(2, 6, 40, 16, seed=12), _randn(2, 2, 300, 16, seed=13), _randn(2, 2, 300, 8, seed=14)
    if read.attend_with_mass(q, k, v, scale=0.25, causal=True) is None:
        pytest.skip("mass kernel not built")

    def run():
        part, mass = read.attend_with_mass(q, k, v, scale=0.25, causal=True)
        return part.out, part.lse, mass

    _same_bits_at_1_3_2_threads(run)

def test_peak_scan():
    """The finiteness scan's max |t| (``checks._peak`` on large CPU tensors): aminmax's value for contiguous
    tensors, slices along the keys, transposed heads and expanded views, NaN when any element is NaN, inf when
    one is ±inf, wherever it stands, and the same at any thread count (its units are reduced in any order)."""
    if not capped.available():
        pytest.skip("capped kernel not built")
    import math

    def aminmax_peak(t):
        lo, hi = (float(x) for x in torch.aminmax(t))
        return max(-lo, hi) if not (math.isnan(lo) or math.isnan(hi)) else math.nan

    cases = [_randn(1, 3, 2048, 64, seed=15, dtype=torch.float32), _randn(2, 3, 1, 64, seed=16),
             _randn(2, 4, 100, 8, seed=17)[:, :, 10:90], _randn(2, 100, 4, 8, seed=18).transpose(1, 2),
             _randn(1, 1, 70000, 3, seed=19, dtype=torch.float32), _randn(3, 1, 7, 4, seed=20).expand(3, 5, 7, 4)]
    for t in cases:
        assert torch.ops.attnzoo.peak(t) == aminmax_peak(t)
        _same_bits_at_1_3_2_threads(lambda: (torch.tensor(torch.ops.attnzoo.peak(t)),))
        for bad in (math.nan, math.inf, -math.inf):
            for idx in ((0, 0, 0, 0), (-1, -1, -1, -1), (0, -1, t.shape[2] // 2, 0)):
                b = t.clone()
                b[idx] = bad
                got = torch.ops.attnzoo.peak(b)
                assert math.isnan(got) if math.isnan(bad) else got == math.inf

"""Defects found by trying to break attnzoo (issue 12, defects 3-10): each is reproduced here first."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time

import pytest
import torch

import attnzoo as az
from attnzoo import AttnZooError
from attnzoo.cache import policies
from attnzoo.core import cpp


def _build(cls):
    """Every registered method with parameters it can be built with (block_sparse needs a pattern)."""
    if cls.name == "block_sparse":
        return cls(mask_mod=lambda b, h, qi, ki: ki <= qi)
    return cls()


def _call(m, q, k, v, **kw):
    inputs = {"g": torch.zeros(q.shape)} if "g" in m.inputs else {}
    causal = m.supports.causal
    return m(q, k, v, causal=causal, **inputs, **kw)


# ------------------------------------------------------------ defect 3: KVCache.reorder
@pytest.mark.parametrize("bad", [torch.tensor([0]), torch.tensor([0, 1, 1]), torch.tensor([True, False]),
                                 torch.tensor([0.0, 1.0]), torch.tensor([0, 2]), torch.tensor([[0, 1]]), [0, 1]])
def test_reorder_refuses_a_beam_idx_that_is_not_b_rows(bad):
    cache = az.KVCache("full")
    cache.append(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    with pytest.raises(AttnZooError, match=r"^reorder: beam_idx expected a 1-D integer tensor of 2 rows"):
        cache.reorder(bad)
    cache.append(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))  # still usable
    assert cache.attend(torch.randn(2, 2, 1, 8)).shape == (2, 2, 1, 8)


def test_reorder_swaps_rows():
    cache = az.KVCache("full")
    k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8)
    cache.append(k, v)
    q = torch.randn(2, 1, 1, 8)
    before = cache.attend(q)
    cache.reorder(torch.tensor([1, 0]))
    torch.testing.assert_close(cache.attend(q.flip(0)), before.flip(0))


# ------------------------------------------------------- defect 5: causal / return_lse are bools
@pytest.mark.parametrize("flag", ["causal", "return_lse"])
@pytest.mark.parametrize("bad", ["False", "no", 1, 0, None, torch.tensor(True)])
def test_flags_must_be_bools(flag, bad):
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(AttnZooError, match=rf"^{flag}: expected True or False, got"):
        az.attention(x, x, x, **{flag: bad})
    cache = az.KVCache("full")
    cache.append(x, x)
    with pytest.raises(AttnZooError, match=rf"^{flag}: expected True or False, got"):
        cache.attend(x[:, :, -1:], **{flag: bad})


# ------------------------------------------------------- defect 6: scale and empty sizes
@pytest.mark.parametrize("bad, match", [(torch.tensor([1.0, 2.0]), r"a tensor of shape \(2\)"),
                                        (10**400, r"an int too large for a float"),
                                        (-1.0, r"-1.0"), ("0.1", r"str")])
def test_scale_errors_are_clear(bad, match):
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(AttnZooError, match=rf"^scale: expected a positive finite float or None, got (.* )?{match}"):
        az.attention(x, x, x, scale=bad)
    torch.testing.assert_close(az.attention(x, x, x, scale=torch.tensor(0.5)), az.attention(x, x, x, scale=0.5))


@pytest.mark.parametrize("name", sorted(az.methods()))
def test_every_method_returns_the_empty_result_for_empty_batch_or_heads(name):
    m = _build(az.methods()[name])
    for B, Hq in ((0, 4), (1, 0)):
        q, k, v = torch.randn(B, Hq, 8, 8), torch.randn(B, 2, 8, 8), torch.randn(B, 2, 8, 6)
        out = _call(m, q, k, v)
        assert out.shape == (B, Hq, 8, 6)
        if m.supports.lse:
            out, lse = _call(m, q, k, v, return_lse=True)
            assert lse.shape == (B, Hq, 8)
    with pytest.raises(AttnZooError, match=r"^v: expected a value head dim Dv >= 1"):
        _call(m, torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 0))


def test_cache_empty_heads_and_batch():
    cache = az.KVCache("h2o", budget=4, recent=2)
    with pytest.raises(AttnZooError, match=r"^k/v: expected B, Hkv, D and Dv >= 1"):
        cache.append(torch.randn(0, 2, 5, 8), torch.randn(0, 2, 5, 8))
    cache.append(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 6))
    out, lse = cache.attend(torch.randn(1, 0, 1, 8), return_lse=True)
    assert out.shape == (1, 0, 1, 6) and lse.shape == (1, 0, 1)


# ------------------------------------------------------------ defect 4: size parameters are bounded
def _clamped(cls):
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("clamp")]


@pytest.mark.parametrize("name", sorted(n for n, c in az.methods().items() if _clamped(c)))
def test_sizes_above_the_length_cost_what_the_length_costs(name):
    """A ``clamp`` size (block, tile, chunk, top-k, splits) of 10**12 gives the result of the input's length."""
    cls = az.methods()[name]
    q, k, v = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    for p in _clamped(cls):
        huge = _call(_build_with(cls, **{p: 10**12}), q, k, v)
        torch.testing.assert_close(huge, _call(_build_with(cls, **{p: 64}), q, k, v))


def _build_with(cls, **params):
    return cls(mask_mod=lambda b, h, qi, ki: ki <= qi, **params) if cls.name == "block_sparse" else cls(**params)


def test_a_huge_top_k_equals_exact():
    q = torch.randn(1, 2, 128, 16)
    torch.testing.assert_close(az.attention(q, q, q, method="hip", topk=10**12, causal=True),
                               az.attention(q, q, q, causal=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(az.attention(q, q, q, method="flash_decode", splits=10**9, causal=True),
                               az.attention(q, q, q, causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, param", [("performer", "features"), ("scatterbrain", "features"),
                                         ("scatterbrain", "buckets"), ("lsh", "buckets"), ("lsh", "rounds"),
                                         ("routing", "clusters"), ("routing", "iters"), ("nystrom", "pinv_iters")])
def test_sizes_that_change_the_result_have_an_upper_bound(name, param):
    with pytest.raises(AttnZooError, match=rf"^{name}: parameter '{param}' expected a value in \[\d+, \d+\]"):
        az.get(name, **{param: 10**12})


def _int_params(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.type in ("int", "int | None") or f.type is int]


@pytest.fixture(autouse=True, scope="module")
def _extensions_built():
    """Build (or load) the C++ extensions before the timed checks: a first build (~20 s of CPU each) inside
    ``_at_most`` would be interrupted, and the process would then run the eager paths for the rest of the suite."""
    cpp.prebuild()


@contextlib.contextmanager
def _at_most(seconds: int, what: str):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    def stop(*_):
        raise TimeoutError(f"{what} ran longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", sorted(az.methods()))
def test_every_int_parameter_at_10_to_the_12_is_refused_or_costs_what_the_length_costs(name):
    """Each int parameter of every method at 10**12 (N = 64): a clear AttnZooError (at build or call), or a
    result in seconds (a clamp size, or a size whose excess means "everything"), never a hang or a crash."""
    cls = az.methods()[name]
    q = torch.randn(1, 2, 64, 8)
    for p in _int_params(cls):
        with _at_most(30, f"{name}({p}=10**12)"):
            try:
                out = _call(_build_with(cls, **{p: 10**12}), q, q, q)
            except AttnZooError as e:
                assert p in str(e) or name in str(e) or "expected" in str(e), str(e)
                continue
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(policies()))
def test_every_int_parameter_of_a_cache_policy_at_10_to_the_12_is_refused_or_cheap(name):
    if name == "duo":
        pytest.skip("duo needs a per-head plan (its sinks/window are the streaming policy's, checked there)")
    for p in _int_params(policies()[name]):
        with _at_most(30, f"KVCache({name!r}, {p}=10**12)"):
            try:
                cache = az.KVCache(name, **{p: 10**12})
                cache.append(torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8))
                cache.attend(torch.randn(1, 2, 64, 8))
                for _ in range(3):
                    cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
                    out = cache.attend(torch.randn(1, 2, 1, 8))
            except AttnZooError as e:
                assert p in str(e) or "expected" in str(e), str(e)
                continue
            assert torch.isfinite(out).all()


def test_snapkv_pool_has_an_upper_bound():
    with pytest.raises(AttnZooError, match=r"^snapkv: parameter 'pool' expected a value in \[1, 1025\]"):
        az.KVCache("snapkv", budget=16, observe=4, pool=10**12)


# ------------------------------------------------------------ defect 9: run_local fails fast
def _rank_zero_gives_up(rank: int, world_size: int) -> int:
    from attnzoo.parallel import ParallelError

    if rank == 0:
        raise ParallelError("rank 0 gave up")
    time.sleep(120)  # a rank stuck far longer than the test may wait
    return rank


@pytest.mark.slow  # starting the process group's workers takes ~10-30 s on a shared 2-core machine
def test_run_local_raises_as_soon_as_one_rank_failed():
    from attnzoo.parallel import ParallelError, run_local

    start = time.monotonic()
    with pytest.raises(ParallelError, match="rank 0 of 2 raised:\nParallelError: rank 0 gave up"):
        run_local(_rank_zero_gives_up, 2, wall_timeout=300)
    assert time.monotonic() - start < 60  # not the 120 s of the stuck rank, nor the 300 s wall timeout

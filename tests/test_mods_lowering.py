"""core.lowering: a user score_mod traced and, where its graph is a distance bias / soft cap / constant scale,
run as the built-in mods; otherwise (and whenever the numbers disagree) the eager path."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import mods
from attnzoo.core import lowering
from attnzoo.core.scoremod import Composed, DistanceBias, Softcap

from test_routes import assert_same_grads, dense, distance, qkv

F64 = torch.float64


def eager(fn):
    """``fn`` made untraceable (a branch on a proxy), so it keeps the eager path: the reference."""
    return lambda s, b, h, q_idx, kv_idx: fn(s, b, h, q_idx, kv_idx) if s.dim() else s


def lowered(fn, heads=4, len_q=11, len_k=13, dtype=F64):
    return lowering.lower(fn, batch=2, heads_q=heads, len_q=len_q, len_k=len_k, dtype=dtype, device="cpu")


def _user_mods():
    """User functions equal to built-ins, with the tensors they close over (gradients must reach them)."""
    g = torch.Generator().manual_seed(3)
    table = torch.randn(4, 9, generator=g, dtype=F64).requires_grad_(True)
    slopes = (torch.rand(4, generator=g, dtype=F64) + 0.1).requires_grad_(True)
    shared = torch.randn(25, generator=g, dtype=F64).requires_grad_(True)
    return [
        ("softcap", lambda s, b, h, q, k: torch.tanh(s / 2.0) * 2.0, (), (None, 2.0, 1.0)),
        ("softcap in place", lambda s, b, h, q, k: s.div_(2.0).tanh_().mul_(2.0), (), (None, 2.0, 1.0)),
        ("alibi", lambda s, b, h, q, k: s + slopes[h] * (k - q), (slopes,), (DistanceBias, None, 1.0)),
        ("table", lambda s, b, h, q, k: s + table[h, (k - q).clamp(-4, 4) + 4], (table,), (DistanceBias, None, 1.0)),
        ("shared table, float distance", lambda s, b, h, q, k: shared[(k.float() - q.float()).long().clamp(-12, 12)
                                                                      + 12] + s, (shared,), (DistanceBias, None, 1.0)),
        ("alibi then cap", lambda s, b, h, q, k: 1.5 * torch.tanh((s - slopes[h] * (q - k).abs()) / 1.5), (slopes,),
         (DistanceBias, 1.5, 1.0)),
        ("scale, table, cap", lambda s, b, h, q, k: (0.5 * s + table[h, (k - q).clamp(-4, 4) + 4]).tanh() * 3.0,
         (table,), (DistanceBias, 3.0, 1.5)),
        ("scale", lambda s, b, h, q, k: -(s * -0.5), (), (None, None, 0.5)),
    ]


def test_lowering_reads_what_a_function_computes():
    """The graph reading: which built-ins and query-scale factor each user function becomes."""
    for name, fn, _, (bias, cap, scale) in _user_mods():
        mod, factor, note = lowered(fn)
        assert note.startswith("lowered"), (name, note)
        assert factor == pytest.approx(scale), name
        parts = mod.parts if isinstance(mod, Composed) else (mod,) if mod is not None else ()
        assert [type(p) for p in parts if isinstance(p, DistanceBias)] == ([lowering.TracedBias] if bias else []), name
        caps = [p.cap for p in parts if isinstance(p, Softcap)]
        assert caps == ([cap] if cap else []), name
    built_in = mods.alibi(mods.alibi_slopes(4))
    assert lowered(built_in) == (built_in, 1.0, "")


@pytest.mark.parametrize("fn, why", [
    (lambda s, b, h, q, k: s + b, "batch row"),
    (lambda s, b, h, q, k: s + 0.01 * q, "kv_idx - q_idx"),
    (lambda s, b, h, q, k: torch.where(k <= q, s, -float("inf")), "kv_idx - q_idx"),
    (lambda s, b, h, q, k: s * s, "with itself"),
    (lambda s, b, h, q, k: torch.tanh(s / 3) * 3 + (k - q) * 0.1, "after its soft cap"),
    (lambda s, b, h, q, k: s + (1.0 if (k - q).max() > 3 else 0.0), "not traceable"),
    (lambda s, b, h, q, k: s * h, "Python numbers"),
    (lambda s, b, h, q, k: s + (k - q).view(-1).sum(), "only elementwise"),
    (lambda s, b, h, q, k: torch.exp(s), "exp on the score"),
    (lambda s, b, h, q, k: s * -1.0, "positive factor"),
])
def test_functions_that_are_not_built_ins_keep_the_eager_path(fn, why):
    mod, factor, note = lowered(fn)
    assert mod is fn and factor == 1.0 and why in note, note


def test_an_in_place_update_off_the_result_path_is_refused():
    """A mutation of the score that the returned value does not carry (the graph's result reads the score
    before it) is refused, not dropped."""
    def drops(s, b, h, q, k):
        s.mul_(2.0)
        return s + 1.0

    assert "off its result's path" in lowered(drops)[2]


@pytest.mark.parametrize("method, params, causal, Nq, Nk", [
    ("exact", {}, True, 11, 13), ("exact", {}, False, 13, 9), ("exact_tiled", {"q_tile": 4, "k_tile": 5}, True, 11, 13),
    ("block_topk", {"block": 4, "topk": 2}, True, 17, 21), ("block_topk", {"block": 4, "topk": 2}, False, 17, 13),
    ("sliding_window", {"window": 6, "block": 4}, True, 17, 17)])
def test_lowered_functions_equal_the_eager_path(method, params, causal, Nq, Nk):
    """Every user function of :func:`_user_mods`, lowered, against itself on the eager path (float64): values,
    lse, gradients to q, k, v and the tensors it closes over; exact also against the dense reference."""
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Nq=Nq, Nk=Nk, seed=Nq + Nk)
    for name, fn, tensors, _ in _user_mods():
        assert lowering.lower(fn, batch=2, heads_q=4, len_q=Nq, len_k=Nk, dtype=F64, device="cpu")[2] \
            .startswith("lowered"), name
        in_place = "in place" in name  # the convention: a mod updates the scores in place only outside autograd
        with torch.set_grad_enabled(not in_place):
            got = az.attention(q, k, v, method=method, causal=causal, score_mod=fn, return_lse=True, **params)
            want = az.attention(q, k, v, method=method, causal=causal, score_mod=eager(fn), return_lse=True, **params)
        torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10, msg=name)
        torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=1e-10, msg=name)
        if not in_place:
            assert_same_grads(got, want, [q, k, v, *tensors])
    if method == "exact":  # the eager path itself against explicit scores
        slopes = _user_mods()[2][2][0]
        d = distance(Nq, Nk)
        ref = dense(q, k, v, causal=causal, bias=slopes[:, None, None] * d)
        got = az.attention(q, k, v, method=method, causal=causal, score_mod=_user_mods()[2][1], return_lse=True)
        torch.testing.assert_close(got[0], ref[0], atol=1e-12, rtol=1e-10)


def test_lowered_mods_take_the_fused_paths():
    """The point: a lowered function runs where the built-ins run (not the row-wise / slot-loop path)."""
    from attnzoo.core import blocksparse
    from attnzoo.core.layout import BlockLayout

    q, k, v = qkv(B=1, Hq=4, Hkv=2, Nq=16, Nk=16, grad=False)
    lay = BlockLayout.from_mask_mod(lambda b, h, qi, kj: kj <= qi, len_q=16, len_k=16, block=4)
    for name, fn, _, _ in _user_mods():
        mod, _, _ = lowered(fn, len_q=16, len_k=16)
        with torch.no_grad():
            if mod is not None:
                assert blocksparse.forward_path(q, k, v, lay, causal=True, score_mod=mod) != "slot loop", name
            assert blocksparse.forward_path(q, k, v, lay, causal=True, score_mod=fn) == "slot loop", name


def test_the_check_on_the_call_catches_a_stale_trace_and_falls_back():
    """A global the function reads, rebound after its trace: the cached lowering no longer matches, so the
    call takes the eager path (and retraces next time); the answer follows the function, never the trace."""
    q, k, v = qkv(B=1, Hq=4, Hkv=2, Nq=9, Nk=9, grad=False)
    state = {"cap": 2.0}

    class Cap:  # reads its cap from a dict the fingerprint does not see
        def __call__(self, s, b, h, q_idx, kv_idx):
            return torch.tanh(s / state["cap"]) * state["cap"]

    fn = Cap()
    assert lowered(fn, len_q=9, len_k=9)[2] == "lowered to softcap(2)"
    state["cap"] = 0.5
    hit = lowering.analysis(fn)  # the cached trace still says 2
    assert hit.cap == 2.0
    mod, _, note = lowered(fn, len_q=9, len_k=9)
    assert mod is fn and "differs" in note
    got = az.attention(q, k, v, causal=True, score_mod=fn)
    torch.testing.assert_close(got, dense(q, k, v, causal=True, cap=0.5)[0], atol=1e-12, rtol=1e-10)
    assert lowered(fn, len_q=9, len_k=9)[2] == "lowered to softcap(0.5)"  # traced again


@pytest.mark.parametrize("method, params", [("exact", {}), ("block_topk", {"block": 4, "topk": 2})])
def test_a_table_sized_for_the_call_s_distances(method, params):
    """A function indexing a table that covers exactly the call's distances is evaluated within them (the
    engines' padded tiles never reach beyond); one too short for this call fails its check on the call's
    extreme distances and keeps the eager path, which raises the function's own error."""
    Nq, Nk = 10, 14
    table = torch.randn(4, Nq + Nk - 1, dtype=F64)

    def fits(s, b, h, q, k):
        return s + table[h, k - q + Nk - 1]

    assert lowered(fits, len_q=Nq, len_k=Nk)[2].startswith("lowered")
    q, k, v = qkv(B=1, Hq=4, Hkv=2, Nq=Nq, Nk=Nk, grad=False)
    got = az.attention(q, k, v, method=method, causal=True, score_mod=fits, **params)
    want = az.attention(q, k, v, method=method, causal=True, score_mod=eager(fits), **params)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    if method == "exact":
        d = distance(Nq, Nk)
        torch.testing.assert_close(got, dense(q, k, v, causal=True, bias=table[:, d + Nk - 1])[0], atol=1e-12,
                                   rtol=1e-10)
    short = torch.randn(4, Nq + Nk - 3, dtype=F64)

    def too_short(s, b, h, q, k):
        return s + short[h, k - q + Nk - 1]

    assert "raised IndexError" in lowered(too_short, len_q=Nq, len_k=Nk)[2]
    with pytest.raises(IndexError):
        az.attention(q, k, v, method=method, causal=True, score_mod=too_short, **params)


def test_explain_says_whether_a_function_was_lowered():
    q, k, v = qkv(B=1, Hq=4, Hkv=2, Nq=8, Nk=8, grad=False)
    rows = {r.backend: r for r in az.explain("exact", q, k, v, causal=True,
                                             score_mod=lambda s, b, h, qi, kj: torch.tanh(s / 3) * 3)}
    assert "lowered to softcap(3)" in rows["torch"].note
    rows = {r.backend: r for r in az.explain("exact", q, k, v, causal=True, score_mod=lambda s, b, h, qi, kj: s + b)}
    assert "not lowered" in rows["torch"].note and "batch row" in rows["torch"].note


def test_kvcache_reads_run_the_lowered_function():
    """KVCache.attend(score_mod=fn) lowers ``fn`` like a method call: the engine gets the built-ins (so a soft cap /
    distance bias takes its fused paths), the query scale gets the factor; a prefill chunk then decode steps equal
    the same reads with the function itself (eager path), and exact attention with the function."""
    from attnzoo.cache import KVCache
    from attnzoo.cache import kvcache

    q, k, v = qkv(B=2, Hq=4, Hkv=2, Nq=14, Nk=14, grad=False)
    real, seen = kvcache.tiled_attention, []
    kvcache.tiled_attention = lambda *a, **kw: seen.append((kw["score_mod"], kw["scale"])) or real(*a, **kw)
    try:
        for name, fn, _, (bias, cap, scale) in _user_mods():
            outs = []
            for mod in (fn, eager(fn)):
                cache = KVCache("full")
                cache.append(k[:, :, :11], v[:, :, :11])
                steps = [cache.attend(q[:, :, :11], score_mod=mod)]
                for i in (11, 12, 13):
                    cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
                    steps.append(cache.attend(q[:, :, i:i + 1], score_mod=mod))
                outs.append(torch.cat(steps, 2))
            lowered_mods = [m for m, _ in seen[:4]]
            assert all(m is not fn and (m is None or isinstance(m, (DistanceBias, Softcap, Composed)))
                       for m in lowered_mods), name
            assert all(s == pytest.approx(scale / 8 ** 0.5) for _, s in seen[:4]), name
            assert all(m is not fn and not isinstance(m, (DistanceBias, Softcap, Composed)) for m, _ in seen[4:]), name
            seen.clear()
            # (cache reads compute in float32)
            torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=1e-5, msg=name)
            if name == "alibi":
                slopes = _user_mods()[2][2][0]
                want = dense(q, k, v, causal=True, bias=slopes[:, None, None] * distance(14, 14))[0]
                torch.testing.assert_close(outs[0], want, atol=2e-6, rtol=1e-5)
    finally:
        kvcache.tiled_attention = real


def test_varlen_lowers_once_per_call():
    """A packed call lowers the function once, checked at the longest sequences (whose distances cover every
    sequence's), and gives each sequence the built-ins: one check per call, not one per sequence; equal to the
    function itself (eager path) per sequence, values, lse and gradients to q, k, v and its tensors."""
    from test_routes import packed

    q, k, v, cq, ck = packed([5, 0, 9, 3], [7, 2, 9, 6])
    for t in (q, k, v):
        t.requires_grad_(True)
    real, checks = lowering._matches, []
    lowering._matches = lambda *a: checks.append(a[5:7]) or real(*a)
    try:
        for name, fn, tensors, _ in _user_mods()[2:]:
            checks.clear()
            got = az.attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, score_mod=fn,
                               return_lse=True)
            assert checks == [(9, 9)], (name, checks)  # the longest queries and keys, once
            want = az.attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, score_mod=eager(fn),
                                return_lse=True)
            torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10, msg=name)
            torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=1e-10, msg=name)
            assert_same_grads(got, want, [q, k, v, *tensors])
    finally:
        lowering._matches = real

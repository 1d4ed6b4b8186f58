"""Generation steps that run fewer, cheaper calls than the prompt: a window method's one-query step as one exact
call over its key spans (sliding_window, streaming), equal to the layouts it would otherwise run and to exact
attention over the same keys.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import attnzoo as az
import attnzoo.hf as azhf
from attnzoo import mods
from attnzoo.catalog.sparse import _base
from attnzoo.catalog.sparse.static import SlidingWindow, Streaming
from attnzoo.core import capped
from attnzoo.core.exact import naive_attention, span_attention
from test_hf import tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _visible(method: str, len_k: int, window: int, sinks: int) -> torch.Tensor:
    """``(Nk,)`` bool: the keys one query at the last position sees under the method's definition."""
    j = torch.arange(len_k)
    seen = (len_k - 1 - j) < window
    return seen | (j < sinks) if method == "streaming" else seen


def _reference(q, k, v, visible, key_padding_mask=None, score_mod=None):
    """fp64 exact attention of one query over the visible keys (the dense oracle)."""
    keep = visible.expand(q.shape[0], -1)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask
    return naive_attention(q.double(), k.double(), v.double(), scale=q.shape[-1] ** -0.5, causal=True,
                           key_padding_mask=keep, score_mod=score_mod)


@pytest.fixture
def no_layouts(monkeypatch):
    """Fails any one-query call of a window method that would build its layouts (the generic executor)."""
    original = _base.LayoutMethod.choose

    def guard(self, q, k, prob, **kwargs):
        assert q.shape[2] != 1 or self.step_spans(prob.len_k) is None, "a one-query window step ran its layouts"
        return original(self, q, k, prob, **kwargs)

    monkeypatch.setattr(_base.LayoutMethod, "choose", guard)


def _layouts_only(monkeypatch):
    """Window steps back on their layouts (the reference)."""
    for cls in (SlidingWindow, Streaming):
        monkeypatch.setattr(cls, "step_spans", lambda self, len_k: None)


# len_k, window, sinks: the window alone; sinks apart from it; sinks touching it; a window >= Nk; no sinks
SHAPES = [(300, 64, 4), (300, 200, 4), (300, 296, 4), (50, 64, 4), (300, 64, 0), (1100, 600, 7)]


@pytest.mark.parametrize("method", ["sliding_window", "streaming"])
@pytest.mark.parametrize("len_k, window, sinks", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_window_step_is_exact_attention_over_its_spans(method, len_k, window, sinks, dtype, no_layouts):
    g = torch.Generator().manual_seed(len_k + window)
    q = torch.randn(2, 6, 1, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 2, len_k, 16, generator=g, dtype=dtype) for _ in range(2))
    params = dict(window=window) | (dict(sinks=sinks) if method == "streaming" else {})
    pad = torch.ones(2, len_k, dtype=torch.bool)
    pad[1, : len_k // 3] = False  # left padding on one row (it may cover the sinks)
    for kpm in (None, pad):
        out, lse = az.attention(q, k, v, method=method, causal=True, key_padding_mask=kpm, return_lse=True, **params)
        plain = az.attention(q, k, v, method=method, causal=True, key_padding_mask=kpm, **params)
        ref_out, ref_lse = _reference(q, k, v, _visible(method, len_k, window, sinks), kpm)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
        torch.testing.assert_close(plain.double(), ref_out, atol=tol, rtol=tol)


@pytest.mark.parametrize("method", ["sliding_window", "streaming"])
@pytest.mark.parametrize("kind", ["permuted", "sliced", "expanded", "empty batch"])
def test_a_window_step_takes_strided_inputs_and_empty_batches(method, kind, no_layouts):
    """Permuted, sliced and expanded (stride-0 heads: folded into rows, a row stride of 0 that the capped kernel
    refuses unless ``kernel_rows`` copies it) views give the contiguous copies' result and gradients; an empty
    batch gives an empty result."""
    g = torch.Generator().manual_seed(3)
    B = 0 if kind == "empty batch" else 2

    def view(H, N):
        if kind == "permuted":
            return torch.randn(B, 16, H, N, generator=g, dtype=torch.float64).permute(0, 2, 3, 1)
        if kind == "sliced":
            return torch.randn(B, H, 2 * N, 32, generator=g, dtype=torch.float64)[:, :, ::2, ::2]
        if kind == "expanded":
            return torch.randn(B, 1, N, 16, generator=g, dtype=torch.float64).expand(B, H, N, 16)
        return torch.randn(B, H, N, 16, generator=g, dtype=torch.float64)

    q, k, v = view(4, 1), view(2, 300), view(2, 300)
    params = dict(window=50) | (dict(sinks=4) if method == "streaming" else {})

    def run(tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out, lse = az.attention(*leaves, method=method, causal=True, return_lse=True, **params)
        grads = torch.autograd.grad((out.sum() + lse.sum()), leaves) if B else ()
        with torch.no_grad():  # the forward-only path (the capped kernel for sinks + window)
            fwd = az.attention(*tensors, method=method, causal=True, return_lse=True, **params)
        return (out, lse, *fwd, *grads)

    got, want = run((q, k, v)), run(tuple(t.contiguous() for t in (q, k, v)))
    assert got[0].shape == (B, 4, 1, 16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mod", ["softcap", "alibi", "user"])
@pytest.mark.parametrize("method", ["sliding_window", "streaming"])
def test_a_window_step_keeps_the_score_mod_at_the_true_positions(method, mod, no_layouts):
    """The mod sees the query at position Nk - 1 and each key at its row, whichever path runs (the capped kernel
    for a soft cap, the tiled engine per span otherwise)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1, 8, generator=g, dtype=torch.float64) * 3
    k, v = (torch.randn(1, 2, 200, 8, generator=g, dtype=torch.float64) for _ in range(2))
    score_mod = {"softcap": mods.softcap(2.0), "alibi": mods.alibi(mods.alibi_slopes(4)),
                 "user": lambda s, b, h, qi, kj: s + 0.01 * (kj % 7) - 0.002 * qi}[mod]
    params = dict(window=40) | (dict(sinks=5) if method == "streaming" else {})
    out, lse = az.attention(q, k, v, method=method, causal=True, score_mod=score_mod, return_lse=True, **params)
    ref_out, ref_lse = _reference(q, k, v, _visible(method, 200, 40, 5), score_mod=score_mod)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


def test_a_window_step_equals_the_layouts_and_carries_gradients(monkeypatch):
    """The step equals what the method's layouts (the generic executor) give for the same query, in the forward
    and (through the differentiable per-span path) in the gradients."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 1, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 400, 16, generator=g, dtype=torch.float64) for _ in range(2))

    def run(leaves):
        qq, kk, vv = (t.clone().requires_grad_(leaves) for t in (q, k, v))
        out = az.attention(qq, kk, vv, method="streaming", causal=True, sinks=4, window=100, block=32)
        if not leaves:
            return out, None
        out.square().sum().backward()
        return out, (qq.grad, kk.grad, vv.grad)

    built = []
    choose = _base.LayoutMethod.choose
    monkeypatch.setattr(_base.LayoutMethod, "choose", lambda self, *a, **kw: built.append(1) or choose(self, *a, **kw))
    fast, fast_grads = run(True)
    fast_nograd, _ = run(False)
    assert not built
    _layouts_only(monkeypatch)
    slow, slow_grads = run(True)
    assert built  # the reference ran the layouts
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fast_nograd, slow.detach(), atol=1e-12, rtol=1e-12)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_span_attention_reads_two_spans_in_one_kernel_call(monkeypatch):
    """Sinks + window on CPU in float32: one capped-kernel call skipping the rows between the spans (no copy of
    them, no merge), equal to exact attention over the concatenated keys; padding that hides every key of a
    row gives (0, -inf)."""
    if not capped.available():
        pytest.skip("the C++ extension is not built here")
    calls = []
    original = capped.capped_attention
    monkeypatch.setattr(capped, "capped_attention", lambda *a, **kw: calls.append(kw.get("skip")) or original(*a, **kw))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 1, 32, generator=g)
    k, v = (torch.randn(2, 3, 1500, 32, generator=g) for _ in range(2))
    pad = torch.ones(2, 1500, dtype=torch.bool)
    pad[1, :] = False
    pad[1, 700:710] = True  # row 1 sees only keys outside both spans: nothing
    spans = ((0, 4), (900, 1500))
    out, lse = span_attention(q, k, v, spans, scale=0.2, key_padding_mask=pad)
    assert calls == [(4, 900)]
    keys = torch.cat([torch.arange(4), torch.arange(900, 1500)])
    ref_out, ref_lse = naive_attention(q, k[:, :, keys], v[:, :, keys], scale=0.2, causal=False,
                                       key_padding_mask=pad[:, keys])
    torch.testing.assert_close(out[0], ref_out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0], ref_lse[0], atol=1e-5, rtol=1e-5)
    assert bool((out[1] == 0).all()) and bool((lse[1] == -math.inf).all())


def test_model_steps_of_window_methods_equal_their_layouts(monkeypatch):
    """Through the transformers adapter on a DynamicCache: the logits of greedy steps with the one-call step equal
    those with the layouts (the step spans switched off), for the model's own window too."""
    model = tiny_decoder("llama")
    prompt = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(4))

    def logits(method, **params):
        azhf.apply(model, method, **params)
        cache = DynamicCache(config=model.config)
        rows = []
        with torch.no_grad():
            out = model(input_ids=prompt, cache=cache, use_cache=True)
            for _ in range(4):
                rows.append(out.logits[:, -1])
                out = model(input_ids=rows[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
        azhf.remove(model)
        return torch.stack(rows, 1)

    cases = [("sliding_window", dict(window=16, block=8)), ("streaming", dict(sinks=3, window=12, block=8))]
    fast = [logits(m, **p) for m, p in cases]
    _layouts_only(monkeypatch)
    for (m, p), f in zip(cases, fast):
        torch.testing.assert_close(f, logits(m, **p), atol=1e-5, rtol=1e-5)


# ------------------------------------------------- per-head plans at a step
def test_head_groups_read_their_kv_heads_without_repeating_them():
    """run_spec hands a group the KV heads its query heads use, once each, as views where contiguous; groups with
    uneven query heads per KV head get one KV copy per query head. Every layout equals the dense oracle."""
    from attnzoo import registry
    from attnzoo.hf.adapter import _head_operands, run_spec

    assert _head_operands((3, 4, 5), 3, None) == (slice(3, 6), slice(1, 2))  # one whole KV group: views
    q_sel, kv_sel = _head_operands((1, 4, 7), 3, None)  # one query head of each KV head: GQA of ratio 1
    assert q_sel.tolist() == [1, 4, 7] and kv_sel == slice(0, 3)
    assert _head_operands((0, 1, 3), 3, None)[1].tolist() == [0, 0, 1]  # uneven: per query head
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 3, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, :3] = False
    for heads in [((0, 1, 2), (3, 4, 5), (6, 7, 8)), ((1, 4, 7), (0, 2, 3, 5, 6, 8)), ((0, 1, 3), (2, 4, 5, 6, 7, 8))]:
        methods = [registry.get("exact"), registry.get("naive"), registry.get("exact_tiled", q_tile=2, k_tile=3)]
        spec = azhf.LayerSpec(0, tuple(azhf.HeadGroup(m, h) for m, h in zip(methods, heads)), 9)
        out = run_spec(spec, q, k, v, causal=True, scale=0.3, key_padding_mask=keep, overrides={})
        ref = az.attention(q, k, v, method="naive", causal=True, scale=0.3, key_padding_mask=keep)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_groups_exact_at_a_step_run_as_one_call():
    """A per-head plan's groups that all run exact at a generation step (dynamic sparse methods, decode="auto")
    become one group over every head (one call, as without a plan); window groups stay, exact ones still merge."""
    from attnzoo import registry
    from attnzoo.hf.adapter import decode_spec

    bt, vs = registry.get("block_topk", block=8, topk=2), registry.get("vertical_slash", n_vertical=4, n_slash=4)
    sw = registry.get("streaming", sinks=2, window=8)
    spec = azhf.LayerSpec(0, (azhf.HeadGroup(bt, (0, 1)), azhf.HeadGroup(vs, (2, 3)),
                              azhf.HeadGroup(registry.get("exact"), (4, 5))), 6)
    step = decode_spec(spec, "auto")
    assert [(g.method.name, g.heads) for g in step.groups] == [("exact", None)]
    mixed = azhf.LayerSpec(0, (azhf.HeadGroup(bt, (0, 1)), azhf.HeadGroup(sw, (2, 3)),
                               azhf.HeadGroup(vs, (4, 5))), 6)
    assert [(g.method.name, g.heads) for g in decode_spec(mixed, "auto").groups] == [("exact", (0, 1, 4, 5)),
                                                                                      ("streaming", (2, 3))]
    assert decode_spec(mixed, "method") is mixed


def test_model_steps_of_a_per_head_plan_equal_exact_where_every_group_is_exact():
    """A per-head plan of dynamic sparse methods: its generation steps (one merged exact call per layer) give the
    logits of exact attention's steps on the same cache."""
    model = tiny_decoder("llama")  # 4 query heads, 2 KV heads
    prompt = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(6))
    plan = {"*": [("block_topk", dict(block=8, topk=2, dense_below=0, dense_from=1.0))] * 2
            + [("vertical_slash", dict(n_vertical=4, n_slash=4, block=8))] * 2}
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        azhf.apply(model, plan)
        model(input_ids=prompt, cache=cache, use_cache=True)
        ref_cache = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            ref_cache.update(layer.keys.clone(), layer.values.clone(), i)
        tokens = torch.randint(1, 96, (2, 3), generator=torch.Generator().manual_seed(7))
        steps = [model(input_ids=tokens[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(3)]
        azhf.remove(model)
        azhf.apply(model, "exact")
        ref = [model(input_ids=tokens[:, i:i + 1], cache=ref_cache, use_cache=True).logits for i in range(3)]
        azhf.remove(model)
    for a, b in zip(steps, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

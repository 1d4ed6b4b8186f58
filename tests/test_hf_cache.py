"""attnzoo.hf.make_cache: generate() through a transformers Cache backed by attnzoo KVCache policies.

Decoders are built from small configs with random weights (seed 0, see test_hf.tiny_decoder); prompts are
batches of 2 with left padding (seed 1).
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
import attnzoo.hf as azhf
from attnzoo.cache import policies
from test_hf import DECODERS, causal_only, greedy, padded_batch, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEW = 16, 6

#: each policy with a budget covering the whole context (prompt + new tokens): must equal full attention
COVERING = {
    "full": {},
    "streaming": dict(sinks=2, window=64),
    "h2o": dict(budget=64, recent=4),
    "snapkv": dict(budget=64, observe=4, pool=3),
    "razor": dict(retrieval_heads=(0,), sinks=2, window=64),
    "duo": dict(plan=(True, False), sinks=2, window=64),
    "heads": dict(groups=(((0,), "full", {}), ((1,), "streaming", {"sinks": 2, "window": 64}))),
    "tokenselect": dict(budget=64, sinks=2, local=4),
    "quest": dict(budget=64, page=4, local=4, sinks=0),
    "infllm": dict(budget=64, sinks=2, local=4, block=4, reps=2),
    "recycled": dict(budget=64, every=3),
    "retrieval": dict(budget=64, sinks=2, local=4),
    "zipvl": dict(top_p=1.0, observe=4, min_tokens=64),
    "novelty": dict(budget=64, sinks=2, recent=4),
}

#: each policy with a budget well under the context: it must run, and evicting ones must hold less
SMALL = {
    "full": {},
    "quantized": dict(bits=8, group=16),
    "streaming": dict(sinks=2, window=6),
    "h2o": dict(budget=8, recent=3),
    "snapkv": dict(budget=8, observe=4, pool=3),
    "razor": dict(retrieval_heads=(1,), sinks=2, window=6),
    "duo": dict(plan=("streaming", "full"), sinks=2, window=6),
    "heads": dict(groups=(((0,), "streaming", {"sinks": 2, "window": 6}), ((1,), "snapkv", {"budget": 8, "observe": 4}))),
    "tokenselect": dict(budget=8, sinks=2, local=3),
    "quest": dict(budget=12, page=4, local=4, sinks=0),
    "infllm": dict(budget=16, sinks=2, local=3, block=4, reps=2),
    "recycled": dict(budget=8, every=3),
    "retrieval": dict(budget=8, sinks=2, local=3),
    "zipvl": dict(top_p=0.5, observe=4, pool=3),
    "novelty": dict(budget=8, sinks=2, recent=3, interval=2),
}


def generate_with(model, ids, mask, cache, **kw):
    kw.setdefault("max_new_tokens", NEW)
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                          cache=cache, **kw)


def test_every_policy_is_exercised():
    assert set(SMALL) == set(policies()), "a cache policy has no generate() test"
    assert set(COVERING) == set(policies()) - {"quantized"}  # quantized is lossy at any size


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_full_cache_generate_equals_sdpa(arch):
    model = tiny_decoder(arch)
    ids, mask = padded_batch(length=PROMPT, pad=(0, 5))
    with torch.no_grad():
        ref = greedy(model, ids, mask, n=NEW)
        with pytest.raises(attnzoo.UnsupportedError, match=r"route it first with attnzoo.hf.apply\(model, 'exact'\)"):
            azhf.make_cache(model, "full")  # never routed behind the user's back
        assert not azhf.is_applied(model)
        azhf.apply(model, "exact")
        cache = azhf.make_cache(model, "full")
        out = generate_with(model, ids, mask, cache)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == PROMPT + NEW - 1  # the last token is sampled, never fed back
    assert cache.layers[0].kv.held == [PROMPT + NEW - 1] * 2


@pytest.mark.parametrize("policy", sorted(COVERING))
def test_policy_covering_the_context_equals_sdpa(policy):
    model = tiny_decoder("llama")
    ids, mask = padded_batch(length=PROMPT, pad=(0, 5))
    with torch.no_grad():
        ref = greedy(model, ids, mask, n=NEW)
        azhf.apply(model, "exact")
        out = generate_with(model, ids, mask, azhf.make_cache(model, policy, **COVERING[policy]))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", [a if a == "qwen2" else pytest.param(a, marks=pytest.mark.slow) for a in DECODERS])
@pytest.mark.parametrize("policy", sorted(SMALL))
def test_policy_with_a_small_budget_generates_and_shrinks(policy, arch):
    """Every policy on Qwen2 by default; on Llama and Mistral too in the slow run."""
    model = tiny_decoder(arch)
    ids, mask = padded_batch(length=PROMPT, pad=(0, 5))
    azhf.apply(model, "exact")
    with torch.no_grad():
        full = azhf.make_cache(model, "full")
        generate_with(model, ids, mask, full)
        cache = azhf.make_cache(model, policy, **SMALL[policy])
        out = generate_with(model, ids, mask, cache)
    assert out.shape == (2, PROMPT + NEW) and torch.equal(out[:, :PROMPT], ids)
    assert int(out.min()) >= 0 and int(out.max()) < model.config.vocab_size
    assert cache.get_seq_length() == full.get_seq_length() == PROMPT + NEW - 1
    if policies()[policy].kind in ("evict", "split") or policy == "quantized":
        assert cache.nbytes < full.nbytes  # eviction / quantisation really frees memory
    if policies()[policy].kind == "evict":
        assert max(cache.layers[0].kv.held) < PROMPT + NEW - 1


def test_beam_search_reorders_the_cache():
    """Beam search reorders the cache rows every step (a setting checked free of near-tied beams)."""
    model = tiny_decoder("llama")
    ids, mask = padded_batch(length=12, pad=(0, 3))
    kw = dict(max_new_tokens=6, num_beams=3, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)
        azhf.apply(model, "exact")
        out = generate_with(model, ids, mask, azhf.make_cache(model, "full"), **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)


def test_cache_layer_crop_reset_and_batch_changes():
    model = tiny_decoder("llama")
    ids, mask = padded_batch(length=PROMPT, pad=(0, 5))
    azhf.apply(model, "exact")
    cache = azhf.make_cache(model, "full")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
    assert cache.get_seq_length() == PROMPT and cache.get_mask_sizes(3, 0) == (PROMPT + 3, 0)
    with pytest.raises(attnzoo.UnsupportedError, match="batch_repeat_interleave"):
        cache.batch_repeat_interleave(2)
    cache.crop(-4)
    assert cache.get_seq_length() == PROMPT - 4
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    cache.batch_repeat_interleave(2)  # an empty cache has nothing to repeat


def test_cache_refuses_unrouted_attention_and_non_exact_methods(causal_only):
    model = tiny_decoder("llama")
    ids, mask = padded_batch(length=PROMPT, pad=(0, 0))
    azhf.apply(model, "exact")
    cache = azhf.make_cache(model, "full")
    azhf.remove(model)  # the cache's keys now reach SDPA, which knows nothing of the policy
    with torch.no_grad(), pytest.raises(attnzoo.UnsupportedError, match="attn_implementation='sdpa'"):
        model(input_ids=ids, attention_mask=mask, cache=cache)
    layer = azhf.AttnZooCacheLayer("full")
    k = torch.randn(1, 2, 3, 16)
    layer.update(k, k)
    with pytest.raises(attnzoo.UnsupportedError, match="never attended through attnzoo"):
        layer.update(k, k)  # keys handed out but never read through the policy: a re-wrapped key tensor
    azhf.apply(model, causal_only)
    with pytest.raises(attnzoo.UnsupportedError, match="must run an exact method"):
        azhf.make_cache(model, "full")


BAD_CACHE = [  # (policy, params, the error message must match)
    ("h2", {}, "unknown policy 'h2'"),
    ("h2o", {"budget": 0}, "budget"),
    ("h2o", {"budget": 129}, "budget.*max_position_embeddings \\(128\\)"),
    ("duo", {"plan": (True, False, True)}, "plan.*2 entries"),
    ("razor", {"retrieval_heads": (5,)}, "retrieval_heads.*0..1"),
    ("streaming", {"budget": 3}, "unknown parameter"),
]


@pytest.mark.parametrize("policy,params,match", BAD_CACHE)
def test_bad_policies_and_budgets(policy, params, match):
    model = tiny_decoder("llama")
    azhf.apply(model, "exact")
    with pytest.raises(attnzoo.AttnZooError, match=match):
        azhf.make_cache(model, policy, **params)


def test_the_cache_reads_through_the_applied_flash_decode():
    """``apply(("flash_decode", {"splits": 4}))`` then a cache: it reads with 4 splits, not KVCache's default."""
    model = tiny_decoder("llama")
    azhf.apply(model, {"*": ("flash_decode", {"splits": 4})})
    cache = azhf.make_cache(model, "h2o", budget=8, recent=4)
    assert {layer.kv.splits for layer in cache.layers} == {4}
    with pytest.raises(attnzoo.AttnZooError, match=r"splits expected 4 \(the flash_decode applied to layer 0\)"):
        azhf.make_cache(model, "h2o", budget=8, recent=4, splits=8)
    ids, mask = padded_batch(length=PROMPT, pad=(0, 5))
    with torch.no_grad():
        out = generate_with(model, ids, mask, cache)
    assert out.shape[1] == PROMPT + NEW


# ------------------------------------------------------------------ packed sequences with the attnzoo cache
PACKED = [5, 9, 3]  # prompt lengths, packed into one row


def _packed_step(model, cache, tokens: list[torch.Tensor], held: list[int]):
    """One forward of every sequence's new ``tokens`` laid end to end (flash-attention varlen kwargs, each
    sequence's positions continuing from its ``held`` tokens); returns the logits split per sequence."""
    n = [t.numel() for t in tokens]
    cu_q = torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor([h + m for h, m in zip(held, n)]).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(h, h + m) for h, m in zip(held, n)])[None]
    logits = model(input_ids=torch.cat(tokens)[None], position_ids=positions, cache=cache, use_cache=True,
                   cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=max(n), max_length_k=int(cu_k.diff().max())
                   ).logits[0]
    return list(logits.split(n))


def test_packed_sequences_prefill_and_generate_with_the_attnzoo_cache_like_one_by_one():
    """A packed prefill (ragged lengths) into an attnzoo cache, a ragged second chunk, then greedy steps of
    one token per sequence, all as packed rows with flash-attention's varlen kwargs: the logits equal each
    sequence run alone by the model's own attention (no cache), and the greedy tokens its own generate()."""
    model = tiny_decoder("llama")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 96, (n,), generator=g) for n in PACKED]
    chunk = [torch.randint(1, 96, (n,), generator=g) for n in (2, 0, 3)]  # chunked prefill; one sequence idle
    with torch.no_grad():
        full = [torch.cat([p, c]) for p, c in zip(prompts, chunk)]
        want_tokens = [greedy(model, f[None], torch.ones(1, f.numel(), dtype=torch.long), n=4)[0] for f in full]
        want_logits = [model(input_ids=t[None]).logits[0] for t in want_tokens]
        azhf.apply(model, "exact")
        cache = azhf.make_cache(model, "full")
        held = [0] * len(PACKED)
        logits = _packed_step(model, cache, prompts, held)
        held = [p.numel() for p in prompts]
        for seq, got in enumerate(logits):
            torch.testing.assert_close(got, want_logits[seq][:held[seq]], atol=1e-5, rtol=1e-5)
        logits = _packed_step(model, cache, chunk, held)
        held = [f.numel() for f in full]
        for seq, got in enumerate(logits):
            torch.testing.assert_close(got, want_logits[seq][held[seq] - chunk[seq].numel():held[seq]], atol=1e-5,
                                       rtol=1e-5)
        tokens = [f.clone() for f in full]
        nxt = [want_logits[s][held[s] - 1].argmax()[None] for s in range(len(full))]
        for _ in range(3):
            tokens = [torch.cat([t, x]) for t, x in zip(tokens, nxt)]
            logits = _packed_step(model, cache, nxt, held)
            for seq, got in enumerate(logits):
                torch.testing.assert_close(got[0], want_logits[seq][held[seq]], atol=1e-5, rtol=1e-5)
            held = [h + 1 for h in held]
            nxt = [lg[-1].argmax()[None] for lg in logits]
        tokens = [torch.cat([t, x]) for t, x in zip(tokens, nxt)]
    for got, want in zip(tokens, want_tokens):
        assert torch.equal(got, want)
    assert cache.layers[0].kv.seq_length == max(PACKED) + 3 + 3  # padded slots: the longest step each time


def test_packed_cache_refusals():
    model = tiny_decoder("llama")
    azhf.apply(model, "exact")
    prompts = [torch.arange(1, 1 + n) for n in PACKED]
    with torch.no_grad():
        cache = azhf.make_cache(model, "full")
        _packed_step(model, cache, prompts, [0, 0, 0])
        with pytest.raises(attnzoo.AttnZooError, match="cu_seq_lens_k"):  # key lengths that forget the prompts
            _packed_step(model, cache, [torch.tensor([1])] * 3, [0, 0, 0])
        cache = azhf.make_cache(model, "full")
        _packed_step(model, cache, prompts, [0, 0, 0])
        with pytest.raises(attnzoo.UnsupportedError, match="packed sequences"):
            model(input_ids=torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
        with pytest.raises(attnzoo.UnsupportedError, match="packed sequences"):
            cache.crop(-1)
        plain = azhf.make_cache(model, "full")
        model(input_ids=torch.tensor([[1, 2, 3]]), cache=plain, use_cache=True)
        with pytest.raises(attnzoo.UnsupportedError, match="cannot continue"):
            _packed_step(model, plain, prompts, [0, 0, 0])
        with pytest.raises(attnzoo.UnsupportedError, match="attnzoo cache"):  # offsets differ, no cache to hold them
            model(input_ids=torch.tensor([[1, 2]]), use_cache=False, cu_seq_lens_q=torch.tensor([0, 2], dtype=torch.int32),
                  cu_seq_lens_k=torch.tensor([0, 3], dtype=torch.int32))


def test_cache_path_translates_each_steps_mask_once(monkeypatch):
    """The per-layer mask translation is memoised per step: with left padding every step passes a tensor
    mask, translated for the first layer only (2 layers: a per-layer translation would count 2 per step)."""
    from attnzoo.hf import adapter, cache as hf_cache

    model = tiny_decoder("llama")
    ids, mask = padded_batch(length=PROMPT, pad=(0, 5))
    azhf.apply(model, "exact")
    calls = []
    real = adapter.mask_geometry
    counted = lambda m, **kw: calls.append(m is not None) or real(m, **kw)  # noqa: E731
    for module in (adapter, hf_cache):  # wherever the translation is called from
        monkeypatch.setattr(module, "mask_geometry", counted, raising=False)
    with torch.no_grad():
        ref = generate_with(model, ids, mask, azhf.make_cache(model, "full"))
        calls.clear()
        out = generate_with(model, ids, mask, azhf.make_cache(model, "quest", budget=12, page=4, local=4, sinks=0))
    assert out.shape == ref.shape
    assert sum(calls) == NEW  # one tensor mask per forward (prompt + NEW - 1 decode steps), each translated once

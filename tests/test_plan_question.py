"""Question-agnostic compression: text tasks' ``question="after"`` on a tiny random Llama, and moa's profile of it.

The eval reads the context first (a cache policy compresses it there), then the question; with a cache
that keeps everything that must equal the one-pass prompt.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny_lm import byte_tokenizer, tiny_llama  # noqa: E402

import attnzoo.hf as azhf  # noqa: E402
from attnzoo import AttnZooError  # noqa: E402
from attnzoo.eval import runner as R  # noqa: E402
from attnzoo.plan import make_calibrator  # noqa: E402
from attnzoo.plan.base import calibration_prompts  # noqa: E402
from attnzoo.tasks import Sample, make_task, tasks  # noqa: E402
from attnzoo.tasks.text import TextTask  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    model = tiny_llama(max_positions=1024)
    azhf.apply(model, "exact")
    yield model, byte_tokenizer()
    azhf.remove(model)


TEXT_TASKS = sorted(n for n, cls in tasks().items() if issubclass(cls, TextTask))


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_every_text_task_marks_its_question_and_after_keeps_the_prompt(name):
    tok = byte_tokenizer()
    length = 6000 if name == "common_words" else 1200
    inline = make_task(name).generate(2, seed=3, tokenizer=tok, length=length)
    after = make_task(name, question="after").generate(2, seed=3, tokenizer=tok, length=length)
    for a, b in zip(inline, after):
        assert a.prompt == b.prompt and a.answers == b.answers
        q = b.meta["question"]
        assert 10 < len(q) < len(b.prompt) // 2 and b.prompt.endswith(q)
    with pytest.raises(AttnZooError, match="question"):
        make_task(name, question="before")


def _calls(model):
    """Wrap ``model.forward``: record (new tokens, tokens the cache holds per KV head, its logical length) per call."""
    seen, forward = [], model.forward

    def spy(*args, **kw):
        cache = kw.get("cache", kw.get("past_key_values"))
        layer = getattr(cache, "layers", [None])[0]
        held = max(layer.kv.held) if hasattr(layer, "kv") and layer.kv.held else None
        seen.append((kw["input_ids"].shape[1], held, cache.get_seq_length()))
        return forward(*args, **kw)

    model.forward = spy
    return seen


def test_question_after_with_a_full_cache_equals_one_pass(lm):
    model, tok = lm
    task, after = make_task("passkey"), make_task("passkey", question="after")
    for sample in task.generate(2, seed=0, tokenizer=tok, length=300):
        ids = R.prompt_ids(tok, sample)
        ctx = R.context_tokens(tok, sample, ids)
        assert tok.decode(ids[0, :ctx]) + tok.decode(ids[0, ctx:]) == sample.prompt
        assert tok.decode(ids[0, ctx:]) == sample.meta["question"]  # one byte per token: the split is exact
        for make in (lambda: azhf.make_cache(model, "full"), lambda: transformers.DynamicCache(config=model.config)):
            one = R.generate(model, tok, sample, task, make)
            seen = _calls(model)
            try:
                two = R.generate(model, tok, sample, after, make)
            finally:
                del model.forward
            assert two.prediction == one.prediction and two.tokens == one.tokens
            assert [n for n, _, _ in seen[:2]] == [ctx, ids.shape[1] - ctx] and all(n == 1 for n, _, _ in seen[2:])
    # one pass in the model itself: the second read's logits equal the one-pass prompt's last ones
    sample = task.generate(1, seed=1, tokenizer=tok, length=300)[0]
    ids = R.prompt_ids(tok, sample)
    ctx = R.context_tokens(tok, sample, ids)
    with torch.inference_mode():
        ref = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        cache = azhf.make_cache(model, "full")
        model(input_ids=ids[:, :ctx], cache=cache, logits_to_keep=1)
        got = model(input_ids=ids[:, ctx:], cache=cache, logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_question_after_compresses_the_context_before_the_question_is_read(lm):
    model, tok = lm
    after = make_task("passkey", question="after")
    sample = after.generate(1, seed=0, tokenizer=tok, length=300)[0]
    ids = R.prompt_ids(tok, sample)
    ctx = R.context_tokens(tok, sample, ids)
    seen = _calls(model)
    try:
        out = R.generate(model, tok, sample, after, lambda: azhf.make_cache(model, "snapkv", budget=48, observe=4))
    finally:
        del model.forward
    (n0, held0, len0), (n1, held1, len1) = seen[:2]
    assert (n0, held0, len0) == (ctx, None, 0)  # nothing held yet
    # the question's read finds the context already cut to the budget (and at its full logical length)
    assert n1 == ids.shape[1] - ctx and held1 <= 48 and len1 == ctx
    assert out.kv_bytes[0] < 0.25 * R.full_kv_bytes(model, ids.shape[1])  # 48 tokens + the remembered queries
    # the same context with another question: the held tokens before it are the same (the question is unseen)
    other = Sample(sample.prompt[:-len(sample.meta["question"])] + "\nWhat was the first word?",
                   sample.answers, {"question": "\nWhat was the first word?"})
    kept = []
    for s in (sample, other):
        cache = azhf.make_cache(model, "snapkv", budget=48, observe=4)
        with torch.inference_mode():
            model(input_ids=R.prompt_ids(tok, s)[:, :ctx], cache=cache, logits_to_keep=1)
        kept.append([layer.kv.positions(h) for layer in cache.layers for h in range(2)])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


def test_question_after_refuses_samples_without_a_question(lm):
    model, tok = lm
    bad = Sample("no question here", ("x",), {})
    with pytest.raises(AttnZooError, match="meta\\['question'\\]"):
        R.generate(model, tok, bad, make_task("passkey", question="after"), lambda: azhf.make_cache(model, "full"))


def test_moa_question_after_votes_with_the_context_end(lm):
    model, tok = lm
    prompts = calibration_prompts(model, tok, 2, 600, 7, context=True)
    for (ids, start, context), s in zip(prompts, make_task("passkey").generate(1, seed=7, tokenizer=tok, length=600)
                                        + make_task("niah_multikey").generate(1, seed=7, tokenizer=tok, length=600)):
        assert tok.decode(ids[:start]) == s.prompt and tok.decode(ids[:context]) + s.meta["question"] == s.prompt
    assert [p[:2] for p in prompts] == calibration_prompts(model, tok, 2, 600, 7)
    spans = (1 / 64, 1 / 16)
    inline = make_calibrator("moa", length=600, samples=2, prompt_length=600, observe=4, spans=spans)
    after = make_calibrator("moa", length=600, samples=2, prompt_length=600, observe=4, spans=spans, question="after")
    e_in, e_after = inline.profile(model, tok), after.profile(model, tok)
    assert e_in.shape == e_after.shape == (2, 2, 2) and not torch.allclose(e_in, e_after)

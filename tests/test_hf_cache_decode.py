"""Generation steps of a prefill method over transformers' own cache (``attnzoo.hf.apply(..., decode=...)``).

A dynamic sparse method estimates its key set from every key on each call, so a one-token step cannot pay for
it: by default (``decode="auto"``) steps run exact attention while the prompt runs the method.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import attnzoo
import attnzoo.hf as azhf
from attnzoo.catalog.sparse.dynamic import BlockTopK
from test_hf import tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

#: block_topk forced onto its sparse path at a 64-token prompt: 2 of 8 key blocks per query block
SPARSE = dict(block=8, topk=2, dense_below=0, dense_from=1.0)
PROMPT = 64


@pytest.fixture
def model():
    return tiny_decoder("llama")


@pytest.fixture
def prompt():
    return torch.randint(1, 96, (2, PROMPT), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def calls(monkeypatch):
    """Query lengths of every block_topk call."""
    seen: list[int] = []
    original = BlockTopK.forward

    def spy(self, q, *args, **kwargs):
        seen.append(q.shape[2])
        return original(self, q, *args, **kwargs)

    monkeypatch.setattr(BlockTopK, "forward", spy)
    return seen


def _prefill_then_steps(model, prompt, steps: int = 3, step_plan=None):
    """Prompt logits, then the logits of ``steps`` greedy one-token steps on a DynamicCache (the plan switched to
    ``step_plan`` after the prompt when given)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=prompt, cache=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        if step_plan is not None:
            azhf.apply(model, step_plan)
        for _ in range(steps):
            out = model(input_ids=logits[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), out


def test_steps_of_a_dynamic_sparse_method_are_exact_attention_and_its_prompt_is_not(model, prompt, calls):
    azhf.apply(model, "block_topk", **SPARSE)
    assert azhf.decode_route(model) == "dense"
    auto, _ = _prefill_then_steps(model, prompt)
    layers = model.config.num_hidden_layers
    assert calls == [PROMPT] * layers  # the prompt ran the method, no step did
    # the same prompt under the method, then its steps under exact attention: the same logits
    azhf.apply(model, "block_topk", decode="method", **SPARSE)
    reference, _ = _prefill_then_steps(model, prompt, step_plan="exact")
    torch.testing.assert_close(auto, reference, rtol=0, atol=0)
    # the method's sparsity shows in the prompt (it is not exact attention there), and in steps kept on it
    azhf.apply(model, "exact")
    exact, _ = _prefill_then_steps(model, prompt)
    assert (auto[:, 0] - exact[:, 0]).abs().max() > 1e-3
    calls.clear()
    azhf.apply(model, "block_topk", decode="method", **SPARSE)
    assert azhf.decode_route(model) == "method"
    kept, _ = _prefill_then_steps(model, prompt)
    assert calls == [PROMPT] * layers + [1] * (3 * layers)
    torch.testing.assert_close(kept[:, 0], auto[:, 0], rtol=0, atol=0)
    assert (kept[:, 1:] - auto[:, 1:]).abs().max() > 1e-4


def test_generate_routes_steps_densely_with_padding(model, calls):
    ids = torch.randint(1, 96, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    azhf.apply(model, "block_topk", **SPARSE)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, PROMPT + 4)
    assert calls == [PROMPT] * model.config.num_hidden_layers


@pytest.mark.parametrize("method, params, decode, route", [
    ("exact", {}, "auto", "dense"),
    ("sliding_window", dict(window=16), "auto", "method"),  # a window is the model's semantics: kept
    ("sliding_window", dict(window=16), "dense", "dense"),
    ("vertical_slash", {}, "auto", "dense"),
    ("block_topk", {}, "method", "method"),
])
def test_decode_route_says_how_steps_run(model, method, params, decode, route):
    azhf.apply(model, method, decode=decode, **params)
    assert azhf.decode_route(model) == route


def test_a_per_layer_plan_routes_only_its_dynamic_layers(model):
    azhf.apply(model, {0: ("block_topk", SPARSE), 1: ("sliding_window", {"window": 16})})
    assert azhf.decode_route(model) == "mixed"
    steps = [m._attnzoo_step_spec for ms in azhf.attention_layers(model).values() for m in ms]
    assert [g.method.name for s in steps for g in s.groups] == ["exact", "sliding_window"]


def test_bad_decode_is_named(model):
    with pytest.raises(attnzoo.AttnZooError, match="decode: expected one of 'auto', 'dense', 'method', got 'fast'"):
        azhf.apply(model, "block_topk", decode="fast")


def test_eval_prefill_cases_take_the_routing():
    from attnzoo.eval import cases as C

    case = C.method_case("block_topk:topk=3,decode=method")
    assert case["params"] == {"topk": 3, "decode": "method"}
    assert "decode" not in C.method_parameters(case, 2048)
    with pytest.raises(attnzoo.AttnZooError, match="decode: expected"):
        C.method_case("block_topk:decode=sparse")

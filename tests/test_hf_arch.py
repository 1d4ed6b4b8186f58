"""The architecture matrix: transformers decoders routed through attnzoo.hf on tiny random configs.

For every architecture this transformers version has: ``apply(model, "exact")`` reproduces the model's own
(eager / sdpa) logits with and without padding, greedy ``generate`` with a full attnzoo cache gives the
model's own tokens, and a packed batch (position ids, and flash-attention's ``cu_seq_lens_*`` kwargs) equals
the sequences run one by one. Sliding windows are short (5 tokens) so they bite; Gemma 2 soft-caps its
scores; gpt-oss has learnable sinks. README's "Supported architectures" table is generated from ``ARCHS``
(``python tests/test_hf_arch.py`` prints it with measured errors; a test keeps README in sync).
"""

from __future__ import annotations

import pathlib
import warnings

import pytest
import torch
import transformers

import attnzoo
import attnzoo.hf as azhf

pytestmark = pytest.mark.usefixtures("one_thread")

transformers.logging.set_verbosity_error()

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
MIXED = dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"])

#: name -> (config class, model class, config overrides, what attnzoo routes beyond plain causal attention)
ARCHS = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", {}, "GQA"),
    "Mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5), "sliding window (every layer)"),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "GQA, QKV bias"),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), "QK norm"),
    "Gemma 2": ("Gemma2Config", "Gemma2ForCausalLM",
                dict(head_dim=16, sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
                "soft-capping (score_mod), sliding/global layer mix"),
    "Gemma 3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, **MIXED), "sliding/global layer mix"),
    "Phi-3": ("Phi3Config", "Phi3ForCausalLM", {}, "fused QKV"),
    "OLMo-2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "QK norm"),
    "GPT-2": ("GPT2Config", "GPT2LMHeadModel", None, "learned absolute positions, MHA"),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, **MIXED),
                "learnable sinks, sliding/global layer mix, MoE"),
}
#: architectures whose own transformers code does not build a packed mask from position ids (flash kwargs only)
NO_POSITION_ID_PACKING = {"gpt-oss"}
AVAILABLE = [n for n, (c, m, _, _) in ARCHS.items() if hasattr(transformers, c) and hasattr(transformers, m)]


def build(name: str) -> transformers.PreTrainedModel:
    config_cls, model_cls, overrides, _ = ARCHS[name]
    config_cls, model_cls = getattr(transformers, config_cls), getattr(transformers, model_cls)
    if overrides is None:  # GPT-2's own config names
        config = config_cls(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128, pad_token_id=0)
    else:
        config = config_cls(**COMMON, **overrides)
    torch.manual_seed(0)
    return model_cls(config).eval()


def batch(pad: int):
    """Two rows of 12 tokens, the second with ``pad`` leading pad tokens."""
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def greedy(model, ids, mask, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              **kw)


LENGTHS = [5, 9, 3]


def packed_inputs():
    seqs = [torch.randint(1, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, torch.cat(seqs, 1), positions, cu


def measure(name: str) -> dict[str, float | bool | None]:
    """One row of the matrix: exact-logits error (padded / unpadded), generate identical, packed errors."""
    model = build(name)
    row: dict[str, float | bool | None] = {}
    seqs, packed, positions, cu = packed_inputs()
    with torch.no_grad():
        refs = {pad: model(input_ids=batch(pad)[0], attention_mask=batch(pad)[1]).logits for pad in (0, 4)}
        ref_tokens = greedy(model, *batch(4))
        one_by_one = [model(input_ids=s).logits for s in seqs]
        azhf.apply(model, "exact")
        for pad in (0, 4):
            ids, mask = batch(pad)
            got = model(input_ids=ids, attention_mask=mask).logits
            row[f"logits_pad{pad}"] = float((got - refs[pad])[mask.bool()].abs().max())
        row["generate"] = torch.equal(greedy(model, *batch(4), past_key_values=azhf.make_cache(model)), ref_tokens)
        row["packed_positions"] = None
        if name not in NO_POSITION_ID_PACKING:
            got = model(input_ids=packed, position_ids=positions, use_cache=False).logits
            row["packed_positions"] = max(float((g - r).abs().max()) for g, r in zip(got.split(LENGTHS, 1), one_by_one))
        got = model(input_ids=packed, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)).logits
        row["packed_flash_kwargs"] = max(float((g - r).abs().max()) for g, r in zip(got.split(LENGTHS, 1), one_by_one))
    return row


@pytest.mark.parametrize("name", AVAILABLE)
def test_architecture(name):
    row = measure(name)
    assert row["logits_pad0"] <= 1e-5 and row["logits_pad4"] <= 1e-5, row
    assert row["generate"], row
    assert row["packed_flash_kwargs"] <= 1e-5, row
    assert row["packed_positions"] is None or row["packed_positions"] <= 1e-5, row


def test_matrix_covers_the_architectures_of_this_transformers():
    assert {"Llama", "Mistral", "Qwen2", "Gemma 2", "GPT-2"} <= set(AVAILABLE)


def readme_table() -> str:
    lines = ["| architecture | transformers class | routed |", "|---|---|---|"]
    for name in AVAILABLE:
        _, model_cls, _, routed = ARCHS[name]
        packing = "packed: flash kwargs" if name in NO_POSITION_ID_PACKING else "packed: position ids, flash kwargs"
        lines.append(f"| {name} | `{model_cls}` | {routed}; {packing} |")
    return "\n".join(lines)


def test_readme_lists_the_tested_architectures():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_table() in readme, "README's architecture table is stale: run python tests/test_hf_arch.py"


if __name__ == "__main__":  # the README table, then the measured matrix
    torch.set_num_threads(1)
    print(readme_table(), "\n")
    print("| architecture | exact logits err (no pad / left pad) | generate identical | packed err (position ids / "
          "flash kwargs) |\n|---|---|---|---|")
    for name in AVAILABLE:
        r = measure(name)
        pos = "n/a" if r["packed_positions"] is None else f"{r['packed_positions']:.1e}"
        print(f"| {name} | {r['logits_pad0']:.1e} / {r['logits_pad4']:.1e} | {r['generate']} | {pos} / "
              f"{r['packed_flash_kwargs']:.1e} |")


# ---------------------------------------------------------------- routing details
def test_softcap_needs_an_exact_method_and_sinks_follow_per_head_plans():
    model = build("Gemma 2")
    ids, mask = batch(4)
    azhf.apply(model, "sliding_window", window=64)  # cannot soft-cap its scores
    with torch.no_grad(), pytest.raises(attnzoo.UnsupportedError, match="soft-capping needs an exact method"):
        model(input_ids=ids, attention_mask=mask)
    oss = build("gpt-oss")
    with torch.no_grad():
        ref = oss(input_ids=ids, attention_mask=mask).logits
        azhf.apply(oss, {"*": ["exact", "naive", ("exact_tiled", {"q_tile": 3}), "exact"]})
        got = oss(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_packed_position_ids_run_sparse_methods_per_document():
    """A window method on a packed batch: each document on its own (equal to running it alone)."""
    model = build("Llama")
    seqs, packed, positions, _ = packed_inputs()
    azhf.apply(model, "sliding_window", window=4)
    with torch.no_grad():
        got = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        for g, s in zip(got.split(LENGTHS, 1), seqs):
            torch.testing.assert_close(g, model(input_ids=s, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_packed_batch_of_several_rows():
    model = build("Qwen2")
    seqs, packed, positions, _ = packed_inputs()
    rows = torch.cat([packed, packed.flip(1)]), torch.cat([positions, positions.flip(1).neg() + 8])
    with torch.no_grad():
        ref = model(input_ids=rows[0], position_ids=rows[1], use_cache=False).logits
        azhf.apply(model, "exact")
        got = model(input_ids=rows[0], position_ids=rows[1], use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_flash_kwargs_refusals():
    model = build("Llama")
    _, packed, positions, cu = packed_inputs()
    azhf.apply(model, "exact")
    with torch.no_grad():
        with pytest.raises(attnzoo.UnsupportedError, match="together"):
            model(input_ids=packed, position_ids=positions, use_cache=False, cu_seq_lens_q=cu)
        with pytest.raises(attnzoo.UnsupportedError, match="batch of 1"):
            model(input_ids=packed.expand(2, -1), position_ids=positions.expand(2, -1), use_cache=False,
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_a_cache_policy_that_selects_refuses_a_biting_window_and_score_mods():
    model = build("Mistral")
    azhf.apply(model, "exact")
    with pytest.raises(attnzoo.UnsupportedError, match="sliding window"):
        greedy(model, *batch(0), past_key_values=azhf.make_cache(model, "h2o", budget=8, recent=2))
    cache = attnzoo.KVCache("h2o", budget=8, recent=2)
    k = torch.randn(1, 2, 4, 8)
    cache.append(k, k)
    with pytest.raises(attnzoo.UnsupportedError, match="score_mod"):
        cache.attend(torch.randn(1, 2, 1, 8), score_mod=lambda s, b, h, qi, kj: s)

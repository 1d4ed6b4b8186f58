"""attnzoo.models: the cache folder, loading a local causal LM folder, errors; SmolLM2 itself in the slow suite."""

from __future__ import annotations

import time

import pytest
import torch
from typer.testing import CliRunner

from attnzoo import models
from attnzoo.cli import app
from attnzoo.errors import AttnZooError

from _tiny_lm import save_tiny_llama


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.model_dir("smollm2-135m") == tmp_path / "c" / "models" / "smollm2-135m"
    assert not models.is_fetched()
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "attnzoo"


def test_load_a_local_causal_lm_folder(tmp_path):
    folder = save_tiny_llama(tmp_path / "tiny")
    model, tok = models.load(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert models.context_length(model) == 4096
    ids = tok("hello", return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 5) and torch.isfinite(model(ids).logits).all()


def test_bad_model_arguments_say_what_to_do(tmp_path):
    with pytest.raises(AttnZooError, match="did you mean smollm2-135m"):
        models.load("smollm2-13m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttnZooError, match="no config.json"):
        models.load(tmp_path / "empty")
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    with pytest.raises(AttnZooError, match=r"is not a causal LM \(its config names BertModel\)"):
        models.load(tmp_path / "encoder")
    with pytest.raises(AttnZooError, match=r"pip install 'attnzoo\[eval\]'"):
        models.require("surely_not_a_module_xyz")


def test_models_cli_lists_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    out = CliRunner().invoke(app, ["models", "list"]).output
    assert "smollm2-135m" in out and "not fetched" in out and str(tmp_path) in out
    bad = CliRunner().invoke(app, ["models", "fetch", "gpt5"])
    assert bad.exit_code == 2 and "unknown model" in bad.output


@pytest.mark.slow
def test_smollm2_fetches_reloads_fast_and_continues_text():
    torch.set_num_threads(1)
    folder = models.fetch()
    models._load.cache_clear()
    t = time.perf_counter()
    model, tok = models.load("smollm2-135m")
    assert time.perf_counter() - t < 10  # the safetensors copy (the first GGUF conversion takes ~20 s)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.max_position_embeddings == 8192 and (folder / "SOURCE.txt").exists()
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])

"""A tiny random-weight Llama and a byte-level tokenizer, saved as a local model folder (built in about a second).

Used by the task and eval tests: every code path of ``attnzoo eval`` runs on it; the answers are
random, so tests check structure (rows, budgets, resume), never accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS = "<|eos|>"


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per byte (256) plus an end-of-sequence token: any text, lengths in bytes."""
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def tiny_llama(max_positions: int = 4096, layers: int = 2) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=max_positions, eos_token_id=256, pad_token_id=256,
                                      bos_token_id=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def save_tiny_llama(folder: Path, **kwargs) -> Path:
    tiny_llama(**kwargs).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder

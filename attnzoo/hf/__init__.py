"""Hugging Face transformers integration: any attnzoo method inside a transformers model, in one call.

>>> import attnzoo.hf as azhf
>>> azhf.apply(model, "sliding_window", window=64)     # every layer, every head
>>> azhf.apply(model, {0: "exact", "*": ("sliding_window", {"window": 64})})   # a per-layer plan
>>> azhf.remove(model)                                  # the original attention again
>>> qkv = azhf.capture_qkv(model, inputs)               # what each attention layer receives
>>> azhf.apply(model, "exact"); model.generate(**inputs, cache=azhf.make_cache(model, "h2o", budget=256))  # a KV cache that shrinks

Supported transformers versions: >=5.0,<6 (tested with the version pip installs, 5.23).
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("attnzoo.hf needs transformers: pip install 'attnzoo[hf]'") from e

from .cache import AttnZooCache, AttnZooCacheLayer, make_cache
from .adapter import ATTN_NAME, Geometry, attnzoo_attention, attnzoo_mask, mask_geometry
from .integration import (
    SUPPORTED_TRANSFORMERS,
    apply,
    attention_layers,
    capture_qkv,
    check_transformers_version,
    decode_route,
    is_applied,
    layer_plan,
    register,
    remove,
)
from .plan import HeadGroup, LayerSpec

__all__ = [
    "ATTN_NAME", "AttnZooCache", "AttnZooCacheLayer", "Geometry", "HeadGroup", "LayerSpec", "SUPPORTED_TRANSFORMERS",
    "apply", "attention_layers", "attnzoo_attention", "attnzoo_mask", "capture_qkv", "check_transformers_version",
    "decode_route", "is_applied", "layer_plan", "make_cache", "mask_geometry", "register", "remove",
]

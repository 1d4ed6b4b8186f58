"""attnzoo: the efficient-attention literature behind one API.

>>> import attnzoo as az
>>> out = az.attention(q, k, v, method="exact", causal=True)
>>> az.methods()        # every registered method
>>> az.info("exact")    # family, complexity, capabilities, parameters, papers

The names below load on first use (PEP 562), so ``import attnzoo`` and the
``attnzoo`` command start without importing torch; ``attnzoo.attention`` etc.
behave exactly like eager imports.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the submodule defining it (loaded on first access)
_EXPORTS = {
    "attention": ".api",
    "mods": ".mods", "pack": ".varlen", "unpack": ".varlen",
    "explain": ".backends",
    "KVCache": ".cache",
    "Partial": ".core.partial", "merge": ".core.partial",
    "AttnZooError": ".errors", "UnsupportedError": ".errors",
    "Family": ".registry", "Method": ".registry", "MethodInfo": ".registry", "Supports": ".registry",
    "get": ".registry", "info": ".registry", "methods": ".registry", "param": ".registry", "register": ".registry",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

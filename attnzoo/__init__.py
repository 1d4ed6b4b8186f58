"""attnzoo: the efficient-attention literature behind one API.

>>> import attnzoo as az
>>> out = az.attention(q, k, v, method="exact", causal=True)
>>> az.methods()        # every registered method
>>> az.info("exact")    # family, complexity, capabilities, parameters, papers
"""

from .api import attention
from .cache import KVCache
from .core.partial import Partial, merge
from .errors import AttnZooError, UnsupportedError
from .registry import Family, Method, MethodInfo, Supports, get, info, methods, param, register

__version__ = "0.1.0"

__all__ = [
    "AttnZooError", "Family", "KVCache", "Method", "MethodInfo", "Partial", "Supports", "UnsupportedError",
    "attention", "get", "info", "merge", "methods", "param", "register", "__version__",
]

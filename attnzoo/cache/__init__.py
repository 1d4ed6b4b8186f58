"""Decoding caches with pluggable selection/eviction policies (docs/methods.md, KV-cache policies).

>>> from attnzoo.cache import KVCache, policies
>>> cache = KVCache("quest", budget=2048, page=16)
>>> cache.append(k, v); out = cache.attend(q)
>>> sorted(policies())      # every registered policy
"""

from . import evict, heads, novelty, select  # noqa: F401  (registering the policies)
from .kvcache import KVCache
from .policy import Policy, Step, make_policy, policies, register_policy
from .store import Store

__all__ = ["KVCache", "Policy", "Step", "Store", "make_policy", "policies", "register_policy"]

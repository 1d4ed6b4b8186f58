"""Head-split policies: KV heads with different capacities (full heads, streaming heads, per-head SnapKV budgets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import AttnZooError
from ..registry import param
from .evict import Full, SnapKV, Streaming
from .layer import Layer, SplitLayer
from .policy import Policy, register_policy
from .ragged import RaggedSnapKV


def _head_list(name: str, what: str, heads, heads_kv: int) -> list[int]:
    out = []
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < heads_kv:
            raise AttnZooError(f"{name}: parameter {what!r} expected KV head indices in 0..{heads_kv - 1}, got {h!r}")
        out.append(h)
    return sorted(set(out))


def _split(full_heads: list[int], heads_kv: int, streaming: Streaming) -> SplitLayer:
    rest = [h for h in range(heads_kv) if h not in full_heads]
    return SplitLayer([(full_heads, Layer(Full())), (rest, Layer(streaming))], heads_kv)


@register_policy
@dataclass
class Razor(Policy):
    """RazorAttention: retrieval heads keep the full cache; the others keep ``sinks`` + ``window``
    plus one compensation token (the mean K and V of everything they evicted)."""

    name: ClassVar[str] = "razor"
    kind: ClassVar[str] = "split"
    reads: ClassVar[str] = "positions; compensation sums"
    papers: ClassVar[tuple[str, ...]] = ("RazorAttention",)

    retrieval_heads: tuple = param((), help="KV head indices that keep the full cache")
    sinks: int = param(4, min=0, help="initial tokens kept by the other heads")
    window: int = param(512, min=1, help="recent tokens kept by the other heads")
    compensation: bool = param(True, help="keep the mean of evicted K/V as one token")

    def validate(self) -> None:
        if not isinstance(self.retrieval_heads, (tuple, list)):
            raise AttnZooError(f"razor: parameter 'retrieval_heads' expected a tuple of KV head indices, "
                               f"got {self.retrieval_heads!r}")

    def build(self, heads_kv: int) -> SplitLayer:
        full = _head_list(self.name, "retrieval_heads", self.retrieval_heads, heads_kv)
        return _split(full, heads_kv, Streaming(sinks=self.sinks, window=self.window, compensate=self.compensation))


@register_policy
@dataclass
class Duo(Policy):
    """DuoAttention: a per-KV-head plan, True (or "full") = retrieval head with the full cache,
    False (or "streaming") = streaming head holding ``sinks`` + ``window`` tokens."""

    name: ClassVar[str] = "duo"
    kind: ClassVar[str] = "split"
    reads: ClassVar[str] = "positions"
    papers: ClassVar[tuple[str, ...]] = ("DuoAttention", "LServe")

    plan: tuple = param((), help="one entry per KV head: True/'full' or False/'streaming'")
    sinks: int = param(64, min=0, help="initial tokens kept by streaming heads")
    window: int = param(256, min=1, help="recent tokens kept by streaming heads")

    def validate(self) -> None:
        ok = isinstance(self.plan, (tuple, list)) and len(self.plan) > 0 and all(
            isinstance(p, bool) or p in ("full", "streaming") for p in self.plan)
        if not ok:
            raise AttnZooError(f"duo: parameter 'plan' expected a non-empty sequence of True/'full' or "
                               f"False/'streaming' per KV head, got {self.plan!r}")

    def build(self, heads_kv: int) -> SplitLayer:
        if len(self.plan) != heads_kv:
            raise AttnZooError(f"duo: parameter 'plan' expected {heads_kv} entries (one per KV head), got {len(self.plan)}")
        full = [h for h, p in enumerate(self.plan) if p is True or p == "full"]
        return _split(full, heads_kv, Streaming(sinks=self.sinks, window=self.window))


def _check_group(g, i: int) -> tuple[tuple[int, ...], str, dict]:
    if not (isinstance(g, (tuple, list)) and len(g) == 3 and isinstance(g[0], (tuple, list))
            and isinstance(g[1], str) and isinstance(g[2], dict)):
        raise AttnZooError(f"heads: parameter 'groups' entry {i} expected (kv_heads, policy name, params), got {g!r}")
    from .policy import POLICIES, make_policy

    if g[1] in POLICIES and POLICIES[g[1]].kind == "split":
        raise AttnZooError(f"heads: parameter 'groups' entry {i}: policy {g[1]!r} splits heads itself; give each "
                           "group a single-store policy (full, streaming, snapkv, ...)")
    make_policy(g[1], **g[2])  # unknown names / bad params: named now
    return tuple(g[0]), g[1], dict(g[2])


@register_policy
@dataclass
class Heads(Policy):
    """Per-head groups: each group of KV heads runs its own policy with its own parameters
    (a calibrated plan's cache layer: full heads, streaming heads with their own windows, SnapKV heads
    with their own budgets). Groups that are all ``full`` or ``snapkv`` share one packed store
    (:class:`~attnzoo.cache.ragged.RaggedSnapKV`: one read and one vote per layer); other mixes get one
    store per group."""

    name: ClassVar[str] = "heads"
    kind: ClassVar[str] = "split"
    reads: ClassVar[str] = "each group's policy"
    papers: ClassVar[tuple[str, ...]] = ("MoA", "DuoAttention", "RazorAttention")

    groups: tuple = param((), help="((kv_heads, policy, params), ...) covering every KV head once")
    ragged: bool = param(True, help="full and snapkv groups (one observe/pool/interval) share one packed store: "
                                    "one read and one vote per layer (False: one store per group)")

    def validate(self) -> None:
        if not isinstance(self.groups, (tuple, list)) or not self.groups:
            raise AttnZooError(f"heads: parameter 'groups' expected a non-empty list of (kv_heads, policy, params), "
                               f"got {self.groups!r}")
        self._groups = [_check_group(g, i) for i, g in enumerate(self.groups)]

    def build(self, heads_kv: int) -> SplitLayer | RaggedSnapKV:
        from .policy import make_policy

        seen = [h for heads, _, _ in self._groups for h in _head_list(self.name, "groups", heads, heads_kv)]
        if sorted(seen) != list(range(heads_kv)):
            raise AttnZooError(f"heads: parameter 'groups' expected every KV head 0..{heads_kv - 1} once, got "
                               f"{sorted(seen)}")
        policies = [(heads, make_policy(name, **params)) for heads, name, params in self._groups]
        snap = {(p.observe, p.pool, p.interval) for _, p in policies if isinstance(p, SnapKV)}
        if self.ragged and len(snap) == 1 and all(type(p) in (Full, SnapKV) for _, p in policies):
            budgets = [None] * heads_kv
            for heads, p in policies:
                for h in heads:
                    budgets[h] = p.budget if isinstance(p, SnapKV) else None
            observe, pool, interval = snap.pop()
            return RaggedSnapKV(budgets, observe=observe, pool=pool, interval=interval)
        return SplitLayer([(list(heads), Layer(p)) for heads, p in policies], heads_kv)


@register_policy
@dataclass
class ZipVL(Policy):
    """ZipVL's adaptive ratio: after the prompt each KV head (or the whole layer) keeps the fewest tokens
    holding a ``top_p`` share of the last ``observe`` queries' attention mass, then evicts like SnapKV
    within that budget. The budget is decided per prompt at run time; ``ratios()`` reports them."""

    name: ClassVar[str] = "zipvl"
    kind: ClassVar[str] = "evict"
    reads: ClassVar[str] = "the last `observe` queries"
    papers: ClassVar[tuple[str, ...]] = ("ZipVL",)

    top_p: float = param(0.975, min=1e-6, max=1.0, help="share of the observed attention mass the kept tokens hold")
    per: str = param("head", choices=("head", "layer"), help="one budget per KV head, or one for the layer")
    observe: int = param(32, min=1, help="queries remembered for voting (the observation window)")
    pool: int = param(1, min=1, max=1025, help="max-pooling width over neighbouring tokens when evicting")
    interval: int = param(1, min=1, help="decode steps between compressions")
    min_tokens: int = param(0, min=0, help="tokens every head keeps at least (observe + interval at the least)")

    def build(self, heads_kv: int) -> RaggedSnapKV:
        return RaggedSnapKV([None] * heads_kv, observe=self.observe, pool=self.pool, interval=self.interval,
                            top_p=self.top_p, per=self.per, min_tokens=self.min_tokens)

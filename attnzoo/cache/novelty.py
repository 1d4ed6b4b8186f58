"""A question-agnostic eviction policy: keep the keys with no near-duplicate (``novelty``).

SnapKV and H2O keep what recent queries attended to; when the question comes after compression
(a long document compressed once, asked about later) that vote keeps what the *text* was attending
to, not what a later question will need. ``novelty`` looks at the keys alone: long inputs repeat
themselves (filler, boilerplate, recurring phrases), and a repeated token's key has near-twins
elsewhere in the context, while a rare fact (a number, a name) does not. So each held token is
scored by how unlike its nearest other key it is, and the least duplicated ones are kept.

Keys are stored after rotary position embedding (RoPE), which turns twins at different positions
into different vectors. The score therefore compares RoPE-invariant descriptors: RoPE rotates each
2-D pair of channels by a position-dependent angle, so the pair's length does not depend on the
position; the descriptor of a key is its ``D/2`` pair lengths (``rope="half"``: channel ``i`` pairs
with ``i + D/2``, the Llama/transformers layout; ``"interleaved"``: ``2i`` with ``2i + 1``;
``"none"``: the raw key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import AttnZooError
from ..registry import param
from ..core.partial import Partial, merge
from .evict import Compensated, _top_older
from .policy import Policy, Step, register_policy
from .store import Store


def descriptors(k: torch.Tensor, rope: str) -> torch.Tensor:
    """``(..., D/2)`` RoPE-invariant pair lengths of keys ``(..., D)`` (``rope="none"``: the keys themselves)."""
    if rope == "none":
        return k.float()
    if k.shape[-1] % 2:
        raise AttnZooError(f"novelty: rope={rope!r} expected an even head dim, got {k.shape[-1]}")
    k = k.float()
    a, b = (k[..., 0::2], k[..., 1::2]) if rope == "interleaved" else k.chunk(2, dim=-1)
    return torch.sqrt(a * a + b * b)


def novelty(k: torch.Tensor, pos: torch.Tensor, *, rope: str = "half", exclude: int = 3,
            valid: torch.Tensor | None = None, rows: int = 1024) -> torch.Tensor:
    """``(B, H, n)``: minus the largest cosine similarity of each key's descriptor to any other held key's
    whose position differs by at least ``exclude`` (a key with a near-twin scores about -1, a unique one
    higher). Padding (``valid`` False) neither scores nor counts as a twin; a key with no eligible other
    key scores +1. Computed ``rows`` keys at a time (no ``n × n`` matrix).
    """
    x = F.normalize(descriptors(k, rope), dim=-1)
    B, H, n, _ = x.shape
    out = torch.empty(B, H, n, device=k.device)
    pos = pos.long().expand(B, H, n)
    # Held slots are in position order (a cache appends and keeps sorted slots): then a key's too-close
    # twins lie within `exclude` slots of it, a few diagonals of each chunk, and no (r, n) distance grid
    # is built (that grid cost more than the products at 4K).
    ordered = n < 2 or bool((pos[..., 1:] > pos[..., :-1]).all())
    for i0 in range(0, n, rows):
        sim = torch.matmul(x[:, :, i0:i0 + rows], x.transpose(-1, -2))                  # (B, H, r, n)
        if ordered:
            _exclude_diagonals(sim, pos, i0, exclude)
        else:
            sim.masked_fill_((pos[:, :, i0:i0 + rows, None] - pos[:, :, None, :]).abs() < exclude, -1.0)
        if valid is not None:
            sim.masked_fill_(~valid[:, :, None, :], -1.0)
        out[:, :, i0:i0 + rows] = -sim.amax(-1)
    return out if valid is None else out.masked_fill(~valid, -torch.inf)


def _exclude_diagonals(sim: torch.Tensor, pos: torch.Tensor, i0: int, exclude: int) -> None:
    """Sets ``sim[..., t, j]`` (row ``t`` = key ``i0 + t``) to -1 where ``|pos_j - pos_(i0+t)| < exclude``,
    for positions increasing along the slots: only slots ``j`` within ``exclude - 1`` of the row qualify."""
    r, n = sim.shape[-2:]
    for d in range(1 - exclude, exclude):
        diag = torch.diagonal(sim, offset=i0 + d, dim1=-2, dim2=-1)                     # (B, H, L) view
        if diag.shape[-1] == 0:
            continue
        t0 = max(0, -(i0 + d))                                                           # first row on it
        rows_pos = pos[..., i0 + t0:i0 + t0 + diag.shape[-1]]
        cols_pos = pos[..., i0 + t0 + d:i0 + t0 + d + diag.shape[-1]]
        diag.masked_fill_((cols_pos - rows_pos).abs() < exclude, -1.0)


@register_policy
@dataclass
class Novelty(Compensated, Policy):
    """Keeps the ``sinks`` first and ``recent`` newest tokens plus the held keys least like any other.

    Question-agnostic: nothing a query did enters the choice. After a read leaves more than
    ``budget`` tokens, every held key gets :func:`novelty` (minus its largest similarity to another
    key, on RoPE-invariant descriptors), max-pooled over ``pool`` neighbours (a kept rare token brings
    its neighbours: a number's surrounding words), and the best older ones are kept: ``budget -
    interval + 1`` in all, so the next compression comes ``interval`` decode steps later (a compression
    scores every held key against every other; ``interval`` spreads that cost over decode steps).

    ``compensate`` keeps what was evicted as one extra token per head, the mean of its keys and values
    (RazorAttention's compensation token): ``"mean"`` scores it as one token, ``"mass"`` as ``count``
    tokens (``+ log count``), so the evicted text keeps its share of every later softmax instead of
    leaving the kept tokens (the needles) an attention they never had under the full cache.
    """

    name: ClassVar[str] = "novelty"
    kind: ClassVar[str] = "evict"
    reads: ClassVar[str] = "the held keys"
    papers: ClassVar[tuple[str, ...]] = ("KeyDiff",)

    budget: int = param(2048, min=1, help="tokens held per KV head after each attend")
    sinks: int = param(4, min=0, help="initial tokens always kept")
    recent: int = param(64, min=1, help="newest tokens always kept")
    pool: int = param(7, min=1, max=1025, help="max-pooling width over neighbouring tokens")
    exclude: int = param(3, min=1, help="keys closer than this many positions are not counted as twins")
    rope: str = param("half", choices=("half", "interleaved", "none"),
                      help="channel pairs RoPE rotates (their lengths are compared), or none")
    interval: int = param(8, min=1, help="decode steps between compressions")
    compensate: str = param("none", choices=("none", "mean", "mass"),
                            help="the evicted tokens as one mean K/V token, counted once (mean) or once per "
                                 "evicted token (mass), or not kept (none)")

    def validate(self) -> None:
        if self.sinks + self.recent + self.interval - 1 >= self.budget:
            raise AttnZooError(f"novelty: budget expected > sinks + recent + interval - 1 = "
                               f"{self.sinks + self.recent + self.interval - 1}, got {self.budget} (lower sinks, recent "
                               "or interval, or give attnzoo eval a fractional budget, which scales them)")

    def update(self, store: Store, q: torch.Tensor, step: Step) -> None:
        if store.n <= self.budget:
            return
        n, s = store.n, self.sinks
        score = novelty(store.keys(), store.positions, rope=self.rope, exclude=self.exclude, valid=store.valid)
        B, H = score.shape[:2]
        pooled = F.max_pool1d(score.view(B * H, 1, n), self.pool, stride=1, padding=self.pool // 2)[..., :n]
        kept = _top_older(pooled.view(B, H, n)[:, :, s:], self.recent, self.budget - self.interval + 1 - s) + s
        sinks = torch.arange(s, device=kept.device).expand(B, H, s)
        if self.compensate != "none":  # everything after the sinks that is not kept
            gone = torch.ones(B, H, n, dtype=torch.bool, device=kept.device)
            gone[:, :, :s] = False
            gone.scatter_(-1, kept, False)
            w = gone.float() if store.valid is None else (gone & store.valid).float()
            self._absorb(store.keys(), store.values(), w, store.positions)
        store.keep(torch.cat([sinks, kept], dim=-1))

    def read(self, store: Store, q: torch.Tensor, step: Step) -> Partial:
        part = super().read(store, q, step)
        if self.comp is None:
            return part
        return merge(part, self._compensation(q, step.scale, mass=self.compensate == "mass"))

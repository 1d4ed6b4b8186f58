"""score_mod and sinks as the engines see them: checks, the index tensors a mod is called with, the sink merge.

A score_mod is ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's convention; helpers and
the position convention in :mod:`attnzoo.mods`). A sink is a partial ``(out = 0, lse = sinks[h])``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import AttnZooError
from .masks import check_callable
from .partial import Partial, merge

#: FlexAttention's score_mod(score, b, h, q_idx, kv_idx) -> score
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_score_mod(score_mod: object, name: str = "score_mod") -> None:
    """Refuse anything but a callable taking ``(score, b, h, q_idx, kv_idx)``."""
    check_callable(score_mod, name, "score_mod(score, b, h, q_idx, kv_idx) -> score", 5)


def call_score_mod(score_mod: ScoreMod, score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
    """Apply ``score_mod``, refusing an output of another shape (a mod must be elementwise)."""
    out = score_mod(score, b, h, q_idx, kv_idx)
    if not isinstance(out, torch.Tensor) or out.shape != score.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AttnZooError(f"score_mod: expected a tensor of the scores' shape {tuple(score.shape)} (elementwise "
                           f"ops on the scores and broadcasting index tensors), got {got}")
    return out.to(score.dtype)


def check_sinks(sinks: object, heads_q: int, device) -> torch.Tensor:
    """``sinks`` must be a finite floating ``(Hq,)`` tensor on the inputs' device."""
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise AttnZooError(f"sinks: expected a floating tensor of shape ({heads_q},) (one logit per query head), got "
                           f"{sinks.dtype if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    if tuple(sinks.shape) != (heads_q,):
        raise AttnZooError(f"sinks: expected shape ({heads_q},) (one logit per query head), got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise AttnZooError(f"sinks: expected a tensor on {device}, got {sinks.device}")
    if not bool(torch.isfinite(sinks).all()):
        raise AttnZooError("sinks: expected finite values, got NaN or inf")
    return sinks


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> Partial:
    """Merge attention ``(out (B, Hq, N, Dv), lse (B, Hq, N))`` with one sink logit per head: the partial
    ``(0, sinks[h])`` over a key set of its own. Differentiable with respect to ``sinks``."""
    sink_lse = sinks.to(lse.dtype if lse.dtype == torch.float64 else torch.float32)[None, :, None].expand_as(lse)
    return merge(Partial(out, lse), Partial(torch.zeros_like(out), sink_lse))


def functional(score: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a helper mod must leave ``score`` unchanged (else it updates the engine's scores in place, which
    saves a pass): autograd records the call, or a compiler traces it (FlexAttention traces a score_mod even on
    its eager path)."""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (score.requires_grad or any(t.requires_grad for t in tensors)))


class DistanceBias(ABC):
    """A score_mod adding a bias that depends only on the query head and the distance ``kv_idx - q_idx``:
    ``score + bias[h, kv_idx - q_idx]`` (ALiBi, relative-position tables, their sums; :mod:`attnzoo.mods`).

    Engines with PyTorch's fused CPU kernel run such a mod inside it, as an additive mask: a tile's bias
    is Toeplitz per head (constant along diagonals), so with the tile's query rows reversed it is an
    overlapping strided view of one vector over the tile's distances (:func:`distance_rows`) and no
    (query, key) grid is built. ``__call__`` is the same function on index tensors, which the generic
    engines and every backward pass use.
    """

    @abstractmethod
    def __call__(self, score, b, h, q_idx, kv_idx): ...

    @abstractmethod
    def bias(self, dist: torch.Tensor) -> torch.Tensor:
        """The bias of integer distances ``dist (L,)``: ``(Hq, L)``, or ``(1, L)`` when shared by the heads;
        differentiable with respect to the mod's tensors (the backward's gradients to them go through it)."""


class BiasSum(DistanceBias):
    """Distance biases applied in order (:func:`attnzoo.mods.compose`): a distance bias too (their sum)."""

    def __init__(self, parts: tuple[DistanceBias, ...]) -> None:
        self.parts = parts

    def __call__(self, score, b, h, q_idx, kv_idx):
        for m in self.parts:
            score = m(score, b, h, q_idx, kv_idx)
        return score

    def bias(self, dist):
        total = self.parts[0].bias(dist)
        for m in self.parts[1:]:
            total = total + m.bias(dist).to(total.device)
        return total


class Composed:
    """score_mods applied in order (:func:`attnzoo.mods.compose` of mods that are not all distance biases;
    ``parts``: the Triton backend and the soft-cap kernels read them)."""

    def __init__(self, parts: tuple) -> None:
        self.parts = parts

    def __call__(self, score, b, h, q_idx, kv_idx):
        for m in self.parts:
            score = m(score, b, h, q_idx, kv_idx)
        return score


class Within(DistanceBias):
    """A distance bias evaluated only at the distances ``span = (lo, hi)`` of one call's scores (None: all):
    the engines' tiles and windows also cover padding, whose distances no visible score has; those take the
    edge values, so a function defined on the call's positions alone (:func:`attnzoo.mods.positional` indexing
    its own table) is never called beyond them."""

    def __init__(self, mod: DistanceBias, span: tuple[int, int] | None) -> None:
        self.mod, self.span = mod, span
        self.__name__ = getattr(mod, "__name__", type(mod).__name__)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.mod(score, b, h, q_idx, kv_idx)

    def bias(self, dist):
        return self.mod.bias(dist if self.span is None else dist.clamp(*self.span))


class Softcap:
    """Logit soft-capping ``cap * tanh(score / cap)`` (:func:`attnzoo.mods.softcap`). The tiled engine's
    forward knows it (:attr:`ModHook.cap`): ``1 / cap`` joins the query scale and, every capped score being
    at most ``cap``, the softmax needs no row maximum (:func:`attnzoo.core.exact.tiled_forward`)."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __call__(self, score, b, h, q_idx, kv_idx):
        cap = self.cap
        return torch.tanh(score / cap) * cap if functional(score) else score.div_(cap).tanh_().mul_(cap)

    def __repr__(self) -> str:
        return f"softcap({self.cap})"


def distance_rows(mod: DistanceBias, d0: int, length: int, dtype: torch.dtype, device, *, causal: bool,
                  floor: torch.Tensor | None = None) -> torch.Tensor:
    """``(Hq or 1, length)`` contiguous additive-mask entries of the distances ``d0, d0 + 1, ...``.

    -inf where ``causal`` hides the key (distance > 0) and where the bias is below ``floor (Hq, 1)``
    (see :func:`negligible_gap`). A tile whose query rows are reversed reads element ``(r, c)`` at
    ``d0 + r + c``.
    """
    dist = torch.arange(d0, d0 + length, device=device)
    with torch.no_grad():
        w = mod.bias(dist).to(device, dtype)
        if floor is not None:
            w = w.masked_fill(w < floor, -math.inf)
        if causal:
            w = w.masked_fill(dist > 0, -math.inf)
    return w.contiguous()


def gathered_bias(mod: DistanceBias, units: torch.Tensor, first: torch.Tensor, head0: torch.Tensor, *, rows: int,
                  unit: int, groups: int, span: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The bias of query blocks against gathered key units, ``(..., groups·rows, U·unit)``, with no (query, key)
    index grid: the tile of one (block, unit) pair is Toeplitz, ``bias[h, d0 + c - r]`` with
    ``d0 = u·unit - first``, so every tile is a window of one Hankel view of the bias over all distances
    (rows reversed), and ONE gather copies the windows into place.

    ``units (..., U)`` key units (-1: none; their values are then arbitrary, finite); ``first`` (the block's
    first query position: row ``r`` at ``first + r``) and ``head0`` (its first query head; row group ``g`` is
    head ``head0 + g``) broadcast to ``units``' leading dims; ``span = (lo, hi)``: every distance a row meets.
    """
    lo, hi = span[0] - rows, span[1] + unit
    vec = distance_rows(mod, lo, hi - lo + 1, dtype, units.device, causal=False)  # (Hq or 1, L)
    windows = vec.as_strided((vec.shape[0], vec.shape[1] - rows - unit + 2, rows, unit), (vec.stride(0), 1, 1, 1))
    dev = units.device
    start = (units * unit - first.unsqueeze(-1) - (rows - 1) - lo).clamp(0, windows.shape[1] - 1)
    head = head0.unsqueeze(-1) + torch.arange(groups, device=dev)
    head = head if vec.shape[0] > 1 else torch.zeros_like(head)
    rev = torch.arange(rows - 1, -1, -1, device=dev).view(rows, 1)
    tiles = windows[head[..., :, None, None], start[..., None, None, :], rev]  # (..., groups, rows, U, unit)
    return tiles.reshape(*tiles.shape[:-4], groups * rows, -1)


def negligible_gap(q: torch.Tensor, k: torch.Tensor, scale: float, len_k: int) -> torch.Tensor:
    """``(Hq, 1)``: a key whose bias is this far below the largest bias its query row sees weighs nothing.

    Scores are ``s = scale·q·k + bias`` with ``|scale·q·k| <= A = scale·max‖q‖·max‖k‖`` (per head), so a
    row's maximum is at least its largest visible bias minus ``A``, and a key whose bias is below that by
    ``2A + margin`` has ``exp(s - max) < exp(-margin)``: all ``len_k`` such keys together weigh less than
    ``e^-4 · eps`` of the row (``margin = log len_k - log eps + 4``) and may be masked (-inf) without
    changing the result in q's precision. The point is speed: far keys of a steep bias (ALiBi) otherwise
    land in the subnormal range, where CPU arithmetic is many times slower.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    dtype = q.dtype if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        qn = q.detach().to(dtype).norm(dim=-1).amax(dim=(0, 2))  # (Hq,)
        kn = k.detach().to(dtype).norm(dim=-1).amax(dim=(0, 2)).repeat_interleave(Hq // Hkv)
        return (2 * scale * qn * kn + negligible_margin(q.dtype, len_k)).unsqueeze(-1)


def negligible_margin(dtype: torch.dtype, len_k: int) -> float:
    """The smallest :func:`negligible_gap` of any inputs (``margin``, its part that needs no pass over q and k):
    a bias whose values on a row span less than this never has a key to drop."""
    eps = torch.finfo(dtype if dtype == torch.float64 else torch.float32).eps
    return math.log(max(len_k, 1)) - math.log(eps) + 4.0


class ModHook:
    """A score_mod bound to one engine call: the one place the tiled engine and the block-sparse executor
    apply it, in the forward and in their recomputing backward.

    The engines form each tile's raw scores (already scaled) and the index tensors ``b, h, q_idx, kv_idx``
    broadcastable to them, then call :meth:`scores` (forward: the mod, possibly in place) or
    :meth:`recompute` (backward: the mod under autograd, plus the map from the gradient of the modified
    scores to that of the raw ones). Tensors the mod closes over that require grad (``captured``, found by
    :func:`captured_tensors`) are extra inputs of the engines' autograd functions; their gradients are
    summed over tiles into the ``grads`` list :meth:`recompute` is given.
    """

    def __init__(self, score_mod: ScoreMod, *, like: torch.Tensor, grad: bool, q_idx: int = 0,
                 kv_idx: int = 0, span: tuple[int, int] | None = None) -> None:
        self.fn = score_mod
        # fused kernels run a distance bias as a mask, evaluated within the call's distances ``span``
        self.distance = Within(score_mod, span) if isinstance(score_mod, DistanceBias) else None
        self.cap = score_mod.cap if isinstance(score_mod, Softcap) else None  # the tiled forward folds it in
        self.capped = capped_parts(score_mod)  # (bias | None, cap): the soft-cap extension runs it
        if self.capped is not None and self.capped[0] is not None:
            self.capped = Within(self.capped[0], span), self.capped[1]
        for bias in (self.distance, self.capped[0] if self.capped else None):
            if bias is not None:
                _check_rows(bias, like.shape[1], like.device)
        self.captured = captured_tensors(score_mod, like, q_idx, kv_idx) if grad else ()

    def scores(self, s: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
        """The modified scores of a tile (forward, no autograd: the mod may update ``s`` in place)."""
        with torch.no_grad():
            return call_score_mod(self.fn, s, b, h, q_idx, kv_idx)

    def recompute(self, s: torch.Tensor, b, h, q_idx, kv_idx, grads: list):
        """``(modified scores, to_raw)``: ``to_raw(ds)`` is the gradient of the raw scores given ``ds`` of the
        modified ones, and adds the captured tensors' gradients into ``grads``. ``s`` is the engine's own tile
        (a fresh product, not used after): the modified scores may overwrite it."""
        bias, cap = self.capped if self.capped is not None else (self.distance, None)
        if (bias, cap) != (None, None) and all(isinstance(t, torch.Tensor) for t in (h, q_idx, kv_idx)):
            return self._recompute_closed(s, bias, cap, h, q_idx, kv_idx, grads)
        raw = s.detach().requires_grad_(True)
        with torch.enable_grad():
            mod = call_score_mod(self.fn, raw, b, h, q_idx, kv_idx)
        if not mod.requires_grad:  # the mod ignores the scores (a constant): no gradient to them or anything
            return mod.detach().clone(), torch.zeros_like

        def to_raw(ds: torch.Tensor) -> torch.Tensor:
            got = torch.autograd.grad(mod, (raw, *self.captured), ds.reshape(mod.shape), allow_unused=True)
            _accumulate(grads, got[1:])
            return torch.zeros_like(ds) if got[0] is None else got[0].reshape(ds.shape)

        return mod.detach().clone(), to_raw

    def _recompute_closed(self, s: torch.Tensor, bias: DistanceBias | None, cap: float | None, h, q_idx, kv_idx,
                          grads: list):
        """:meth:`recompute` of a distance bias and/or a soft cap after it, without autograd on the tile: the
        cap's gradient is ``1 - tanh²``, the bias passes the scores' gradient through unchanged. The bias comes
        from one vector over the tile's distances: a Hankel view on a tile of contiguous heads and positions
        (the tiled engine's, :func:`_bias_tile`), else read at the index tensors' distances (the block-sparse
        slot loop's gathered keys, :func:`_index_bias`). The bias tensors' gradients are pulled back through
        :meth:`DistanceBias.bias` from the per-distance sums of the biased scores' gradient (the tile's
        diagonals, or a scatter-add at the same indices)."""
        hankel = bias is not None and _contiguous_tile(s, h, q_idx, kv_idx)
        with torch.no_grad():  # in place on the engine's fresh scores: 4 passes over the tile for bias + cap
            if bias is None:
                mod = s
            elif hankel:
                mod = s.add_(_bias_tile(bias, s, h, q_idx, kv_idx))
            else:
                tile, where, lo = _index_bias(bias, s, h, q_idx, kv_idx)
                mod = s.add_(tile)
            if cap is not None:
                th = mod.div_(cap).tanh_()
                slope = torch.addcmul(th.new_ones(()), th, th, value=-1)  # d capped / d biased = 1 - tanh²
                mod = th.mul_(cap)
        if bias is None or not self.captured:
            return mod, (lambda ds: ds) if cap is None else (lambda ds: ds.mul_(slope.view_as(ds)))
        heads, rows, cols = s.shape[1:] if hankel else (0, 0, 0)
        h0, q0, k0 = (int(t.flatten()[0]) for t in (h, q_idx, kv_idx))

        def to_raw(ds: torch.Tensor) -> torch.Tensor:
            if cap is not None:
                ds = ds.mul_(slope.view_as(ds))
            with torch.no_grad():
                if hankel:  # row i of `shifted` holds row i of ds moved right by rows - 1 - i
                    width = rows + cols - 1
                    shifted = ds.new_zeros(heads, rows, width)
                    shifted.as_strided((heads, rows, cols), (rows * width, width - 1, 1), rows - 1).copy_(
                        ds.reshape(mod.shape).sum(0))
                    sums, first = shifted.sum(1), k0 - q0 - rows + 1  # column c: distance first + c
                else:  # where: flat (head row, distance) index of every score
                    sums = ds.new_zeros(where[1]).index_add_(0, where[0].expand(mod.shape).reshape(-1),
                                                             ds.reshape(-1)).view(-1, where[2])
                    first = lo
            self.pull_back(bias, sums, first, grads, slice(h0, h0 + heads) if hankel else None)
            return ds

        return mod, to_raw

    def pull_back(self, bias: DistanceBias, sums: torch.Tensor, first: int, grads: list,
                  heads: slice | None = None) -> None:
        """Add into ``grads`` the captured tensors' gradients given ``sums (rows, L)``: the gradient of the biased
        scores summed per head row (``heads`` of the bias's rows, default all; summed when the bias has one) and
        distance ``first, first + 1, ...``, pulled back through :meth:`DistanceBias.bias`."""
        with torch.enable_grad():
            rows = bias.bias(torch.arange(first, first + sums.shape[-1], device=sums.device))
            if rows.shape[0] == 1:
                sums = sums.sum(0, keepdim=True)
            elif heads is not None:
                rows = rows[heads]
            got = torch.autograd.grad(rows, self.captured, sums.to(rows.dtype), allow_unused=True)
        _accumulate(grads, got)

    def input_grads(self, grads: list) -> tuple:
        """The captured tensors' gradients for an autograd function's backward (zeros where none reached)."""
        return tuple(torch.zeros_like(t) if g is None else g.to(t.dtype) for t, g in zip(self.captured, grads))


def capped_parts(score_mod) -> tuple[DistanceBias | None, float] | None:
    """``(bias, cap)`` of a soft cap alone (``bias`` None) or distance biases followed by one soft cap
    (``mods.compose(alibi, softcap)``), which :mod:`attnzoo.core.capped` runs with the bias as its additive
    mask; None for any other mod."""
    if isinstance(score_mod, Softcap):
        return None, score_mod.cap
    parts = getattr(score_mod, "parts", None)
    if (isinstance(parts, tuple) and len(parts) > 1 and isinstance(parts[-1], Softcap)
            and all(isinstance(p, DistanceBias) for p in parts[:-1])):
        return (parts[0] if len(parts) == 2 else BiasSum(parts[:-1])), parts[-1].cap
    return None


def _check_rows(mod: DistanceBias, heads_q: int, device) -> None:
    """A distance bias must give one row per query head, or one shared row."""
    with torch.no_grad():
        rows = mod.bias(torch.zeros(1, dtype=torch.long, device=device)).shape[0]
    if rows not in (1, heads_q):
        name = getattr(mod, "__name__", type(mod).__name__)
        raise AttnZooError(f"score_mod {name}: a distance bias with {rows} head rows (slopes, table rows or heads), "
                           f"expected {heads_q} (the query heads) or 1")


def _accumulate(grads: list, got: tuple) -> None:
    """Add one tile's gradients of the captured tensors into ``grads`` (None: nothing reached that tensor)."""
    for i, g in enumerate(got):
        if g is not None:
            grads[i] = g if grads[i] is None else grads[i] + g


def _bias_tile(bias: DistanceBias, s: torch.Tensor, h, q_idx, kv_idx) -> torch.Tensor:
    """The bias ``(heads|1, rows, cols)`` of a tile of contiguous heads and positions (:func:`_contiguous_tile`)
    from one vector over its distances (a Hankel view ``unfold``, rows flipped): no index grid, no call on the
    tile. (Flipping the unfolded view, not an ``as_strided`` one, gives a row-major tile: adding it to the
    scores took half the time, 1.3 against 2.8 ms on a (8, 256, 512) tile, loaded machine.)"""
    heads, rows, cols = s.shape[1:]
    h0, q0, k0 = int(h.flatten()[0]), int(q_idx.flatten()[0]), int(kv_idx.flatten()[0])
    w = distance_rows(bias, k0 - q0 - rows + 1, rows + cols - 1, s.dtype, s.device, causal=False)
    w = w[h0:h0 + heads] if w.shape[0] > 1 else w
    return w.unfold(-1, cols, 1).flip(1)


def _index_bias(bias: DistanceBias, s: torch.Tensor, h, q_idx, kv_idx):
    """``(tile, where, lo)``: the bias at the distances of any broadcastable index tensors (a tile broadcastable
    to ``s``), read from one vector over distances ``lo ..`` (one subtraction and one gather over the tile,
    no call of the mod on it); ``where = (flat index (head row · L + distance - lo), rows · L, L)`` for the
    scatter-add of the gradient."""
    lo = int(kv_idx.min()) - int(q_idx.max())
    length = int(kv_idx.max()) - int(q_idx.min()) - lo + 1
    vec = distance_rows(bias, lo, length, s.dtype, s.device, causal=False)  # (Hq or 1, L)
    d = kv_idx - (q_idx + lo)
    shared = vec.shape[0] == 1
    if not shared and h.shape[-1] != 1:  # heads varying along the keys: indexing (slower than a gather)
        return vec[h, d], (h * length + d, vec.numel(), length), lo
    # each row's bias vector (a view when shared), expanded to the tile: ONE gather along the keys
    src = vec[0].view((1,) * (d.dim() - 1) + (length,)) if shared else vec[h[..., 0]]
    full = torch.broadcast_shapes(src.shape[:-1] + (1,), d.shape)
    tile = torch.gather(src.expand(*full[:-1], length), -1, d.expand(full))
    return tile, ((d if shared else h * length + d), vec.numel(), length), lo


def _contiguous_tile(s: torch.Tensor, h, q_idx, kv_idx) -> bool:
    """Whether ``s (B, H, rows, cols)`` has consecutive heads, query and key positions (the tiled engine's tiles,
    :func:`tile_index`), as :meth:`ModHook._recompute_closed` reads them."""
    if s.dim() != 4 or not all(isinstance(t, torch.Tensor) for t in (h, q_idx, kv_idx)):
        return False
    heads, rows, cols = s.shape[1:]
    shapes = (tuple(h.shape), tuple(q_idx.shape), tuple(kv_idx.shape))
    if shapes != ((1, heads, 1, 1), (1, 1, rows, 1), (1, 1, 1, cols)):
        return False
    return all(int(t.flatten()[-1] - t.flatten()[0]) == t.numel() - 1 for t in (h, q_idx, kv_idx))


class _Reads(TorchFunctionMode):
    """Records the tensors requiring grad that torch operations read without having made them."""

    def __init__(self, own: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.made = {id(t): t for t in own}  # kept alive so ids stay unique during the call
        self.read: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in self.made:
                self.read[id(t)] = t
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.made[id(t)] = t
        return out


def captured_tensors(score_mod: ScoreMod, like: torch.Tensor, q_idx: int = 0, kv_idx: int = 0
                     ) -> tuple[torch.Tensor, ...]:
    """The tensors requiring grad that ``score_mod`` reads from outside (a learnable bias table, slopes).

    Found by running the mod once on a one-element score (batch 0, head 0, one valid query / key position)
    under a torch function mode that records every tensor argument the mod did not create (FlexAttention
    lifts them by tracing instead). A mod that picks its tensors by Python branching on index *values*
    should read all of them on this probe.
    """
    score = like.new_zeros(1, 1, 1, 1).requires_grad_(True)
    idx = [torch.full((1, 1, 1, 1), i, dtype=torch.long, device=like.device) for i in (0, 0, q_idx, kv_idx)]
    rec = _Reads((score, *idx))
    with torch.enable_grad(), rec:
        score_mod(score, *idx)
    return tuple(rec.read.values())


class Reordered:
    """``score_mod`` for an engine that runs on reordered tokens (sorted by hash bucket or cluster, a grid's
    pattern order): the engine's query row ``i`` (position ``i + q_offset``) is original query
    ``q_order[b, h, i]`` and its key ``j`` original key ``k_order[b, h // groups, j]``; the mod sees the
    original positions (query ``q_order[...] + q_offset``). Orders are ``(N,)`` or ``(B|1, H|1, N)``.
    A kernel backend reads the parts (:meth:`positions`) and applies ``mod`` at those positions itself."""

    def __init__(self, score_mod: ScoreMod, q_order: torch.Tensor, k_order: torch.Tensor, *, q_offset: int,
                 groups: int) -> None:
        self.mod, self.q_order, self.k_order, self.q_offset, self.groups = score_mod, q_order, k_order, q_offset, \
            groups

    @staticmethod
    def _pick(order: torch.Tensor, b, h, i):
        if order.dim() == 1:
            return order[i]
        return order[b if order.shape[0] > 1 else 0, h if order.shape[1] > 1 else 0, i]

    def __call__(self, score, b, h, q_idx, kv_idx):
        qi = self._pick(self.q_order, b, h, (q_idx - self.q_offset).clamp(0, self.q_order.shape[-1] - 1))
        return self.mod(score, b, h, qi + self.q_offset, self._pick(self.k_order, b, h // self.groups, kv_idx))

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_pos (B|1, Hq|1, Nq), k_pos (B|1, Hkv|1, Nk))``: the original position of each engine row / key."""
        q, k = (o.view(1, 1, -1) if o.dim() == 1 else o for o in (self.q_order, self.k_order))
        return q + self.q_offset, k


def reordered(score_mod: ScoreMod, q_order: torch.Tensor, k_order: torch.Tensor, *, q_offset: int,
              groups: int) -> Reordered:
    """``score_mod`` at the original positions of reordered tokens (:class:`Reordered`)."""
    return Reordered(score_mod, q_order, k_order, q_offset=q_offset, groups=groups)


def tile_index(shape: tuple[int, int, int, int], q_offset: int, k_offset: int, head_offset: int = 0, device=None):
    """``(b, h, q_idx, kv_idx)`` broadcastable to ``(B, H, Nq, Nk)`` scores of contiguous positions."""
    B, H, len_q, len_k = shape
    return (torch.arange(B, device=device).view(B, 1, 1, 1),
            torch.arange(head_offset, head_offset + H, device=device).view(1, H, 1, 1),
            torch.arange(q_offset, q_offset + len_q, device=device).view(1, 1, len_q, 1),
            torch.arange(k_offset, k_offset + len_k, device=device).view(1, 1, 1, len_k))


def apply_score_mod(score_mod: ScoreMod, scores: torch.Tensor, q_offset: int, k_offset: int,
                    head_offset: int = 0) -> torch.Tensor:
    """``score_mod`` on ``(B, H, Nq, Nk)`` scores with broadcastable batch, head and position indices."""
    return call_score_mod(score_mod, scores, *tile_index(scores.shape, q_offset, k_offset, head_offset,
                                                         scores.device))

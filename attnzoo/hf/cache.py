"""A transformers ``Cache`` whose layers are attnzoo :class:`~attnzoo.cache.KVCache` objects.

>>> attnzoo.hf.apply(model, "exact")
>>> cache = attnzoo.hf.make_cache(model, "h2o", budget=64, recent=16)
>>> model.generate(**inputs, cache=cache)
>>> cache.nbytes          # what the compressed cache really holds

How a step flows: the model's attention module calls ``cache.update(k, v, layer_idx)``;
the layer keeps the new tokens pending and returns them tagged; attnzoo's attention
function (the model must be routed through :func:`attnzoo.hf.apply` with an exact
method first; ``make_cache`` refuses otherwise) sees the tag, derives the new tokens' padding from
the mask, appends them to the ``KVCache`` and reads through the policy
(``KVCache.attend``). ``get_seq_length`` is the logical length (tokens appended, also
after eviction), so RoPE positions and transformers' mask sizes stay those of the
full sequence; the policy decides which of those keys are held and read.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import KVCache
from ..errors import AttnZooError, UnsupportedError
from .. import mods
from .adapter import _EXACT, ATTN_NAME, CACHE_TAG, _geometry, window_mod
from .integration import attention_layers, is_applied, layer_plan
from .plan import LayerSpec
from ..plan.file import Plan as PlanFile


class AttnZooCacheLayer(CacheLayerMixin):
    """One transformers cache layer backed by a :class:`~attnzoo.cache.KVCache`."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, policy: str = "full", **params: Any) -> None:
        super().__init__()
        self.kv = KVCache(policy, **params)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._docs: torch.Tensor | None = None  # packed mode: tokens held per sequence (one KVCache row each)

    def __repr__(self) -> str:
        return f"AttnZooCacheLayer({self.kv!r})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Keep the new tokens pending until the attention call appends them with their padding."""
        if self._pending is not None:
            raise UnsupportedError("attnzoo cache: the previous step's keys were never attended through attnzoo; "
                                   "the model's attention must be routed with attnzoo.hf.apply(model, ...)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        keys = key_states.view_as(key_states)  # a new tensor object carrying the tag, the caller's is untouched
        setattr(keys, CACHE_TAG, self)
        return keys, value_states

    def attend(self, spec: LayerSpec, query: torch.Tensor, attention_mask, *, causal: bool, scale: float | None,
               sliding_window: int | None, score_mod=None, sinks: torch.Tensor | None = None,
               cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Append the pending tokens (padding taken from the mask) and read them through the policy.

        ``cu_seqlens = (cu_q, cu_k)`` (flash-attention's varlen kwargs): see :meth:`_attend_packed`.
        """
        if self._pending is None:
            raise AttnZooError("attnzoo cache: attend called without a preceding update")
        keys, values = self._pending
        self._pending = None
        bad = [g.method.name for g in spec.groups if g.method.name not in _EXACT]
        if bad:
            raise UnsupportedError(f"layer {spec.layer}: method {bad[0]!r} cannot run with an attnzoo cache, whose "
                                   f"policy ({self.kv.policy.name!r}) decides what is read; apply 'exact' instead")
        if cu_seqlens is not None:
            return self._attend_packed(spec, query, keys, values, *cu_seqlens, causal=causal, scale=scale,
                                       sliding_window=sliding_window, score_mod=score_mod, sinks=sinks)
        if self._docs is not None:
            raise UnsupportedError("attnzoo cache: this cache holds packed sequences (one row each); every later "
                                   "call must carry cu_seq_lens_q / cu_seq_lens_k too")
        n, total = keys.shape[2], self.kv.seq_length + keys.shape[2]
        # every layer of a step receives the same mask object: translated once per step, not once per layer
        geo = _geometry(attention_mask, causal=causal, len_q=query.shape[2], len_k=total, window=sliding_window)
        if geo.window is not None:  # exact over what the policy holds, the window as a score_mod (full reads only)
            if not self.kv.reads_all:
                raise UnsupportedError(f"layer {spec.layer}: the model's sliding window ({geo.window}) is shorter than "
                                       f"the context and policy {self.kv.policy.name!r} chooses what it reads (a "
                                       "window needs a policy that reads every held token: full, quantized)")
            score_mod = window_mod(geo.window) if score_mod is None else mods.compose(score_mod, window_mod(geo.window))
        if geo.len_k != total or (not geo.causal and query.shape[2] > 1):
            raise UnsupportedError("attnzoo cache: only causal attention over the whole cached sequence is "
                                   "supported (the mask is not causal or leaves trailing keys unseen)")
        key_mask = None if geo.key_padding_mask is None else geo.key_padding_mask[:, -n:]
        self.kv.append(keys, values, key_mask=key_mask)
        return self.kv.attend(query, causal=geo.causal, scale=scale, score_mod=score_mod, sinks=sinks)

    def _attend_packed(self, spec: LayerSpec, query, keys, values, cu_q: torch.Tensor, cu_k: torch.Tensor, *,
                       causal: bool, scale, sliding_window, score_mod, sinks) -> torch.Tensor:
        """Packed sequences (flash-attention's varlen convention with a cache): ``query``, ``keys``, ``values``
        are one row of every sequence's new tokens laid end to end, ``cu_q`` their offsets, and ``cu_k`` the
        offsets of each sequence's whole key set (its tokens held from earlier calls, then the new ones).

        The cache keeps one KVCache row per sequence: each call's new tokens are left-padded to the longest
        (padding masked, as in a left-padded batch), appended, and read causally; the output rows of real
        tokens are packed back. A ragged prefill followed by one token per sequence per step therefore holds
        exactly a left-padded batch; ragged later steps leave padding slots mid-row, which position-based
        policies count as positions. Returns ``(1, Hq, total_new, Dv)``.
        """
        n_q, n_k = cu_q.long().diff(), cu_k.long().diff()
        docs, total = n_q.numel(), keys.shape[2]
        if query.shape[0] != 1 or int(cu_q[-1]) != total or (n_q < 0).any():
            raise AttnZooError(f"cu_seq_lens_q: expected increasing offsets from 0 to {total} over one packed row, "
                               f"got {cu_q.tolist()} for a batch of {query.shape[0]}")
        if not causal:
            raise UnsupportedError("attnzoo cache: packed sequences need causal attention")
        held = self._docs if self._docs is not None else n_q.new_zeros(docs)
        if self._docs is None and self.kv.seq_length:
            raise UnsupportedError("attnzoo cache: packed sequences cannot continue a cache filled without them")
        if held.numel() != docs or not torch.equal(n_k.cpu(), (held + n_q).cpu()):
            raise AttnZooError(f"cu_seq_lens_k: expected the offsets of each sequence's held plus new tokens, "
                               f"lengths {(held + n_q).tolist() if held.numel() == docs else f'for {held.numel()} sequences'}"
                               f", got lengths {n_k.tolist()}")
        if sliding_window is not None and int(n_k.max()) > sliding_window:
            raise UnsupportedError(f"layer {spec.layer}: the model's sliding window ({sliding_window}) is shorter "
                                   "than a packed sequence held in the attnzoo cache; not supported")
        width = int(n_q.max()) if docs else 0
        if width == 0:
            return query.new_zeros(*query.shape[:3], values.shape[3])
        # slot j of sequence i holds packed token cu_q[i] + j - (width - n_q[i]); slots before that are padding
        src = cu_q[:-1].long().to(keys.device)[:, None] + torch.arange(width, device=keys.device) \
            - (width - n_q.to(keys.device))[:, None]
        real = src >= cu_q[:-1].long().to(keys.device)[:, None]
        src = src.clamp(0, max(total - 1, 0))

        def rows(t: torch.Tensor) -> torch.Tensor:  # (1, H, total, X) -> (docs, H, width, X), padding zeroed
            return t[0][:, src].transpose(0, 1).masked_fill(~real[:, None, :, None], 0)

        self.kv.append(rows(keys), rows(values), key_mask=real)
        out = self.kv.attend(rows(query), causal=True, scale=scale, score_mod=score_mod, sinks=sinks)
        self._docs = held + n_q
        return out.transpose(0, 1)[:, real].unsqueeze(0)

    def get_seq_length(self) -> int:
        return self.kv.seq_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.seq_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv.reset()
        self._pending = None
        self._docs = None

    def crop(self, tokens_to_remove: int) -> None:
        """transformers passes ``-n`` to drop the last ``n`` tokens (KVCache.crop's convention too)."""
        self._not_packed("crop")
        self.kv.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._not_packed("reorder_cache")
        self.kv.reorder(beam_idx)

    def _not_packed(self, what: str) -> None:
        if self._docs is not None:
            raise UnsupportedError(f"attnzoo cache: {what} of a cache holding packed sequences is not supported")

    def _batch_change(self, what: str) -> None:
        if self.kv.seq_length:
            raise UnsupportedError(f"attnzoo cache: {what} of a filled cache is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_change("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_change("batch_select_indices")

    def offload(self) -> None:
        raise UnsupportedError("attnzoo cache: offloading is not supported")

    prefetch = offload


class AttnZooCache(Cache):
    """A transformers Cache with one :class:`AttnZooCacheLayer` per attention layer."""

    def __init__(self, layers: list[AttnZooCacheLayer], config) -> None:
        super().__init__(layers=layers)
        self._config = config  # the model's config: its attention must stay routed through attnzoo

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._config._attn_implementation != ATTN_NAME:
            raise UnsupportedError(f"attnzoo cache: the model runs attn_implementation="
                                   f"{self._config._attn_implementation!r}, which would ignore the cache policy; "
                                   "route it with attnzoo.hf.apply(model, 'exact')")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes the layers' KV caches hold (keys, values and policy metadata)."""
        return sum(layer.kv.nbytes for layer in self.layers)


def make_cache(model, policy: str | PlanFile = "full", **params: Any) -> AttnZooCache:
    """A cache for ``model.generate(..., cache=cache)`` that keeps what ``policy`` keeps.

    Every layer gets ``KVCache(policy, **params)``; a plan file (:class:`attnzoo.plan.Plan`) gives each
    layer its own policy instead (its full KV heads keep everything, the others stream). The model must already run an exact method
    through attnzoo (``attnzoo.hf.apply(model, "exact")`` first; the policy decides what is read).
    The applied method is read through: a layer running ``("flash_decode", {"splits": S})`` gets a
    cache reading with ``splits=S`` (a different ``splits`` given here is refused).
    """
    attention_layers(model)  # refuses a model whose attention cannot be routed, before anything else
    if not is_applied(model):
        raise UnsupportedError("make_cache: the model's attention does not run through attnzoo, so no cache policy "
                               "would be read; route it first with attnzoo.hf.apply(model, 'exact') (or another "
                               f"exact method: {', '.join(_EXACT)})")
    config = model.config.get_text_config()
    budget = params.get("budget")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(budget, int) and not isinstance(budget, bool) and limit is not None and budget > limit:
        raise AttnZooError(f"{policy}: parameter 'budget' expected at most the model's max_position_embeddings "
                           f"({limit}), got {budget}")
    specs = layer_plan(model)
    bad = [s.describe() for s in specs if any(g.method.name not in _EXACT for g in s.groups)]
    if bad:
        raise UnsupportedError(f"make_cache: the cache policy decides what each layer reads, so the model must run "
                               f"an exact method; found {bad[0]}")
    if isinstance(policy, PlanFile):
        if params:
            raise AttnZooError(f"make_cache: parameters {sorted(params)} given next to a plan file; the plan's "
                               "groups carry their own")
        policy.check_model(model)
        per_layer = policy.cache_layers()
    else:
        per_layer = [(policy, params)] * len(specs)
    cache_layers = [AttnZooCacheLayer(p, **_read_through(spec, kw)) for spec, (p, kw) in zip(specs, per_layer)]
    heads_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for layer in cache_layers if isinstance(policy, PlanFile) else cache_layers[:1]:
        layer.kv.policy.build(heads_kv)  # per-head plans (duo, razor) are checked against the model now
    return AttnZooCache(cache_layers, model.config)


def _read_through(spec: LayerSpec, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` plus the split-K count of the layer's applied ``flash_decode`` (the rest read every key alike)."""
    splits = {g.method.splits for g in spec.groups if g.method.name == "flash_decode"}
    if len(splits) > 1:
        raise UnsupportedError(f"make_cache: {spec.describe()} applies flash_decode with different splits "
                               f"{sorted(splits)}; one cache layer reads with one split count")
    if not splits:
        return params
    applied = splits.pop()
    if params.get("splits", applied) != applied:
        raise AttnZooError(f"make_cache: splits expected {applied} (the flash_decode applied to layer {spec.layer}) "
                           f"or not given, got {params['splits']}")
    return {**params, "splits": applied}

"""The attention function and mask function attnzoo registers with transformers.

transformers calls ``attention(module, query, key, value, attention_mask, ...)``
with ``query (B, Hq, Sq, D)``, ``key/value (B, Hkv, Sk, D)`` and a mask built by
the mask function registered under the same name. This module translates that
call into attnzoo's convention (``causal`` bottom-right aligned +
``key_padding_mask``), runs the layer's :class:`~attnzoo.hf.plan.LayerSpec`, and
returns ``(B, Sq, Hq, Dv)`` as transformers expects. Soft-capping becomes a
``score_mod``, gpt-oss's ``s_aux`` the method's ``sinks``, packed sequences
(a block-diagonal mask from position ids, or flash-attention's ``cu_seq_lens_*``
kwargs) a varlen call (with an attnzoo cache: one cache row per sequence, see
:meth:`attnzoo.hf.cache.AttnZooCacheLayer.attend`). Whatever cannot be expressed (an additive bias, a per-head
mask, dropout, ...) raises :class:`~attnzoo.UnsupportedError`: nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import causal_mask_function, sdpa_mask

from .. import checks, mods, registry
from ..core.masks import causal_mask
from ..errors import AttnZooError, UnsupportedError
from .plan import HeadGroup, LayerSpec

#: the name registered with AttentionInterface and AttentionMaskInterface
ATTN_NAME = "attnzoo"
#: attribute holding a module's LayerSpec (set by apply, removed by remove)
SPEC_ATTR = "_attnzoo_spec"
#: attribute holding a list that records (q, k, v) of every call (capture_qkv)
CAPTURE_ATTR = "_attnzoo_capture"
#: attribute holding a module's :class:`~attnzoo.checks.GrowingScan` (its cached K/V scanned once per row)
SCAN_ATTR = "_attnzoo_scan"
#: attribute a KV cache layer sets on the key tensor its ``update`` returns (see attnzoo.hf.cache)
CACHE_TAG = "_attnzoo_cache_layer"
#: methods that compute exact softmax attention (the only ones a sliding window or a KV cache policy can wrap)
_EXACT = ("exact", "naive", "exact_tiled", "flash_decode")
#: attribute holding the LayerSpec a module's generation steps run (:func:`decode_spec`, set by apply)
STEP_ATTR = "_attnzoo_step_spec"
#: how generation steps run (:func:`decode_spec`): ``auto`` (the default) runs a dynamic sparse method's steps
#: densely, ``dense`` every non-exact method's, ``method`` keeps every method on every call
DECODE_MODES = ("auto", "dense", "method")
#: a call with at most this many queries against more keys is a generation step (one-token steps, short drafts)
DECODE_QUERIES = 16


# ---------------------------------------------------------------- the mask
def attnzoo_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                 allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """transformers' boolean SDPA mask, with the "plain causal, return None" shortcut kept only where
    None means the same thing under attnzoo's bottom-right causal alignment (``Sq == Sk`` or ``Sq == 1``).

    SDPA reads a None mask as top-left causal, which differs from bottom-right when
    ``1 < Sq < Sk`` (prefill into a pre-allocated cache); there the mask is materialised.
    """
    allow = allow_is_causal_skip and (q_length == kv_length or q_length == 1)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=allow, **kwargs)


@dataclass(frozen=True)
class Geometry:
    """What a transformers mask means in attnzoo's terms.

    ``len_k`` may be shorter than the keys given: trailing keys no query can see
    (the unused slots of a pre-allocated cache) are cut off.
    """

    causal: bool
    key_padding_mask: torch.Tensor | None
    len_k: int
    window: int | None = None  # a causal sliding window (keys with p(i) - window < j), when the mask has one
    #: packed documents (a block-diagonal causal mask): offsets over the batch rows laid end to end
    cu_seqlens: torch.Tensor | None = None


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """A ``(B, Sq, Sk)`` bool visibility tensor from a 4-D bool or additive float mask."""
    if mask.dim() != 4:
        raise UnsupportedError(f"attention_mask: expected a 4-D mask (B, 1, Sq, Sk) or None, got shape "
                               f"{tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        vis = mask
    elif mask.is_floating_point():
        vis = mask == 0
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((vis | blocked).all()):
            raise UnsupportedError("attention_mask: an additive float mask with values other than 0 and -inf "
                                   "(a positional bias) cannot be expressed as attnzoo's causal + key padding")
    else:
        raise UnsupportedError(f"attention_mask: expected a bool or float mask, got dtype {mask.dtype}")
    if vis.shape[1] != 1 and not bool((vis == vis[:, :1]).all()):
        raise UnsupportedError("attention_mask: a mask that differs between heads cannot be expressed as "
                               "attnzoo's causal + key padding")
    return vis[:, 0]


def mask_geometry(mask: torch.Tensor | None, *, causal: bool, len_q: int, len_k: int,
                  window: int | None) -> Geometry:
    """Translate a transformers mask into (causal, key padding, window), or raise UnsupportedError.

    ``mask=None`` means what transformers' SDPA path means by it: the module's
    causality, no padding. A tensor mask is authoritative: it is matched
    against causal and non-causal structures (with ``window`` when given), each
    restricted to the keys some query can see; the key padding mask is that set.
    """
    if mask is None:
        return Geometry(causal, None, len_k)
    if not isinstance(mask, torch.Tensor):
        raise UnsupportedError(f"attention_mask: expected a tensor or None, got {type(mask).__name__} "
                               f"(register attnzoo's mask function under {ATTN_NAME!r})")
    vis = _visible(mask)
    if tuple(vis.shape[1:]) != (len_q, len_k):
        raise UnsupportedError(f"attention_mask: expected (B, 1, {len_q}, {len_k}) for {len_q} queries and "
                               f"{len_k} keys, got {tuple(mask.shape)}")
    keep = vis.any(dim=1)  # (B, Sk): keys some query sees
    seen = keep.any(dim=0)
    n_keys = int(seen.nonzero().max()) + 1 if bool(seen.any()) else len_k
    if n_keys < len_k:  # unused slots of a pre-allocated cache
        vis, keep = vis[..., :n_keys], keep[:, :n_keys]
    dev = vis.device
    candidates = [(causal, None), (not causal, None)]
    if window is not None:  # a window that bites is tried first: it explains keys no query sees
        candidates.insert(0 if n_keys > window else 2, (True, window))
    for is_causal, win in candidates:
        structure, kept = None, keep
        if is_causal:
            structure = causal_mask(len_q, n_keys, device=dev)
            if win is not None:
                structure = structure & ~causal_mask(len_q, n_keys, q_offset=n_keys - len_q - win, device=dev)
                kept = keep | ~structure.any(dim=0)  # keys outside every window: not padding (nothing sees them)
        expected = kept[:, None, :] if structure is None else kept[:, None, :] & structure
        if torch.equal(vis, expected.expand_as(vis)):
            padding = None if bool(kept.all()) else kept
            return Geometry(is_causal, padding, n_keys, win)
    if causal and len_q == n_keys and bool(keep.all()):
        for win in (None, window) if window is not None else (None,):
            cu = _documents(vis, win)
            if cu is not None:
                return Geometry(True, None, n_keys, win, cu)
    raise UnsupportedError("attention_mask: this mask is neither causal nor non-causal attention with key padding "
                           "nor packed causal documents"
                           + (f" (nor a causal sliding window of {window})" if window is not None else "")
                           + "; attnzoo cannot express it")


def _documents(vis: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Offsets of packed documents if ``vis (B, S, S)`` is causal attention within documents (transformers'
    mask for packed position ids), each batch row's documents following the previous row's; else None."""
    B, S, _ = vis.shape
    pos = torch.arange(S, device=vis.device)
    first = vis.int().argmax(dim=-1)  # first visible key of each query
    starts = first == pos  # a document's first token sees only itself
    doc_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=-1).values  # (B, S)
    kj = pos.view(1, 1, S)
    expected = (kj <= pos.view(1, S, 1)) & (kj >= doc_start.unsqueeze(-1))
    if window is not None:
        expected = expected & (kj > pos.view(1, S, 1) - window)
    if not torch.equal(vis, expected):
        return None
    offsets = (starts.nonzero()[:, 0] * S + starts.nonzero()[:, 1]).tolist()
    return torch.tensor(offsets + [B * S], dtype=torch.int32, device=vis.device)


class _GeometryMemo:
    """Remembers the last mask's translation: every layer of one forward receives the same mask object."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._mask: torch.Tensor | None = None
        self._value: Geometry | None = None

    def __call__(self, mask, *, causal: bool, len_q: int, len_k: int, window: int | None) -> Geometry:
        if mask is None:
            return mask_geometry(None, causal=causal, len_q=len_q, len_k=len_k, window=window)
        key = (causal, len_q, len_k, window, checks._version(mask))  # None under inference_mode: identity only
        if self._mask is mask and self._key == key:
            return self._value
        value = mask_geometry(mask, causal=causal, len_q=len_q, len_k=len_k, window=window)
        self._key, self._mask, self._value = key, mask, value
        return value


_geometry = _GeometryMemo()

# transformers kwargs that change the attention computation in ways attnzoo does not express
_REFUSED = {
    "position_bias": "an additive position bias",
}


def _refuse_unsupported(module: torch.nn.Module, dropout: float, kwargs: dict[str, Any]) -> None:
    for name, what in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise UnsupportedError(f"attnzoo attention ({type(module).__name__}): {what} is not supported")
    if kwargs.get("output_attentions"):
        raise UnsupportedError("attnzoo attention: output_attentions=True is not supported (attnzoo methods do "
                               "not materialise attention weights); use attn_implementation='eager'")
    if dropout:
        raise UnsupportedError(f"attnzoo attention: attention dropout ({dropout}) is not supported; call "
                               "model.eval() or set the model's attention dropout to 0")


# ------------------------------------------------------------ the function
def layer_spec(module: torch.nn.Module) -> LayerSpec:
    spec = getattr(module, SPEC_ATTR, None)
    if spec is None:
        raise UnsupportedError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no attnzoo "
                               f"plan: use attnzoo.hf.apply(model, ...) rather than attn_implementation="
                               f"{ATTN_NAME!r} directly")
    return spec


@dataclass(frozen=True)
class Routes:
    """What a layer's call adds to plain attention: a score_mod (soft-capping, a window folded in),
    sink logits (gpt-oss's ``s_aux``), packed-sequence offsets."""

    score_mod: Any = None
    sinks: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None  # differs from cu_seqlens only with an attnzoo cache (earlier tokens)

    def call_kwargs(self, heads: torch.Tensor | None) -> dict[str, Any]:
        """Keyword arguments of a method call on query heads ``heads`` (None = all)."""
        kw: dict[str, Any] = {}
        if self.score_mod is not None:
            kw["score_mod"] = self.score_mod
        if self.sinks is not None:
            kw["sinks"] = self.sinks if heads is None else self.sinks[heads]
        if self.cu_seqlens is not None:
            kw["cu_seqlens_q"] = kw["cu_seqlens_k"] = self.cu_seqlens
        return kw


def _routes(module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any], cached: bool = False) -> Routes:
    """The soft-capping, sinks and flash-attention varlen offsets a transformers call carries (with an attnzoo
    cache (``cached``) the key offsets count each sequence's earlier tokens too)."""
    cap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        sinks = sinks.to(query.dtype if query.dtype == torch.float64 else torch.float32)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if (cu_q is None) != (cu_k is None):
        raise UnsupportedError(f"attnzoo attention ({type(module).__name__}): cu_seq_lens_q and cu_seq_lens_k must "
                               "be given together")
    if cu_q is not None and not cached and not torch.equal(cu_q.long(), cu_k.long()):
        raise UnsupportedError(f"attnzoo attention ({type(module).__name__}): packed sequences with different query "
                               "and key offsets need the keys of earlier steps: pass an attnzoo cache "
                               "(attnzoo.hf.make_cache)")
    return Routes(None if cap is None else mods.softcap(float(cap)), sinks, cu_q, cu_k)


def window_mod(window: int):
    """A causal sliding window as a score_mod (for exact methods that also carry another score_mod)."""

    def sliding_window_mod(score, b, h, q_idx, kv_idx):
        return score.masked_fill(q_idx - kv_idx >= window, -math.inf)

    return sliding_window_mod


def run_spec(spec: LayerSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
             scale: float | None, key_padding_mask: torch.Tensor | None,
             overrides: dict[str, Any], routes: Routes = Routes()) -> torch.Tensor:
    """Run a layer's head groups; returns ``(B, Hq, Sq, Dv)``.

    Packed sequences over a batch of several rows run as one packed row (the rows laid end to end).
    """
    B = query.shape[0]
    if routes.cu_seqlens is not None and B > 1:
        flat = [t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[3]) for t in (query, key, value)]
        out = run_spec(spec, *flat, causal=causal, scale=scale, key_padding_mask=None, overrides=overrides,
                       routes=routes)
        return out.reshape(out.shape[1], B, -1, out.shape[3]).transpose(0, 1)
    groups = [g.with_overrides(overrides) for g in spec.groups] if overrides else spec.groups
    if len(groups) == 1 and groups[0].heads is None:
        return groups[0].method(query, key, value, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                **routes.call_kwargs(None))
    heads_q, heads_kv = query.shape[1], key.shape[1]
    if heads_q != spec.num_heads:
        raise AttnZooError(f"layer {spec.layer}: the per-head plan has {spec.num_heads} heads, the model's "
                           f"query has {heads_q}")
    per_kv = heads_q // heads_kv
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    peaks = checks.vouched_peak(key), checks.vouched_peak(value)  # the whole K/V's bound their head subsets'
    for g in groups:
        idx = torch.tensor(g.heads, device=query.device)
        q_sel, kv_sel = _head_operands(g.heads, per_kv, query.device)
        k_g, v_g = _take_heads(key, kv_sel), _take_heads(value, kv_sel)
        with checks.vouched((k_g, peaks[0]), (v_g, peaks[1])):
            res = g.method(_take_heads(query, q_sel), k_g, v_g, causal=causal, scale=scale,
                           key_padding_mask=key_padding_mask, **routes.call_kwargs(idx))
        if isinstance(q_sel, slice):
            out[:, q_sel] = res
        else:
            out.index_copy_(1, q_sel, res)
    return out


def _head_operands(heads: tuple[int, ...], per_kv: int, device) -> tuple[slice | torch.Tensor, slice | torch.Tensor]:
    """The query heads of a head group and the KV heads its call reads, each a slice where they are contiguous
    (views: nothing copied) or an index tensor. Each KV head appears once when every KV head the group touches
    serves as many of its query heads (grouped-query attention in the call); otherwise each query head gets its
    own copy of its KV head (plain multi-head attention)."""
    kv = [h // per_kv for h in heads]
    counts = {j: kv.count(j) for j in kv}
    if len(set(counts.values())) == 1 and kv == sorted(kv):
        kv = sorted(counts)
    return _as_slice(list(heads), device), _as_slice(kv, device)


def _as_slice(index: list[int], device) -> slice | torch.Tensor:
    if index == list(range(index[0], index[0] + len(index))):
        return slice(index[0], index[0] + len(index))
    return torch.tensor(index, device=device)


def _take_heads(t: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    """Heads ``sel`` of ``t (B, H, N, D)``: a view for a slice, else one gathered copy."""
    return t[:, sel] if isinstance(sel, slice) else t.index_select(1, sel)


def attnzoo_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The function registered with ``transformers.AttentionInterface`` under :data:`ATTN_NAME`."""
    spec = layer_spec(module)
    _refuse_unsupported(module, dropout, kwargs)
    cache_layer = getattr(key, CACHE_TAG, None)
    routes = _routes(module, query, kwargs, cached=cache_layer is not None)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    record = getattr(module, CAPTURE_ATTR, None)
    if record is not None:
        record.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
    if cache_layer is not None:
        out = cache_layer.attend(spec, query, attention_mask, causal=causal, scale=scaling,
                                 sliding_window=sliding_window, score_mod=routes.score_mod, sinks=routes.sinks,
                                 cu_seqlens=None if routes.cu_seqlens is None else (routes.cu_seqlens,
                                                                                    routes.cu_seqlens_k))
        return out.transpose(1, 2), None
    names = spec.param_names if kwargs else ()
    overrides = {k: v for k, v in kwargs.items() if k in names}  # the plan's own parameters only
    if routes.cu_seqlens is not None:  # flash-attention varlen kwargs: one packed row, its offsets given
        if query.shape[0] != 1:
            raise UnsupportedError(f"cu_seq_lens_q: packed sequences expected a batch of 1, got {query.shape[0]}")
        geo = Geometry(causal, None, key.shape[2])
        if sliding_window is not None and sliding_window < key.shape[2]:
            geo = Geometry(causal, None, key.shape[2], sliding_window)
    else:
        geo = _geometry(attention_mask, causal=causal, len_q=query.shape[2], len_k=key.shape[2],
                        window=sliding_window)
        if geo.cu_seqlens is not None:
            routes = dataclasses.replace(routes, cu_seqlens=geo.cu_seqlens)
    if geo.len_k < key.shape[2]:
        key, value = key[:, :, :geo.len_k], value[:, :, :geo.len_k]
    if query.shape[2] <= DECODE_QUERIES and query.shape[2] < geo.len_k:  # a generation step
        spec = module.__dict__.get(STEP_ATTR, spec)
    peaks = (None, None)
    if routes.cu_seqlens is None:  # a decode step scans only the keys and values it appended
        peaks = _scan(module).peaks(key, value, new=query.shape[2])
    if geo.window is not None:
        if routes.score_mod is None:
            spec = windowed(spec, geo.window)
        else:  # an exact method carries both: the window joins the score_mod
            exact_only(spec, f"the model's sliding window ({geo.window}) together with soft-capping")
            routes = dataclasses.replace(routes, score_mod=mods.compose(routes.score_mod, window_mod(geo.window)))
    with checks.vouched((key, peaks[0]), (value, peaks[1])):
        out = run_spec(spec, query, key, value, causal=geo.causal, scale=scaling,
                       key_padding_mask=geo.key_padding_mask, overrides=overrides, routes=routes)
    return out.transpose(1, 2), None


def check_decode(decode: Any) -> str:
    """``decode`` if it is one of :data:`DECODE_MODES`, else AttnZooError naming it."""
    if decode not in DECODE_MODES:
        raise AttnZooError(f"decode: expected one of {', '.join(map(repr, DECODE_MODES))}, got {decode!r}")
    return decode


def routed_densely(method: registry.Method, decode: str) -> bool:
    """Whether a generation step of ``method`` runs as exact attention under routing ``decode``.

    ``auto``: a dynamic sparse method (block_topk, vertical_slash, hip, ...) estimates its key set from
    every key on each call, so for a handful of queries the estimate alone reads as many bytes as exact
    attention and sparsity cannot pay: its steps run densely, as sparse-prefill systems (MInference) decode.
    Methods whose key set is fixed by positions (windows, static sparse) or that compute another function
    (linear, low-rank, hashing) keep their semantics on every call. ``dense``: every non-exact method's
    steps run exactly; ``method``: none."""
    if decode == "method" or method.name in _EXACT:
        return False
    return decode == "dense" or method.family == registry.Family.DYNAMIC_SPARSE


def decode_spec(spec: LayerSpec, decode: str) -> LayerSpec:
    """The plan a generation step of layer ``spec`` runs: each group :func:`routed_densely` becomes ``exact``
    (its heads, sinks and score_mod kept), the others stay as they are; groups running the same method then run
    as one group (one call; all heads exact: one call over the whole layer, as without a plan)."""
    groups = [HeadGroup(registry.get("exact"), g.heads) if routed_densely(g.method, decode) else g
              for g in spec.groups]
    merged: list[HeadGroup] = []
    for g in groups:
        same = next((i for i, m in enumerate(merged) if m.method == g.method), None)
        if same is None:
            merged.append(g)
        else:
            merged[same] = HeadGroup(g.method, tuple(sorted(merged[same].heads + g.heads)))
    if len(merged) == 1:
        merged = [HeadGroup(merged[0].method)]
    return spec if tuple(merged) == spec.groups else LayerSpec(spec.layer, tuple(merged), spec.num_heads)


def _scan(module: torch.nn.Module) -> checks.GrowingScan:
    """The module's running NaN/inf scan of the K/V it receives: transformers' own caches hand attention the
    whole cache at every step, and scanning it all again per layer per step costs as much as the attention."""
    scan = module.__dict__.get(SCAN_ATTR)
    if scan is None:
        scan = module.__dict__[SCAN_ATTR] = checks.GrowingScan()
    return scan


def exact_only(spec: LayerSpec, what: str) -> None:
    """Refuse a plan with a non-exact method where only exact attention can honour ``what``."""
    bad = [g.method.name for g in spec.groups if g.method.name not in _EXACT]
    if bad:
        raise UnsupportedError(f"layer {spec.layer}: {what} needs an exact method; method {bad[0]!r} cannot be "
                               "combined with it")


def windowed(spec: LayerSpec, window: int) -> LayerSpec:
    """The layer's plan on a sliding-window layer whose window bites: exact methods become the registered
    ``sliding_window`` method (the same keys); any other method cannot honour the window and is refused."""
    exact_only(spec, f"the model's sliding window ({window}), shorter than the context,")
    if "sliding_window" not in registry.methods():
        raise UnsupportedError(f"layer {spec.layer}: the model's sliding window ({window}) is shorter than the "
                               "context and no 'sliding_window' method is registered to honour it")
    method = registry.get("sliding_window", window=window)
    return LayerSpec(spec.layer, tuple(HeadGroup(method, g.heads) for g in spec.groups), spec.num_heads)

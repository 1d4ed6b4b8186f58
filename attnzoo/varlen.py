"""Packed variable-length batches (FlashAttention's varlen convention) and padding-free packing.

``attnzoo.attention(q, k, v, method=..., cu_seqlens_q=cq, cu_seqlens_k=ck)``: q is ``(1, Hq, total_q, D)``,
k and v ``(1, Hkv, total_k, D)``, ``cq``/``ck`` integer ``(num_seqs + 1,)`` offsets starting at 0; sequence
``i``'s queries ``cq[i]:cq[i+1]`` attend only its keys ``ck[i]:ck[i+1]`` (causal bottom-right aligned
within each sequence, so a sequence with fewer queries than keys is a decode / chunked-prefill step).

Each sequence runs as its own call of the method on its slice of the packed tensors: nothing is
padded, no ``total × total`` mask exists, a static sparse method builds (and caches) the layout of each
document length, and a linear method's recurrent state starts afresh at every boundary. The cost is
``Σ_i Nq_i·Nk_i`` instead of the padded batch's ``B·max Nq·max Nk``. On the Triton backend, ``exact`` and
``exact_tiled`` run every sequence in one kernel launch instead, layout-only sparse methods one launch per
layout over every sequence's own layouts (:func:`attnzoo.backends.packed`).

:func:`pack` / :func:`unpack` move between a padded batch with an attention mask and the packed form
(ByteTransformer's padding-free path): pack once, run every layer on the packed tokens, unpack at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import AttnZooError, UnsupportedError

if TYPE_CHECKING:
    from .registry import Method


def check_cu_seqlens(cu: object, name: str, total: int, device) -> list[int]:
    """Validate FlashAttention-style offsets and return them as a Python list."""
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64):
        raise AttnZooError(f"{name}: expected an int32 tensor (num_seqs + 1,) of offsets, got "
                           f"{cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise AttnZooError(f"{name}: expected a 1-D tensor (num_seqs + 1,) with at least 2 offsets, got shape "
                           f"{tuple(cu.shape)}")
    if cu.device != device:
        raise AttnZooError(f"{name}: expected device {device} (the device of q), got {cu.device}")
    offsets = cu.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise AttnZooError(f"{name}: expected non-decreasing offsets starting at 0, got {offsets[:8]}"
                           f"{' ...' if len(offsets) > 8 else ''}")
    if offsets[-1] != total:
        raise AttnZooError(f"{name}: expected the last offset to be the packed length {total}, got {offsets[-1]}")
    return offsets


def _check_max(value: object, name: str, lengths: list[int]) -> None:
    if value is None:
        return
    longest = max(lengths, default=0)
    if isinstance(value, bool) or not isinstance(value, int) or value < longest:
        raise AttnZooError(f"{name}: expected None or an int >= the longest sequence ({longest}), got {value!r}")


def run_varlen(method: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens_q, cu_seqlens_k,
               max_seqlen_q, max_seqlen_k, key_padding_mask, return_lse: bool, inputs: dict[str, Any],
               **call: Any):
    """``method`` on every packed sequence in turn; returns ``out`` or ``(out, lse)`` over the packed queries.

    ``call`` holds the per-call options (causal, scale, score_mod, sinks) given to each sequence's call.
    """
    if not method.supports.varlen:
        raise UnsupportedError(f"method {method.name!r} does not support packed sequences (cu_seqlens_q / "
                               "cu_seqlens_k)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttnZooError(f"{name}: expected a packed (1, H, total, D) tensor with cu_seqlens, got {got}")
    if cu_seqlens_q is None or cu_seqlens_k is None:
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise AttnZooError(f"{missing}: expected an int32 tensor of offsets next to the other one, got None")
    if key_padding_mask is not None:
        raise AttnZooError("key_padding_mask: expected None with cu_seqlens (packed sequences have no padding), "
                           "got a tensor")
    cq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[2], q.device)
    ck = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[2], q.device)
    if len(cq) != len(ck):
        raise AttnZooError(f"cu_seqlens_k: expected {len(cq)} offsets (as many sequences as cu_seqlens_q), "
                           f"got {len(ck)}")
    _check_max(max_seqlen_q, "max_seqlen_q", [b - a for a, b in zip(cq, cq[1:])])
    _check_max(max_seqlen_k, "max_seqlen_k", [b - a for a, b in zip(ck, ck[1:])])
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and (t.dim() < 3 or t.shape[2] != k.shape[2]):
            raise UnsupportedError(f"{method.name}: input {name!r} must have the packed key length {k.shape[2]} "
                                   f"at dim 2 to be cut per sequence, got shape {tuple(t.shape)}")
    call = _lowered(method, call, q, cq, ck)
    from .backends import packed
    one = packed(method, q, k, v, cq, ck, inputs=inputs, return_lse=return_lse, **call)
    if one is not None:  # every sequence in one kernel launch
        return one
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
        if q1 == q0:
            continue
        per_seq = {n: t[:, :, k0:k1] if isinstance(t, torch.Tensor) else t for n, t in inputs.items()}
        ks, vs = method.sequence_kv(k, v, k0, k1)
        res = method(q[:, :, q0:q1], ks, vs, return_lse=return_lse, **call, **per_seq)
        outs.append(res[0] if return_lse else res)
        if return_lse:
            lses.append(res[1])
    if not outs:  # no queries at all
        res = method(q, k[:, :, :0], v[:, :, :0], return_lse=return_lse, **call)
        return res
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def _lowered(method: Method, call: dict[str, Any], q: torch.Tensor, cq: list[int], ck: list[int]) -> dict[str, Any]:
    """``call`` with a user score_mod as the built-in mods it computes (:mod:`attnzoo.core.lowering`), checked
    once at the longest sequences' lengths, whose distances cover every sequence's: the one-launch kernels then
    take it (as a distance table, :func:`attnzoo.backends.kernel_mod`) and each per-sequence call gets built-ins
    (no check of its own). ``backend="flex"``: FlexAttention calls the function itself (as ``Method.__call__``)."""
    from .checks import resolve_scale
    from .core.lowering import lower
    from .core.scoremod import check_score_mod
    fn = call.get("score_mod")
    longest = [max(b - a for a, b in zip(c, c[1:])) for c in (cq, ck)]
    if fn is None or not method.supports.score_mod or call.get("backend") == "flex" or 0 in longest:
        return call  # (a method without score_mod refuses it in each sequence's call)
    check_score_mod(fn)
    mod, factor, _ = lower(fn, batch=1, heads_q=q.shape[1], len_q=longest[0], len_k=longest[1], dtype=q.dtype,
                           device=q.device)
    scale = call.get("scale") if factor == 1 else resolve_scale(call.get("scale"), q.shape[-1]) * factor
    return {**call, "score_mod": mod, "scale": scale}


# ------------------------------------------------------------ pack / unpack
def _seq_dim(x: torch.Tensor) -> int:
    return 2 if x.dim() == 4 else 1


def _check_attention_mask(x: object, mask: object, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3, 4):
        raise AttnZooError(f"{where}: expected a tensor (B, H, N, D), (B, N, C) or (B, N), got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise AttnZooError(f"{where}: attention_mask expected a (B, N) tensor (True / 1 = real token), got "
                           f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise AttnZooError(f"{where}: attention_mask expected bool or 0/1 values, got dtype {mask.dtype}")
        mask = mask.bool()
    return mask


def pack(x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding of a batch: ``x`` ``(B, H, N, D)`` (or ``(B, N, C)``, ``(B, N)``) and a ``(B, N)``
    mask (True / 1 = real token, any padding side) -> ``(packed (1, H, total, D), cu_seqlens int32 (B+1,))``."""
    mask = _check_attention_mask(x, attention_mask, "pack")
    dim = _seq_dim(x)
    if (x.shape[0], x.shape[dim]) != tuple(mask.shape):
        raise AttnZooError(f"pack: attention_mask expected shape ({x.shape[0]}, {x.shape[dim]}) = (B, N) of x, "
                           f"got {tuple(mask.shape)}")
    index = mask.reshape(-1).nonzero().squeeze(1)
    lengths = mask.sum(dim=1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    if x.dim() == 4:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3])  # (H, B·N, D)
        return flat.index_select(1, index).unsqueeze(0), cu
    flat = x.reshape(-1, *x.shape[2:])  # (B·N, ...)
    return flat.index_select(0, index).unsqueeze(0), cu


def unpack(packed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack`: tokens back to their padded places, zeros at the padding."""
    mask = _check_attention_mask(packed, attention_mask, "unpack")
    dim = _seq_dim(packed)
    B, N = mask.shape
    total = int(mask.sum())
    if packed.shape[0] != 1 or packed.shape[dim] != total:
        raise AttnZooError(f"unpack: expected a packed tensor with batch 1 and {total} tokens (the mask's real "
                           f"tokens) at dim {dim}, got shape {tuple(packed.shape)}")
    index = mask.reshape(-1).nonzero().squeeze(1)
    if packed.dim() == 4:
        H, D = packed.shape[1], packed.shape[3]
        flat = packed.new_zeros(H, B * N, D).index_copy(1, index, packed[0])
        return flat.view(H, B, N, D).transpose(0, 1)
    flat = packed.new_zeros(B * N, *packed.shape[2:]).index_copy(0, index, packed[0])
    return flat.view(B, N, *packed.shape[2:])

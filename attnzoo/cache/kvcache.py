"""``KVCache``: one layer's decoding cache driven by a pluggable policy (docs/methods.md, KV-cache policies)."""

from __future__ import annotations

import math
from typing import Any

import torch

import attnzoo.checks as checks  # the live CHECK_FINITE switch
from ..checks import check_finite, check_flag, check_padding_mask, check_tensor, resolve_scale, vouched_peak
from ..core.exact import tiled_attention
from ..core.lowering import lower
from ..core.partial import Partial
from ..core.scoremod import check_score_mod, check_sinks, with_sinks
from ..errors import AttnZooError, UnsupportedError
from .layer import Layer
from .policy import Policy, Step, make_policy


class KVCache:
    """One layer's KV cache: ``append`` new keys/values, ``attend`` their queries, read ``nbytes``.

    >>> cache = KVCache("streaming", sinks=4, window=512)
    >>> cache.append(k, v)                 # (B, Hkv, n, D), (B, Hkv, n, Dv); positions continue
    >>> out = cache.attend(q)              # (B, Hq, nq, Dv) for the newest nq tokens (nq <= n)

    * ``policy``: a registered name (see :func:`attnzoo.cache.policies`) or a configured policy;
      ``**params`` are its parameters, validated like method parameters.
    * ``splits``, ``split_size``: a read over ``n`` keys uses ``min(splits, n // split_size)`` key
      ranges (split-K, ``flash_decode``) merged by lse; on CPU only single-query (decode) reads split.
    * ``append(k, v, key_mask=None)``: ``key_mask (B, n)`` bool, False marks padding tokens that
      nothing may attend to (left padding of a batch); they still take a position.
    * ``attend(q, causal=True, scale=None, return_lse=False, sinks=None)``: the queries of the newest ``nq``
      tokens (their k/v already appended); query ``i`` sits at position ``seq_length - nq + i``.
      ``return_lse=True`` also returns the fp32 log-sum-exp over the keys actually read, so
      ``exp(lse - lse_full)`` is the attention mass a policy recalled.
    * Eviction runs at the end of each ``attend``: between calls an evicting policy holds at most
      its capacity; during one call it also holds the tokens just appended.
    * ``seq_length``: tokens appended so far (the logical length, also after eviction);
      ``held``: slots held per KV head (heads differ under ``razor``/``duo``);
      ``positions(head)``: ``(B, n)`` positions of the tokens a KV head holds;
      ``nbytes``: bytes of every token the cache holds, metadata included (``allocated_nbytes`` adds
      the spare capacity of geometric growth, at most a quarter of the held tokens).
    * ``reset()``, ``crop(length)`` (forget positions ``>= length``; negative counts from the end),
      ``reorder(beam_idx)`` (beam search).
    """

    def __init__(self, policy: Any = "full", *, splits: int = 8, split_size: int = 2048, **params: Any) -> None:
        for arg, val in (("splits", splits), ("split_size", split_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise AttnZooError(f"KVCache: {arg} expected a positive int, got {val!r}")
        self.policy = make_policy(policy, **params)
        self.splits, self.split_size = splits, split_size
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the cache (keeps the policy and its parameters)."""
        self._layer = None
        self._shape: tuple | None = None  # (B, Hkv, D, Dv, dtype, device)
        self._seq = 0
        self.policy.reset()

    @property
    def seq_length(self) -> int:
        return self._seq

    @property
    def nbytes(self) -> int:
        return 0 if self._layer is None else self._layer.nbytes

    @property
    def allocated_nbytes(self) -> int:
        """Bytes as allocated: :attr:`nbytes` plus spare growth capacity (at most a quarter of the held slots;
        layers without a separate count, e.g. packed per-head regions, count their slack in ``nbytes``)."""
        if self._layer is None:
            return 0
        return getattr(self._layer, "allocated_nbytes", self._layer.nbytes)

    @property
    def held(self) -> list[int]:
        return [] if self._layer is None else self._layer.held(self._shape[1])

    def positions(self, head: int) -> torch.Tensor:
        """``(B, n)`` absolute positions of the tokens KV head ``head`` holds (sorted)."""
        if self._layer is None or not 0 <= head < self._shape[1]:
            raise AttnZooError(f"positions: head expected 0..{self._shape[1] - 1 if self._shape else -1}, got {head}")
        return self._layer.positions(head)

    # ------------------------------------------------------------------ writes
    def append(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> None:
        """Add ``n`` tokens: ``k (B, Hkv, n, D)``, ``v (B, Hkv, n, Dv)`` at positions ``seq_length + i``."""
        check_tensor("k", k, 4, "(B, Hkv, n, D)")
        check_tensor("v", v, 4, "(B, Hkv, n, Dv)")
        if self._append_rows(k, v, key_mask):
            return
        check_finite("k", k)
        check_finite("v", v)
        if v.shape[:3] != k.shape[:3] or v.dtype != k.dtype or v.device != k.device:
            raise AttnZooError(f"v: expected shape {tuple(k.shape[:3])} + (Dv,) with k's dtype and device, "
                               f"got {tuple(v.shape)} {v.dtype} {v.device}")
        B, Hkv, n, D = k.shape
        if 0 in (B, Hkv, D, v.shape[3]):
            raise AttnZooError(f"k/v: expected B, Hkv, D and Dv >= 1, got k {tuple(k.shape)} and v {tuple(v.shape)}")
        shape = (B, Hkv, D, v.shape[3], k.dtype, k.device)
        if self._shape is not None and shape != self._shape:
            raise AttnZooError(f"append: expected (B, Hkv, D, Dv, dtype, device) = {self._shape} like the "
                               f"tokens already held, got {shape}")
        if key_mask is not None:
            check_padding_mask(key_mask, B, n, k.device)
        if n == 0:
            return
        if self._layer is None:
            self._layer = self.policy.build(Hkv)
            self._shape = shape
        positions = torch.arange(self._seq, self._seq + n, device=k.device)
        self._layer.append(k, v, positions, key_mask)
        self._seq += n

    def _append_rows(self, k: torch.Tensor, v: torch.Tensor, key_mask) -> bool:
        """A decode step's append (no padding, the shapes held already) in one call of the store's
        :meth:`~attnzoo.cache.store.Store.append_rows`, its finiteness check included; False where it does not
        apply (then :meth:`append` runs its checks and the general path)."""
        store = getattr(self._layer, "store", None)
        if (store is None or key_mask is not None or type(self._layer).append is not Layer.append
                or (k.shape[0], k.shape[1], k.shape[3], v.shape[3], k.dtype, k.device) != self._shape
                or v.shape[:3] != k.shape[:3] or k.shape[2] == 0):
            return False
        known = vouched_peak(k), vouched_peak(v)
        peaks = store.append_rows(k, v, self._seq, check=checks.CHECK_FINITE and None in known)
        if peaks is None:
            return False
        for name, peak in zip("kv", peaks):
            if not math.isfinite(peak):
                raise AttnZooError(f"{name}: contains NaN or inf values; attention inputs must be finite")
        self._seq += k.shape[2]
        return True

    def crop(self, length: int) -> None:
        """Forget every token at position ``>= length`` (``length < 0``: drop ``-length`` tokens)."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise AttnZooError(f"crop: length expected an int, got {length!r}")
        target = self._seq + length if length < 0 else length
        if not 0 <= target <= self._seq:
            raise AttnZooError(f"crop: length expected -{self._seq}..{self._seq}, got {length}")
        if target < self._seq and self._layer is not None:
            self._layer.crop(target)
        self._seq = target

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch rows (beam search): row ``i`` becomes old row ``beam_idx[i]``."""
        if self._layer is None:
            return
        B = self._shape[0]
        if not isinstance(beam_idx, torch.Tensor) or beam_idx.dim() != 1 or beam_idx.numel() != B \
                or beam_idx.dtype.is_floating_point or beam_idx.dtype.is_complex or beam_idx.dtype == torch.bool \
                or not (0 <= int(beam_idx.min()) and int(beam_idx.max()) < B):
            raise AttnZooError(f"reorder: beam_idx expected a 1-D integer tensor of {B} rows (the batch size), each "
                               f"in 0..{B - 1}, got {beam_idx!r}")
        self._layer.reorder(beam_idx.to(self._shape[5]).long())

    # ------------------------------------------------------------------ reads
    def attend(self, q: torch.Tensor, causal: bool = True, scale: float | None = None,
               return_lse: bool = False, sinks: torch.Tensor | None = None, score_mod=None):
        """Attend the queries of the newest ``nq`` tokens: ``q (B, Hq, nq, D)`` -> ``(B, Hq, nq, Dv)``.

        ``sinks (Hq,)``: learnable sink logits merged into the read; ``score_mod``: see :mod:`attnzoo.mods`
        (only policies that read every held token, e.g. ``full`` and ``quantized``, take one).
        """
        check_tensor("q", q, 4, "(B, Hq, nq, D)")
        check_finite("q", q)
        if self._layer is None:
            raise AttnZooError("attend: the cache is empty; append the tokens' k/v before attending their queries")
        B, Hkv, D, Dv, dtype, device = self._shape
        Bq, Hq, nq, Dq = q.shape
        if Bq != B or Dq != D or Hq % Hkv or q.dtype != dtype or q.device != device:
            raise AttnZooError(f"q: expected (B={B}, Hq multiple of Hkv={Hkv}, nq, D={D}) {dtype} on {device}, "
                               f"got {tuple(q.shape)} {q.dtype} on {q.device}")
        if not 1 <= nq <= self._seq:
            raise AttnZooError(f"q: expected 1..{self._seq} queries (the newest tokens), got nq={nq}")
        check_flag("causal", causal)
        check_flag("return_lse", return_lse)
        if Hq == 0:  # no query heads: the empty result
            out = q.new_zeros(B, 0, nq, Dv)
            return (out, q.new_zeros(B, 0, nq, dtype=torch.float32)) if return_lse else out
        step = Step(resolve_scale(scale, D), causal, nq, self._seq, self.splits, self.split_size, device)
        if sinks is not None:
            check_sinks(sinks, Hq, device)
        if score_mod is not None:
            check_score_mod(score_mod)
        with torch.no_grad():
            part = self._layer.attend(q, step) if score_mod is None else self._read_all(q, step, score_mod)
            if sinks is not None:
                part = with_sinks(part.out, part.lse, sinks)
        out = part.out if part.out.dtype == dtype else part.out.to(dtype)
        return (out, part.lse.float()) if return_lse else out

    @property
    def reads_all(self) -> bool:
        """Whether the policy reads every token it holds (so a read may take a score_mod)."""
        return type(self.policy).read is Policy.read and type(self.policy).build is Policy.build

    def _read_all(self, q: torch.Tensor, step: Step, score_mod) -> Partial:
        """A read with a score_mod: exact attention over every held token (whose slots are its positions)."""
        layer = self._layer
        if not self.reads_all:
            raise UnsupportedError(f"KVCache: policy {self.policy.name!r} chooses which tokens it reads; a score_mod "
                                   "needs a policy that reads every held token (full, quantized)")
        store = layer.store
        pad = None if store.valid is None else store.valid[:, 0]
        keys = store.keys().float()
        # a user function as the built-in mods it computes (core.lowering): the engine's fused paths run those
        score_mod, factor, _ = lower(score_mod, batch=q.shape[0], heads_q=q.shape[1], len_q=q.shape[2],
                                     len_k=keys.shape[2], dtype=torch.float32, device=q.device)
        out, lse = tiled_attention(q.float(), keys, store.values().float(), scale=step.scale * factor,
                                   causal=step.causal, key_padding_mask=pad, score_mod=score_mod)
        layer.policy.update(store, q, step)
        return Partial(out, lse)

    def __repr__(self) -> str:
        return f"KVCache({self.policy!r}, seq_length={self._seq}, held={self.held}, nbytes={self.nbytes})"

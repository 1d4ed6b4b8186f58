"""Kernelised and linear-RNN attention on the chunked recurrence engine (docs/methods.md).

``linear`` (elu+1), ``performer`` (FAVOR+), ``lightning`` (per-head decay) and
``gla`` (per-token, per-channel gates) differ only in their feature map and
their decay; the recurrence lives in :mod:`attnzoo.core.linear`.

Decoding with a state: every method here (and ``based``) has
``m.run(q, k, v, state=None, **inputs) -> (out, state)``, always causal, which
continues from ``state`` (a :class:`~attnzoo.core.linear.LinearState` or the
method's own state) and returns the state after the new keys. Prefill with
``run`` on the prompt, then call ``run`` with one token at a time: the outputs
equal one causal call over the whole sequence. The plain call
``m(q, k, v, causal=True)`` with ``Nq < Nk`` also decodes, by recomputing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..checks import Problem, check_qkv
from ..core.features import elu_plus_one, favor_positive, orthogonal_gaussian
from ..core.linear import check_log_gate, linear_attention
from ..errors import AttnZooError
from ..registry import MAX_SIZE, Family, Method, Supports, param, register

_CAUSAL_AND_NOT = Supports(causal=True, noncausal=True, decode=True, grad=True, lse=False, varlen=True)
_CAUSAL_ONLY = Supports(causal=True, noncausal=False, decode=True, grad=True, lse=False, varlen=True)


@dataclass(frozen=True)
class RecurrentMethod(Method):
    """A method with an explicit recurrent state: adds :meth:`run`.

    Subclasses implement :meth:`attend`, which both ``forward`` and ``run`` use.
    """

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any = None, *,
            scale: float | None = None, key_padding_mask: torch.Tensor | None = None, **inputs: Any):
        """Causal attention of the new ``q, k, v`` continuing from ``state``; returns ``(out, new_state)``.

        The new queries sit at the last Nq of the new key positions (bottom-right).
        The state is kept in the compute dtype (float32 for half inputs).
        """
        prob = check_qkv(q, k, v, key_padding_mask, scale)
        self.check_capabilities(prob, causal=True, key_padding_mask=key_padding_mask, return_lse=False,
                                grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            raise AttnZooError(f"{self.name}.run: unknown input(s) {unknown}; this method's extra inputs: "
                               f"{', '.join(self.inputs) or 'none'}")
        if prob.len_q == 0 or prob.len_k == 0:
            raise AttnZooError(f"{self.name}.run: expected at least one query and one key, got Nq={prob.len_q}, "
                               f"Nk={prob.len_k}")
        dtype = q.dtype
        if self.upcast_half and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
            inputs = {n: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                      for n, t in inputs.items()}
        out, new_state = self.attend(q, k, v, prob, causal=True, key_padding_mask=key_padding_mask, state=state,
                                     **inputs)
        return out.to(dtype), new_state

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse, **inputs):
        out, _ = self.attend(q, k, v, prob, causal=causal, key_padding_mask=key_padding_mask, state=None, **inputs)
        return out, None

    def attend(self, q, k, v, prob: Problem, *, causal: bool, key_padding_mask, state, **inputs):
        """``(out, final state)`` on validated inputs."""
        raise NotImplementedError


def engine_form(len_k: int) -> str:
    """One key (a decode step) needs no chunk machinery."""
    return "recurrent" if len_k == 1 else "chunked"


@register
@dataclass(frozen=True)
class Linear(RecurrentMethod):
    """Linear attention with φ = elu+1 on the unscaled q and k (Katharopoulos et al.), normalised.

    ``out_i = φ(q_i)·Σ_j φ(k_j)ᵀv_j / (φ(q_i)·Σ_j φ(k_j) + eps)`` over visible j;
    ``scale`` is not used. State: :class:`LinearState` with ``z``.
    """

    name: ClassVar[str] = "linear"
    exact_for: ClassVar[str] = "never: φ = elu+1 is a different kernel from softmax"
    family: ClassVar[Family] = Family.KERNELISED
    complexity: ClassVar[str] = "O(N·D²)"
    supports: ClassVar[Supports] = _CAUSAL_AND_NOT
    papers: ClassVar[tuple[str, ...]] = ("Transformers are RNNs (Katharopoulos et al.)",)

    eps: float = param(1e-6, min=0.0, help="added to the normaliser")
    chunk: int = param(64, min=1, clamp=True, help="chunk length of the chunked causal form")

    def attend(self, q, k, v, prob, *, causal, key_padding_mask, state):
        return linear_attention(elu_plus_one(q), elu_plus_one(k), v, causal=causal, normalize=True, eps=self.eps,
                                chunk=self.chunk, form=engine_form(prob.len_k), state=state,
                                key_padding_mask=key_padding_mask)


@register
@dataclass(frozen=True)
class Performer(RecurrentMethod):
    """FAVOR+ (Performer): positive orthogonal random features with
    ``E[φ(q)·φ(k)] = exp(scale·q·k)``, normalised; an unbiased softmax estimate
    whose error shrinks as ``features`` grows. Causal via the prefix-sum state.

    ``redraw=True`` draws new features from torch's global generator at every call
    (training); ``run`` with a state needs ``redraw=False`` (the state is tied to one draw).
    """

    name: ClassVar[str] = "performer"
    exact_for: ClassVar[str] = "never: an unbiased estimate of softmax whose error shrinks as features grows"
    family: ClassVar[Family] = Family.KERNELISED
    complexity: ClassVar[str] = "O(N·m·D)"
    supports: ClassVar[Supports] = _CAUSAL_AND_NOT
    papers: ClassVar[tuple[str, ...]] = ("Rethinking Attention with Performers",)

    features: int = param(256, min=1, max=MAX_SIZE, help="number of random features m")
    seed: int = param(0, help="seed of the random features (ignored when redraw=True)")
    redraw: bool = param(False, help="draw fresh features at every call")
    chunk: int = param(64, min=1, clamp=True, help="chunk length of the chunked causal form")

    def feature_maps(self, q, k, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(φ(q) stabilised per row, its log shift, φ(k))`` for ``exp(scale·q·k)``."""
        omega = orthogonal_gaussian(self.features, q.shape[-1], seed=None if self.redraw else self.seed,
                                    dtype=q.dtype, device=q.device)
        root = math.sqrt(scale)
        phi_q, shift = favor_positive(q * root, omega, stabilise=True)
        phi_k, _ = favor_positive(k * root, omega, stabilise=False)
        return phi_q, shift, phi_k

    def attend(self, q, k, v, prob, *, causal, key_padding_mask, state):
        if state is not None and self.redraw:
            raise AttnZooError("performer: state= needs redraw=False (a state is tied to one feature draw)")
        phi_q, _, phi_k = self.feature_maps(q, k, prob.scale)
        return linear_attention(phi_q, phi_k, v, causal=causal, normalize=True, chunk=self.chunk,
                                form=engine_form(prob.len_k), state=state, key_padding_mask=key_padding_mask)


def retnet_decay(heads: int) -> torch.Tensor:
    """RetNet's per-head decay ``λ_h = 1 - 2^(-5-h)``."""
    return 1 - torch.pow(2.0, -5.0 - torch.arange(heads, dtype=torch.float64))


@register
@dataclass(frozen=True)
class Lightning(RecurrentMethod):
    """Lightning Attention / TransNormer / RetNet decay: ``S_t = λ_h S_{t-1} + k_tᵀv_t``,
    ``o_t = (scale·q_t) S_t``, no normaliser; chunked intra-block masked matmul plus
    inter-block state (Lightning-2). ``decay``: a float, a ``(Hq,)`` tensor, or None
    for RetNet's ``1 - 2^(-5-h)``. Causal only. State: :class:`LinearState`.
    """

    name: ClassVar[str] = "lightning"
    exact_for: ClassVar[str] = "never: decayed linear attention is its own model, not a softmax approximation"
    family: ClassVar[Family] = Family.LINEAR_RNN
    complexity: ClassVar[str] = "O(N·C·D + N·D²)"
    supports: ClassVar[Supports] = _CAUSAL_ONLY
    papers: ClassVar[tuple[str, ...]] = ("Lightning Attention-2", "TransNormerLLM", "RetNet")

    decay: float | torch.Tensor | None = param(None, help="λ in [0, 1]: float, (Hq,) tensor, or None (RetNet)")
    chunk: int = param(64, min=1, clamp=True, help="chunk (block) length")

    def validate(self) -> None:
        d = self.decay
        if d is None:
            return
        if isinstance(d, bool) or not isinstance(d, (int, float, torch.Tensor)):
            raise AttnZooError(f"lightning: parameter 'decay' expected a float, a (Hq,) tensor or None, got {d!r}")
        t = torch.as_tensor(d, dtype=torch.float64)
        if t.dim() > 1 or bool(torch.isnan(t).any()) or bool((t < 0).any()) or bool((t > 1).any()):
            raise AttnZooError(f"lightning: parameter 'decay' expected values in [0, 1] (scalar or (Hq,)), got {d!r}")

    def log_decay(self, heads: int, device) -> torch.Tensor:
        """``log λ`` as a ``(1, Hq, 1, 1)`` gate."""
        lam = retnet_decay(heads) if self.decay is None else torch.as_tensor(self.decay, dtype=torch.float64)
        if lam.dim() == 1 and lam.shape[0] != heads:
            raise AttnZooError(f"lightning: parameter 'decay' expected {heads} values (one per query head), "
                               f"got {lam.shape[0]}")
        return torch.log(lam.expand(heads)).view(1, heads, 1, 1).to(device)

    def attend(self, q, k, v, prob, *, causal, key_padding_mask, state):
        gate = self.log_decay(prob.heads_q, q.device).to(q.dtype)
        return linear_attention(q * prob.scale, k, v, causal=True, gate=gate, chunk=self.chunk,
                                form=engine_form(prob.len_k), state=state, key_padding_mask=key_padding_mask)


@register
@dataclass(frozen=True)
class GLA(RecurrentMethod):
    """Gated linear attention (flash-linear-attention's ``chunk_gla`` convention):
    ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀv_t``, ``o_t = (scale·q_t) S_t``, with the
    extra input ``g (B, Hq, Nk, D)`` of log-gates ≤ 0 at each key position.
    Chunked in log space (a NaN-free segment-sum fallback for chunks with
    extreme gates). Causal only. State: :class:`LinearState`.
    """

    name: ClassVar[str] = "gla"
    exact_for: ClassVar[str] = "never: gated linear attention is its own model, not a softmax approximation"
    family: ClassVar[Family] = Family.LINEAR_RNN
    complexity: ClassVar[str] = "O(N·C·D + N·D²)"
    supports: ClassVar[Supports] = _CAUSAL_ONLY
    papers: ClassVar[tuple[str, ...]] = ("Gated Linear Attention Transformers with Hardware-Efficient Training",)
    inputs: ClassVar[dict[str, str]] = {"g": "(B, Hq, Nk, D) log forget gates <= 0 at each key position (required)"}

    chunk: int = param(64, min=1, clamp=True, help="chunk length")

    def attend(self, q, k, v, prob, *, causal, key_padding_mask, state, g=None):
        if g is None:
            raise AttnZooError("gla: missing required input 'g' (B, Hq, Nk, D) of log-gates <= 0")
        gate = check_log_gate(g, (prob.batch, prob.heads_q, prob.len_k, prob.dim))
        return linear_attention(q * prob.scale, k, v, causal=True, gate=gate, chunk=self.chunk,
                                form=engine_form(prob.len_k), state=state, key_padding_mask=key_padding_mask)

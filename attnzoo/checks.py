"""Input validation shared by every method.

Every check runs before any heavy computation and raises :class:`AttnZooError`
with a message naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import ast
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AttnZooError

#: Set to False to skip the NaN/inf scan of q, k and v (one extra pass over
#: the inputs) in tight loops where the inputs are known to be finite.
CHECK_FINITE = True


@dataclass(frozen=True)
class Problem:
    """The sizes of one attention call, resolved from q, k and v."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    dim: int
    dim_v: int
    scale: float

    @property
    def groups(self) -> int:
        """Query heads per KV head (1 = plain multi-head attention)."""
        return self.heads_q // self.heads_kv


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    """Check that ``t`` is a floating tensor of rank ``ndim``."""
    if not isinstance(t, torch.Tensor):
        raise AttnZooError(f"{name}: expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise AttnZooError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {_shape(t)}")
    if not t.is_floating_point():
        raise AttnZooError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}")
    return t


#: tensors from this many elements on are scanned by the C++ extension's ``peak`` on CPU (:func:`_peak`)
CPP_PEAK_MIN = 1 << 15


def _peak(t: torch.Tensor) -> float:
    """``max |t|`` in one pass (NaN if any element is NaN): ``aminmax`` is ~20x faster than the inf-norm on CPU.

    A large CPU float32/float64 tensor (4-D, rows of unit stride: the inputs of an attention call) goes to
    ``torch.ops.attnzoo.peak`` (``csrc/capped_attention.cpp``: one vectorised max-abs pass with a NaN flag, on
    torch's threads) where the extension builds: half of ``aminmax``'s time while the tensor is in cache (22 vs
    45 us for a decode step's (1, 3, 2048, 64) keys, 1 thread), which is what a one-query call's scan of k and v
    costs; from memory both are bound by its bandwidth (8 MB of keys: ~260 vs ~295 us, loaded machine).
    """
    if not t.is_floating_point():
        return float(torch.linalg.vector_norm(t.to(torch.promote_types(t.dtype, torch.float32)), ord=math.inf))
    if (t.numel() >= CPP_PEAK_MIN and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and t.dim() == 4 and t.stride(3) == 1):
        op = _cpp_peak()
        if op is not None:
            return op(t)
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    return max(-lo, hi) if not (math.isnan(lo) or math.isnan(hi)) else math.nan


#: ``torch.ops.attnzoo.peak`` once its extension is loaded (see :func:`_cpp_peak`)
_PEAK_OP = None


def _cpp_peak():
    """``torch.ops.attnzoo.peak`` where it is there (the soft-cap extension, built on first use like every CPU
    caller of it), else None (``ATTNZOO_CPP=0``, a failed build: ``aminmax`` serves)."""
    global _PEAK_OP
    if _PEAK_OP is None:
        from .core import capped  # not at import: checks is imported before the engines

        if capped.available():
            _PEAK_OP = torch.ops.attnzoo.peak
    return _PEAK_OP


def check_finite(name: str, t: torch.Tensor) -> float | None:
    """Reject NaN/inf; returns ``max |t|`` (None when skipped: ``CHECK_FINITE`` False, empty or meta).

    One pass over ``t``: the largest magnitude is finite exactly when every
    element is (NaN and inf propagate), and it bounds the logits for free
    (:func:`check_logit_range`).
    """
    if not CHECK_FINITE or not t.numel() or t.device.type == "meta":
        return None
    known = vouched_peak(t)
    if known is not None:
        return known
    peak = _peak(t.detach())  # a scan, not part of any graph
    if not math.isfinite(peak):
        raise AttnZooError(f"{name}: contains NaN or inf values; attention inputs must be finite")
    return peak


#: (tensor, its version, its max |t|) entries :func:`check_finite` trusts without a pass (see :func:`vouched`)
_VOUCHED: ContextVar[tuple] = ContextVar("attnzoo_vouched", default=())


def _version(t: torch.Tensor) -> int | None:
    """``t._version`` (None for inference-mode tensors, which keep no version counter)."""
    try:
        return t._version
    except RuntimeError:
        return None


@contextmanager
def vouched(*peaks: tuple[torch.Tensor, float | None]):
    """Within the block, :func:`check_finite` of exactly these tensor objects (unchanged since: the same
    ``_version``) returns the given ``max |t|`` without a pass over them.

    For callers that already know a tensor's peak at less cost than a scan: a decode loop's growing K/V,
    whose earlier rows were scanned by earlier calls (:class:`GrowingScan`). Entries with peak None are
    ignored.
    """
    entries = tuple((t, _version(t), float(p)) for t, p in peaks if p is not None)
    token = _VOUCHED.set(_VOUCHED.get() + entries)
    try:
        yield
    finally:
        _VOUCHED.reset(token)


def vouched_peak(t: torch.Tensor) -> float | None:
    """The peak :func:`vouched` holds for the tensor object ``t`` (None if none, or ``t`` changed since)."""
    for known, version, peak in _VOUCHED.get():
        if known is t and _version(t) == version:
            return peak
    return None


class GrowingScan:
    """``max |k|`` and ``max |v|`` of a key/value sequence that grows between calls, scanning only new rows.

    A decode loop hands attention the whole cache at every step (transformers' DynamicCache: ``(B, H, N, D)``
    with ``N`` growing); rescanning it for NaN/inf costs as much as the attention itself. Rows ``[0, n)``
    scanned by the previous call are trusted when this call continues that sequence: the same batch, heads,
    head dims, dtype and device, at least ``n`` earlier rows besides its own ``new`` ones, and row ``n - 1``
    of k and v unchanged (one kept row per head). Anything else (a new prompt, a crop, a beam-search
    reorder) is scanned whole. A row changed in place in the middle of a cache between calls is not seen
    here; the NaN it would cause is refused by the output check (:func:`check_result`) instead.
    """

    def __init__(self) -> None:
        self._rows = 0
        self._signature: tuple | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._peaks = (0.0, 0.0)
        #: elements of k and v the last call scanned (tests count them)
        self.scanned = 0

    def peaks(self, k: torch.Tensor, v: torch.Tensor, new: int) -> tuple[float | None, float | None]:
        """``(max |k|, max |v|)`` over all rows of ``k``/``v`` ``(B, H, N, D)``, whose last ``new`` rows are
        this call's own; raises AttnZooError on NaN/inf in the rows scanned. ``(None, None)`` when skipped."""
        if (not CHECK_FINITE or not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.numel() for t in (k, v))
                or v.shape[2] != k.shape[2] or k.device.type == "meta"):
            return None, None  # nothing to vouch for: check_qkv scans (or explains what is wrong)
        n = k.shape[2]
        signature = (tuple(k.shape[:2]), tuple(v.shape[:2]), k.shape[3], v.shape[3], k.dtype, v.dtype, k.device)
        start = 0
        with torch.no_grad():
            if self._signature == signature and 0 < self._rows <= n - new:
                row = self._rows - 1
                if torch.equal(k[:, :, row], self._last[0]) and torch.equal(v[:, :, row], self._last[1]):
                    start = self._rows
            k_new, v_new = k[:, :, start:], v[:, :, start:]
            k_max, v_max = check_finite("k", k_new), check_finite("v", v_new)
            self.scanned = k_new.numel() + v_new.numel()
            if start:
                k_max, v_max = max(k_max, self._peaks[0]), max(v_max, self._peaks[1])
            self._rows, self._signature, self._peaks = n, signature, (k_max, v_max)
            self._last = (k[:, :, n - 1].clone(), v[:, :, n - 1].clone())
        return k_max, v_max


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    grad: bool = False,
) -> Problem:
    """Validate the standard ``(B, H, N, D)`` inputs and return their sizes.

    ``grad``: gradients will be taken (a tighter logit bound, see :func:`check_logit_range`).
    """
    check_tensor("q", q, 4, "(B, Hq, Nq, D)")
    check_tensor("k", k, 4, "(B, Hkv, Nk, D)")
    check_tensor("v", v, 4, "(B, Hkv, Nk, Dv)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise AttnZooError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise AttnZooError(f"{name}: expected device {q.device} (the device of q), got {t.device}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise AttnZooError(
            f"k/v: expected batch size {B} (from q), got k {_shape(k)} and v {_shape(v)}"
        )
    if k.shape[3] != D:
        raise AttnZooError(f"k: expected head dim {D} (the last dim of q), got shape {_shape(k)}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise AttnZooError(
            f"v: expected {k.shape[1]} heads and {k.shape[2]} keys (matching k {_shape(k)}), got shape {_shape(v)}"
        )
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise AttnZooError(
            f"k: expected a number of KV heads that divides the {Hq} query heads (grouped-query attention), got {Hkv}"
        )
    if D == 0:
        raise AttnZooError("q: expected a head dim D >= 1, got 0")
    if v.shape[3] == 0:
        raise AttnZooError(f"v: expected a value head dim Dv >= 1, got shape {_shape(v)}")
    if key_padding_mask is not None:
        check_padding_mask(key_padding_mask, B, Nk, q.device)
    scale = resolve_scale(scale, D)
    q_max, k_max, _ = (check_finite(name, t) for name, t in (("q", q), ("k", k), ("v", v)))
    if q_max is not None and k_max is not None:
        check_logit_range(q_max, k_max, D, scale, q.dtype, grad=grad)
    return Problem(B, Hq, Hkv, Nq, Nk, D, v.shape[3], resolve_scale(scale, D))


#: the largest |scale · q·k| accepted, as a fraction of the compute dtype's max (margin for s - max, sums)
LOGIT_HEADROOM = 2.0 ** -8


def check_logit_range(q_max: float, k_max: float, dim: int, scale: float, dtype: torch.dtype, *,
                      grad: bool = False) -> None:
    """Refuse inputs whose scaled logits could overflow the compute dtype (they would come out as NaN).

    Bounds every logit by ``|scale · q·k| <= scale · D · max|q| · max|k|``
    (the maxima come from :func:`check_finite`'s pass) against the largest
    float32 (float64 for float64 inputs; half inputs are computed in float32)
    with a margin of :data:`LOGIT_HEADROOM`. With ``grad`` the bound is
    ``1 / eps`` of that dtype instead: backward passes recompute probabilities
    as ``exp(s - lse)``, whose rounding error ``|s| · eps`` must stay below 1
    (beyond it they overflow to inf). Realistic inputs stay orders of
    magnitude below both; only a huge ``scale`` or huge q/k values reach them.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    info = torch.finfo(compute)
    limit = 1.0 / info.eps if grad else info.max * LOGIT_HEADROOM
    bound = scale * dim * q_max * k_max
    if not bound <= limit:
        why = "are too large for gradients" if grad else f"may overflow {str(compute).replace('torch.', '')}"
        raise AttnZooError(
            f"scale: scaled logits {why}: scale · D · max|q| · max|k| = {scale:.3g} · {dim} · {q_max:.3g} · "
            f"{k_max:.3g} = {bound:.3g}, expected at most {limit:.3g}; use a smaller scale or rescale the inputs q/k")


def check_result(method: str, out: torch.Tensor, prob: Problem) -> None:
    """The last guard of "no NaN from accepted input": a non-finite result is refused, naming the cause.

    Softmax methods cannot overflow below :func:`check_logit_range`'s bound; methods
    without a normaliser (linear attention) scale their output with ``q·k`` and
    can, as can any result cast to float16. It also catches what an incremental
    input scan cannot see (:class:`GrowingScan`: a cached row changed in place after
    an earlier step scanned it). One pass over the output.
    """
    if not CHECK_FINITE or not out.numel() or out.device.type == "meta":
        return
    finite = math.isfinite(_peak(out.detach()))
    if not finite:
        raise AttnZooError(f"{method}: the result is not finite: it overflows {str(out.dtype).replace('torch.', '')} "
                           f"for these inputs (scale={prob.scale:.3g}); use a smaller scale or rescale the inputs "
                           "q/k/v (or, in a decode loop, a cached key/value was set to NaN/inf after an earlier "
                           "step scanned it)")


def check_padding_mask(mask: object, batch: int, len_k: int, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise AttnZooError(f"key_padding_mask: expected a bool tensor (B, Nk), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise AttnZooError(f"key_padding_mask: expected dtype torch.bool (True = keep), got {mask.dtype}")
    if tuple(mask.shape) != (batch, len_k):
        raise AttnZooError(f"key_padding_mask: expected shape ({batch}, {len_k}) = (B, Nk), got {_shape(mask)}")
    if mask.device != device:
        raise AttnZooError(f"key_padding_mask: expected device {device} (the device of q), got {mask.device}")


def resolve_scale(scale: float | None, dim: int) -> float:
    """``scale`` or the default ``dim ** -0.5``; rejects non-positive or non-finite values."""
    if scale is None:
        return dim**-0.5
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise AttnZooError(f"scale: expected a positive finite float or None, got a tensor of shape {_shape(scale)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise AttnZooError(f"scale: expected a positive finite float or None, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:
        raise AttnZooError(f"scale: expected a positive finite float or None, got an int too large for a float "
                           f"({len(str(abs(scale)))} digits)") from None
    if not math.isfinite(value) or value <= 0:
        raise AttnZooError(f"scale: expected a positive finite float or None, got {scale}")
    return value


def check_flag(name: str, value: object) -> bool:
    """``value`` must be a real ``bool`` (``causal="False"`` is a string, not False)."""
    if not isinstance(value, bool):
        raise AttnZooError(f"{name}: expected True or False, got {value!r} ({type(value).__name__})")
    return value


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["window=32", "score='max'"]`` -> ``{"window": 32, "score": "max"}`` (values as Python literals, else str)."""
    out = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise AttnZooError(f"--param: expected NAME=VALUE, got {item!r}")
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[name] = text
    return out

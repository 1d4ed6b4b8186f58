"""Soft-capped attention in one fused CPU pass: a small C++ extension (``csrc/capped_attention.cpp``),
compiled on first use.

A soft cap ``cap·tanh(s / cap)`` is no additive mask, so PyTorch's fused CPU kernel cannot run it, and the
eager row-wise path (:func:`attnzoo.core.exact._mod_row_tiles`) pays separate passes over every score
block. The extension is the same flash-style loop as PyTorch's kernel (per work item of 64 query rows:
blocks of 512 keys, a BLAS GEMM for the scores, one pass for the additive mask, the cap and the row
maximum, one for ``exp`` and the row sum, a GEMM into the output), with the cap inside it. Its entry
:func:`capped_attention` has :func:`~attnzoo.core.kernel.flash_cpu`'s interface plus ``cap`` and a
bottom-right causal ``offset``.

The build needs a C++ compiler (and ninja); it is cached under ``$ATTNZOO_CPP_CACHE`` (default
``~/.cache/attnzoo/cpp``), keyed by the source, torch's version and the CPU. Where it cannot be built (or
``ATTNZOO_CPP=0``) :func:`available` is False and every caller keeps its eager path: the extension is
only ever a faster way to the same result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

from .kernel import kernel_rows

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "capped_attention.cpp"
#: dtypes the extension runs (others take the eager paths)
DTYPES = (torch.float32, torch.float64)
_built: dict[str, object] = {}
#: a build lock older than this (seconds) was left by a killed build (a build takes ~20 s of CPU)
_STALE_LOCK_S = 600


def _cpu_tag() -> str:
    """The CPU's feature flags (the build uses -march=native), so a shared cache never serves another CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def _load():
    key = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode() + _cpu_tag().encode()).hexdigest()[:16]
    build = Path(os.environ.get("ATTNZOO_CPP_CACHE", Path.home() / ".cache" / "attnzoo" / "cpp")) / key
    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"  # torch's build lock: a process killed mid-build leaves it, and later builds would wait
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    from torch.utils.cpp_extension import load

    load(name=f"attnzoo_capped_{key}", sources=[str(_SOURCE)], build_directory=str(build), is_python_module=False,
         extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"], verbose=False)
    return torch.ops.attnzoo.capped_attention


def built() -> bool | None:
    """Whether the extension was built in this process (None: not tried yet; nothing is built here)."""
    return None if "module" not in _built else _built["module"] is not None


def available() -> bool:
    """Whether the extension is built (building it now, once per process, if needed)."""
    if "module" not in _built:
        module = None
        if os.environ.get("ATTNZOO_CPP", "1") != "0":
            try:
                module = _load()
            except Exception as e:  # no compiler, no ninja, a build error: the eager paths serve
                log.warning("attnzoo: the soft-cap CPU extension could not be built (%s); using eager paths",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
        _built["module"] = module
    return _built["module"] is not None


def applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`capped_attention` can run a call on these inputs (CPU, float32/64, built)."""
    return q.device.type == "cpu" and q.dtype in DTYPES and v.dtype == q.dtype and available()


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, cap: float | None,
                     causal: bool = False, offset: int = 0, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (X, Y, Lq, Dv), lse (X, Y, Lq))`` of ``q (X, Y, Lq, D)`` over ``k, v (X, Y, Lk, D|Dv)``
    (broadcast over ``X, Y``), scores ``cap·tanh((scale·q·k + mask) / cap)`` (no cap: ``None``).

    ``k`` may be laid out transposed (``k.transpose(-1, -2).contiguous().transpose(-1, -2)``, as the exact
    engine passes it): the score GEMM then reads it without packing a transpose per block.
    ``mask``: a bool visibility mask or an additive one in q's dtype (-inf hides a key), broadcast to
    ``(X, Y, Lq, Lk)``; ``causal``: key ``j`` visible to query ``i`` when ``j <= i + offset``. Rows that
    see no key give ``(0, -inf)``. Only after :func:`applies`.
    """
    X, Y = (max(a, b) for a, b in zip(q.shape[:2], k.shape[:2]))
    if not (k.stride(-2) == 1 and k.stride(-1) >= k.shape[-2] > 1):  # else K^T contiguous: a plain score GEMM
        k = kernel_rows(k)
    q, k, v = (t.expand(X, Y, *t.shape[2:]) for t in (kernel_rows(q), k, kernel_rows(v)))
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, -float("inf"))
        mask = kernel_rows(mask.to(q.dtype)).expand(X, Y, q.shape[2], k.shape[2])
    out, lse = _built["module"](q, k, v, mask, float(scale), float(cap or 0.0), causal, int(offset))
    return out, lse

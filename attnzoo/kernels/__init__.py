"""Triton kernels for the engines (optional: ``pip install attnzoo[gpu]``).

Importing this package imports Triton and defines the kernels; the backend
dispatch (:mod:`attnzoo.backends`) imports it only when a Triton backend is
asked about, so attnzoo itself never needs Triton. Kernels are defined in the
mode Triton is in at import time: with ``TRITON_INTERPRET=1`` set before the
first import they run on CPU tensors under Triton's interpreter (how the test
suite checks them without a GPU), otherwise they compile for CUDA.
"""

from __future__ import annotations

from triton import knobs as _knobs

#: True when the kernels were defined under Triton's interpreter (they then run on CPU tensors)
INTERPRET: bool = bool(_knobs.runtime.interpret)

from .attention import flash_attention, layout_attention, sage_attention, split_k  # noqa: E402

__all__ = ["INTERPRET", "flash_attention", "layout_attention", "sage_attention", "split_k"]

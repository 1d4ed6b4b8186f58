"""GPU kernels for the engines (optional: ``pip install 'attnzoo[gpu]'`` adds Triton).

- :mod:`.attention`: Triton kernels for dense, block-sparse / token-layout, split-K decode and INT8 (sage)
  attention; :mod:`.linear`: the chunked linear recurrence. Importing either imports Triton.
- :mod:`.flex`: block layouts as FlexAttention block masks (no Triton import of ours; torch compiles them).

Nothing here is imported by ``import attnzoo``: the backend dispatch
(:mod:`attnzoo.backends`) imports a module when a backend is asked for; this
package itself only says whether Triton can be used (no Triton import). Triton
kernels are defined in the mode Triton is in when :mod:`._attn` is first
imported: with ``TRITON_INTERPRET=1`` set before that, they run on CPU tensors
under Triton's interpreter (how the test suite checks them without a GPU).
"""

from __future__ import annotations

import importlib.util


def triton_missing() -> str | None:
    """Why Triton cannot be used at all here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'attnzoo[gpu]')"
    return None


def auto_triton(t) -> bool:
    """The ``auto`` rule for engines called outside :func:`attnzoo.attention` (the KV cache's reads): CUDA
    tensors and Triton installed."""
    return t.device.type == "cuda" and triton_missing() is None

"""Pictures of what an attention method reads: ``show_layout(method or layout, N)`` -> PNG.

The visible set is measured, not re-derived: the method attends with
``v = I`` (one-hot values), so ``out[i, j] > 0`` exactly when query ``i``
gave key ``j`` a non-zero weight. The same probe works for every registered
method, static or content-dependent (those are fed a seeded structured
workload from :mod:`attnzoo.bench.workloads`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .core.blocksparse import BlockLayout, TokenLayout, attend
from .errors import AttnZooError
from .registry import Method, get


def visible_keys(method: str | Method | BlockLayout | TokenLayout, length: int = 256, *, causal: bool = True,
                 heads: int = 1, workload: str = "vertical_slash", seed: int = 0, **params: Any) -> torch.Tensor:
    """``(heads, Nq, Nk)`` bool: which keys each query reads (layouts use their own lengths)."""
    from .bench import workloads

    if isinstance(method, (BlockLayout, TokenLayout)):
        n_q, n_k = method.len_q, method.len_k
        q = torch.zeros(1, heads, n_q, 1, dtype=torch.float64)
        k = torch.zeros(1, heads, n_k, 1, dtype=torch.float64)
        eye = torch.eye(n_k, dtype=torch.float64).expand(1, heads, n_k, n_k)
        out, _ = attend(q, k, eye, method, scale=1.0, causal=causal)
        return out[0] > 0
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise AttnZooError(f"length: expected a positive int, got {length!r}")
    m = get(method, **params) if isinstance(method, str) else method
    if not isinstance(m, Method):
        raise AttnZooError(f"method: expected a method name, a Method or a layout, got {type(method).__name__}")
    q, k, _, _ = workloads.make(workload, length=length, heads=heads, dim=32, seed=seed, dtype=torch.float64)
    eye = torch.eye(length, dtype=torch.float64).expand(1, heads, length, length)
    with torch.no_grad():
        out = m(q, k, eye, causal=causal)
    return out[0] > 0


#: size parameters that, at their defaults, can cover a short sequence entirely
_SIZES = ("window", "n_global", "local", "group", "block", "sinks")


def _sparse_defaults(method: str, length: int) -> dict[str, int]:
    """Smaller sizes (length // 8) for the defaults of ``method`` that reach a quarter of ``length``."""
    cls = type(get(method))
    return {n: max(1, length // 8) for n in _SIZES if isinstance(getattr(cls, n, None), int)
            and not isinstance(getattr(cls, n), bool) and getattr(cls, n) >= length // 4}


def show_layout(method: str | Method | BlockLayout | TokenLayout, length: int = 256, *, causal: bool = True,
                head: int = 0, path: str | Path | None = None, workload: str = "vertical_slash",
                **params: Any) -> Path:
    """Draw the visible-key pattern of ``method`` (or a layout) at ``length`` tokens; returns the PNG path.

    When a method named without parameters reads every pair at this length (its default window or
    block covers the sequence), the picture uses sizes of ``length // 8`` instead, so the pattern shows,
    and says so. Prints where it wrote the file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vis = visible_keys(method, length, causal=causal, heads=head + 1, workload=workload, **params)[head]
    allowed = torch.ones_like(vis).tril(vis.shape[1] - vis.shape[0]) if causal else torch.ones_like(vis)
    note = ""
    if isinstance(method, str) and not params and bool((vis == allowed).all()):
        params = _sparse_defaults(method, length)
        if params:
            vis = visible_keys(method, length, causal=causal, heads=head + 1, workload=workload, **params)[head]
            note = ("its defaults read every pair at this length; drawn with "
                    + ", ".join(f"{k}={v}" for k, v in params.items()))
    name = method if isinstance(method, str) else getattr(method, "name", type(method).__name__)
    path = Path(path or f"{name}.png").resolve()
    # three shades: read (dark), allowed but skipped (light), never allowed (white, e.g. above the diagonal)
    picture = vis.float() + allowed.float()
    fig, ax = plt.subplots(figsize=(4.6, 4.6), dpi=120)
    ax.imshow(picture.numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=2.2)
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    ax.set_title(f"{name}{f' ({shown})' if shown else ''}, N={length}, {'causal' if causal else 'non-causal'}:\n"
                 f"{vis.float().sum() / allowed.float().sum():.1%} of the allowed pairs read", fontsize=9)
    ax.set_xlabel("key j (dark: read, light: skipped)")
    ax.set_ylabel("query i")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"show_layout: wrote {path}" + (f" ({note})" if note else ""))
    return path

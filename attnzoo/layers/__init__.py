"""Learned attention layers (``nn.Module`` with their own projections).

Each layer maps ``x (B, N, d_model)`` to ``(B, N, d_model)``; add a layer by
adding a module here and exporting it below.
"""

from .linear import AarenLayer, GLALayer, LinformerLayer, SLABLayer

__all__ = ["AarenLayer", "GLALayer", "LinformerLayer", "SLABLayer"]

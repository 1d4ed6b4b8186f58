"""Learned attention layers (``nn.Module`` with their own projections).

Each layer maps ``x (B, N, d_model)`` to ``(B, N, d_model)``; add a layer by
adding a module here and exporting it below.
"""

from .combiner import CombinerLayer
from .heads import DiffQKVLayer, MoHLayer, masformer_plan
from .landmark import LandmarkLayer
from .learned_sparse import SEALayer, SeerGateLayer, SparsifinerLayer
from .linear import AarenLayer, GLALayer, LinformerLayer, SLABLayer
from .sse import SSELayer

__all__ = ["AarenLayer", "CombinerLayer", "DiffQKVLayer", "GLALayer", "LandmarkLayer", "LinformerLayer", "MoHLayer",
           "SEALayer", "SLABLayer", "SSELayer", "SeerGateLayer", "SparsifinerLayer", "masformer_plan"]

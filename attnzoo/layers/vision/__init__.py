"""Vision / multimodal token mixers (``nn.Module``): every mixer maps ``x (B, N, C)`` whose N tokens are a
row-major ``grid`` (or a sequence, for the ones that ignore it) to ``(B, N, C)`` via ``mixer(x, grid)``.

``MIXERS`` names a factory ``(dim, heads) -> mixer`` for each, with small defaults for the vision task;
``make_mixer(name, dim, heads, **kw)`` builds one.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ...errors import AttnZooError
from .attention import (BiFormerAttention, CascadedGroupAttention, ChannelAttention, DiNAAttention, EchoAttention,
                        FITAttention, FlatFormerAttention, GlobalAttention, HiLoAttention, SHViTAttention,
                        SwinAttention)
from .conv import AFF, ECA, AdditiveMixer, GnConv, PoolMixer
from .recurrent import (ESSAAttention, LightNetAttention, RxTLayer, ScatterFormerAttention, TitansMemory,
                        essa_attention, lightnet_attention, titans_memory, windowed_linear_attention)

MIXERS: dict[str, Callable[..., nn.Module]] = {
    "global": lambda dim, heads, **kw: GlobalAttention(dim, heads, **kw),
    "swin": lambda dim, heads, **kw: SwinAttention(dim, heads, **{"window": 4, **kw}),
    "swin_shift": lambda dim, heads, **kw: SwinAttention(dim, heads, **{"window": 4, "shift": 2, **kw}),
    "biformer": lambda dim, heads, **kw: BiFormerAttention(dim, heads, **{"regions": 4, "topk": 4, **kw}),
    "hilo": lambda dim, heads, **kw: HiLoAttention(dim, heads, **{"alpha": 0.5, "window": 2, **kw}),
    "davit": lambda dim, heads, **kw: ChannelAttention(dim, heads, **kw),
    "efficientvit": lambda dim, heads, **kw: CascadedGroupAttention(dim, heads, **kw),
    "flatformer": lambda dim, heads, **kw: FlatFormerAttention(dim, heads, **{"group": 16, "window": 4, **kw}),
    "eca": lambda dim, heads, **kw: ECA(dim, **kw),
    "casvit": lambda dim, heads, **kw: AdditiveMixer(dim, **kw),
    "scatterformer": lambda dim, heads, **kw: ScatterFormerAttention(dim, heads, **{"window": 4, **kw}),
    "essa": lambda dim, heads, **kw: ESSAAttention(dim, heads, **kw),
    "lightnet": lambda dim, heads, **kw: LightNetAttention(dim, heads, **kw),
    "dina": lambda dim, heads, **kw: DiNAAttention(dim, heads, **{"kernel": 5, "dilation": None, **kw}),
    "natten": lambda dim, heads, **kw: DiNAAttention(dim, heads, **{"kernel": 5, "dilation": 1, **kw}),
    "shvit": lambda dim, heads, **kw: SHViTAttention(dim, **kw),
    "fit": lambda dim, heads, **kw: FITAttention(dim, heads, **{"group": 64, "latents": 4, **kw}),
    "hornet": lambda dim, heads, **kw: GnConv(dim, **kw),
    "aff": lambda dim, heads, **kw: AFF(dim, **kw),
    "poolformer": lambda dim, heads, **kw: PoolMixer(dim, **kw),
    "echoatt": lambda dim, heads, **kw: EchoAttention(dim, heads, **kw),
    "titans": lambda dim, heads, **kw: TitansMemory(dim, heads, **{"chunk": 32, **kw}),
    "rxt": lambda dim, heads, **kw: RxTLayer(dim, heads, **kw),
}


def make_mixer(name: str, dim: int, heads: int = 4, **kw) -> nn.Module:
    """The mixer ``name`` of ``MIXERS`` at width ``dim``."""
    if name not in MIXERS:
        raise AttnZooError(f"mixer: expected one of {sorted(MIXERS)}, got {name!r}")
    return MIXERS[name](dim, heads, **kw)


__all__ = ["AFF", "BiFormerAttention", "CascadedGroupAttention", "ChannelAttention", "DiNAAttention", "ECA",
           "ESSAAttention", "EchoAttention", "FITAttention", "FlatFormerAttention", "GlobalAttention", "GnConv",
           "HiLoAttention", "LightNetAttention", "MIXERS", "AdditiveMixer", "PoolMixer", "RxTLayer",
           "SHViTAttention", "ScatterFormerAttention", "SwinAttention", "TitansMemory", "essa_attention",
           "lightnet_attention", "make_mixer", "titans_memory", "windowed_linear_attention"]

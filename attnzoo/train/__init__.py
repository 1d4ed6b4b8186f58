"""A tiny CPU trainer: judge attention mechanisms by what a small model trained with them can do.

>>> from attnzoo.train import TinyModel, fit
>>> from attnzoo.tasks import make_task
>>> task = make_task("mqar", pairs=8)
>>> model = TinyModel(**task.model_config(), mixer="based", d_model=64)
>>> result = fit(model, task.batches(64, seed=0), task.held_out(256, 64, seed=0), steps=2000, target=0.99)
"""

from .fit import IGNORE, FitResult, evaluate, fit, token_accuracy, token_loss
from .mixers import LAYERS, MethodMixer, build_mixer, mixer_names, register_layer
from .model import Block, TinyModel

__all__ = ["IGNORE", "LAYERS", "Block", "FitResult", "MethodMixer", "TinyModel", "build_mixer", "evaluate", "fit",
           "mixer_names", "register_layer", "token_accuracy", "token_loss"]

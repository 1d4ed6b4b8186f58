"""A tiny CPU trainer: judge attention mechanisms by what a small model trained with them can do.

>>> from attnzoo.train import TinyModel, fit
>>> from attnzoo.tasks import make_task
>>> task = make_task("mqar", pairs=8)
>>> model = TinyModel(**task.model_config(), mixer="based", d_model=64, conv=4)
>>> result = fit(model, task.batches(64, seed=0), task.held_out(256, 64, seed=0), steps=2000, target=0.99)

The names below load on first use (PEP 562), so ``attnzoo task --help`` starts without torch.
"""

from .._lazy import lazy_exports

#: public name -> the submodule defining it
_EXPORTS = {
    **dict.fromkeys(("AUX_LOSSES", "IGNORE", "FitResult", "aux_loss", "evaluate", "fit", "token_accuracy", "token_loss"),
                   ".trainer"),
    **dict.fromkeys(("LAYERS", "MethodMixer", "build_mixer", "mixer_names", "register_layer"), ".mixers"),
    **dict.fromkeys(("Block", "ShortConv", "TinyModel"), ".model"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Per-head plans: plan files (:mod:`.file`) and the calibrators that write them (:mod:`.base`).

>>> import attnzoo.plan as P
>>> plan = P.make_calibrator("razor", budget=0.125, length=4096).run(model, tokenizer, model_name="smollm2-135m")
>>> plan.save("plan.json"); plan = P.load("plan.json")
>>> attnzoo.hf.apply(model, plan); cache = attnzoo.hf.make_cache(model, plan)

The plan file needs no torch; the calibrators (torch, transformers) load on first use, so the CLI
module in this package starts without torch.
"""

from .file import Group, Plan, from_dict, head_plan, is_plan_file, load, model_shapes, split_plan

_CALIBRATION = ("CALIBRATORS", "Calibrator", "make_calibrator", "register_calibrator")

__all__ = ["Group", "Plan", "from_dict", "head_plan", "is_plan_file", "load", "model_shapes", "split_plan", *_CALIBRATION]


def __getattr__(name: str):
    if name in _CALIBRATION:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module 'attnzoo.plan' has no attribute {name!r}")

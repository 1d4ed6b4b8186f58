"""Per-head plans: plan files (:mod:`.file`) and the calibrators that write them (:mod:`.base`).

>>> import attnzoo.plan as P
>>> plan = P.make_calibrator("razor", budget=0.125, length=4096).run(model, tokenizer, model_name="smollm2-135m")
>>> plan.save("plan.json"); plan = P.load("plan.json")
>>> attnzoo.hf.apply(model, plan); cache = attnzoo.hf.make_cache(model, plan)

Names load on first use (PEP 562), so the CLI module in this package starts without torch.
"""

import importlib

_EXPORTS = {**dict.fromkeys(("Plan", "Group", "load", "from_dict", "split_plan", "model_shapes", "is_plan_file"),
                            ".file"),
            **dict.fromkeys(("CALIBRATORS", "Calibrator", "make_calibrator", "register_calibrator"), ".base")}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnzoo.plan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""Lazy package exports (PEP 562): a package's public names load on first access.

Keeps ``import attnzoo`` and the CLI free of torch until a command needs it. A package defines
``_EXPORTS = {name: ".submodule"}`` and ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``.
An export whose submodule is named like it (``"mods": ".mods"``) is the submodule itself.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` that import ``exports`` on first use."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name], package)
        value = module if exports[name] == f".{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)  # later lookups skip this hook
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__

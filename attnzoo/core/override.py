"""Swappable engine functions: how a kernel backend takes over an engine for the duration of one call.

An :class:`Override` is a context variable holding an alternative
implementation of one engine function with the same contract. The engine
asks :meth:`Override.get` and runs the override when one is set; a backend
sets it with ``with override.use(impl): method.forward(...)``, so every method
built on that engine runs on the backend without knowing of it (and the
engines never import the backends).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator


class Override:
    """One engine function's optional replacement, scoped to a ``with`` block (and to its thread/task)."""

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(name, default=None)

    def get(self) -> Callable | None:
        return self._var.get()

    @contextlib.contextmanager
    def use(self, impl: Callable) -> Iterator[None]:
        token = self._var.set(impl)
        try:
            yield
        finally:
            self._var.reset(token)

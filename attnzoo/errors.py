"""The two exception types every attnzoo call raises for user-facing problems."""

from __future__ import annotations


class AttnZooError(ValueError):
    """Bad input or bad parameters: the message names the argument, what was
    expected and what was given."""


class UnsupportedError(AttnZooError):
    """A method was asked for a capability it does not declare (causal,
    non-causal, decode, gradients, lse, ...). Nothing silently falls back."""

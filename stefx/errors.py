"""The exceptions stefx raises at its edges.

Every error a user can cause (a bad recipe, a model stefx cannot capture, a rule that
matches nothing) is one of these, and its message names the field, the bad value and
the fix. Internal invariants use plain ``assert``; user input never does.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["CaptureError", "NoMatchError", "RecipeError", "StefxError", "did_you_mean"]


class StefxError(Exception):
    """Base class of every error stefx raises on purpose."""


class RecipeError(StefxError, ValueError):
    """A recipe or quantizer spec is invalid: names the key, the value and the valid choices."""


class CaptureError(StefxError, RuntimeError):
    """A model could not be captured as a graph (and was left unchanged)."""


class NoMatchError(StefxError, LookupError):
    """A recipe rule selected nothing in the model."""


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""

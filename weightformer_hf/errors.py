"""Errors with messages that name the culprit (a teacher, a tensor, a file) and say what to do."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): libraries' messages go on with
    advice that is not ours to give."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


class WeightFormerError(ValueError):
    """Base class of every error weightformer_hf raises for bad input."""


class UnsupportedArchitectureError(WeightFormerError):
    """A model whose architecture no family supports."""


class TeacherMismatchError(WeightFormerError):
    """Teachers that differ in architecture, tensors, shapes or labels, or do not fit a generator."""


class InvalidWeightsError(WeightFormerError):
    """NaN/inf weights, or a corrupt, truncated or missing weight file."""


class TeacherSourceError(WeightFormerError):
    """A teacher source that cannot be found, resolved or safely read."""

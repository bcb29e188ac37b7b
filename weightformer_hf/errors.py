"""Errors with messages that name the culprit (a teacher, a tensor, a file) and say what to do."""

from __future__ import annotations


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

"""Exceptions raised for bad models, inputs and method specifications.

All derive from :class:`ValueError` so callers that already guard ``model.generate`` keep working.
"""


class VeridicalError(ValueError):
    """Base class of every error veridical raises on purpose."""


class UnsupportedModelError(VeridicalError):
    """The model's family (``config.model_type``) is not one veridical knows."""


class InputError(VeridicalError):
    """The processor outputs passed as ``inputs`` cannot be used (no image token, bad shapes, ...)."""


class MethodSpecError(VeridicalError):
    """An unknown method name, unknown hyper-parameter or out-of-range value."""

"""veridical: training-free hallucination mitigation for vision-language models."""

from veridical import decoders, heads  # noqa: F401  (registers the methods)
from veridical.adapters import SUPPORTED_FAMILIES, ModelAdapter, get_adapter
from veridical.errors import InputError, MethodSpecError, UnsupportedModelError, VeridicalError
from veridical.generation import generate
from veridical.registry import list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_FAMILIES",
    "InputError",
    "MethodSpecError",
    "ModelAdapter",
    "UnsupportedModelError",
    "VeridicalError",
    "generate",
    "get_adapter",
    "list_methods",
    "register_method",
]

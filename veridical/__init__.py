"""veridical: training-free hallucination mitigation for vision-language models.

The package imports lazily: ``import veridical`` (and the command line's ``--help``) does not load
torch or transformers; the first use of :func:`generate`, :func:`get_adapter`, ... does.
"""

from __future__ import annotations

import importlib
from typing import Any

from veridical.errors import InputError, MethodSpecError, UnsupportedModelError, VeridicalError

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_LAZY = {
    "SUPPORTED_FAMILIES": "veridical.adapters",
    "ModelAdapter": "veridical.adapters",
    "get_adapter": "veridical.adapters",
    "generate": "veridical.generation",
    "list_methods": "veridical.registry",
    "register_method": "veridical.registry",
}

__all__ = [
    "InputError",
    "MethodSpecError",
    "UnsupportedModelError",
    "VeridicalError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'veridical' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

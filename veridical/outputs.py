"""Reading model outputs across transformers 5 releases and families."""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

from torch import nn


def cache_kwarg(module: nn.Module) -> str:
    """The name ``module.forward`` takes the KV cache under (transformers 5 renamed ``past_key_values``)."""
    return _cache_kwarg(type(module))


@lru_cache
def _cache_kwarg(module_type: type) -> str:
    params = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def language_output(output: Any) -> Any:
    """The language model's part of a forward's output (InstructBLIP nests it)."""
    return getattr(output, "language_model_outputs", None) or output


def output_cache(output: Any) -> Any:
    """The KV cache of a forward's output, or ``None`` when it kept none.

    Releases that renamed the field keep the old name as a deprecated alias, so the new one is read
    when it exists.
    """
    output = language_output(output)
    if hasattr(type(output), "cache") or "cache" in getattr(output, "keys", dict)():
        return getattr(output, "cache", None)
    return getattr(output, "past_key_values", None)

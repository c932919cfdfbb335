"""Registry of methods by name, and construction from user specs.

A method is given to :func:`veridical.generate` as a registered name (``"vcd"``), a dict with a
``name`` key plus hyper-parameters (``{"name": "vcd", "alpha": 2.0}``), or an instance already built
for the same inputs. Names and hyper-parameters are checked here so that a typo fails before any
forward pass runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from veridical.adapters import Inputs
from veridical.errors import MethodSpecError

T = TypeVar("T", bound=type)
MethodSpec = str | Mapping[str, Any] | object

_METHODS: dict[str, type] = {}
#: Arguments every method constructor takes before its hyper-parameters.
_CONTEXT_ARGS = ("model", "inputs")


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` available to :func:`veridical.generate` as ``name``."""

    def decorator(cls: T) -> T:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_METHODS[name].__name__}")
        _METHODS[name] = cls
        cls.method_name = name
        return cls

    return decorator


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def hyperparameters(cls: type) -> dict[str, Any]:
    """Hyper-parameter names of a method class with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {
        name: p.default
        for name, p in params.items()
        if name not in ("self", *_CONTEXT_ARGS) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def method_class(name: str) -> type:
    try:
        return _METHODS[name]
    except KeyError:
        raise MethodSpecError(
            f"unknown method {name!r}; registered methods: {', '.join(list_methods()) or '(none)'}"
        ) from None


def build_method(spec: MethodSpec, model: nn.Module, inputs: Inputs) -> object:
    """Instantiate one method from a name, a ``{"name": ..., **hyper-parameters}`` dict or an instance."""
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise MethodSpecError(f"method dict {dict(spec)!r} has no 'name' key")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        if type(spec) not in _METHODS.values():
            raise MethodSpecError(
                f"{spec!r} is not a method: give a name, a dict or an instance of a registered method"
            )
        return spec
    cls = method_class(name)
    valid = hyperparameters(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise MethodSpecError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for method {name!r}; "
            f"valid: {', '.join(f'{k}={v!r}' for k, v in valid.items())}"
        )
    return cls(model, inputs, **kwargs)

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


def parse_method_spec(text: str) -> MethodSpec:
    """A method spec from the command line: ``vcd``, ``vcd:alpha=2,contrast=blank`` or a JSON object."""
    import json

    import yaml

    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise MethodSpecError(f"method spec {text!r} is not valid JSON: {err.msg}") from err
        if not isinstance(spec, dict):
            raise MethodSpecError(f"method spec {text!r} must be a JSON object")
        return spec
    name, _, params = text.partition(":")
    if not params:
        return name
    spec: dict[str, Any] = {"name": name}
    for item in _split_top_level(params):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MethodSpecError(f"method spec {text!r}: expected key=value, got {item!r}")
        try:
            spec[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise MethodSpecError(
                f"method spec {text!r}: cannot read the value of {key.strip()!r}: {value!r}"
            ) from err
    return spec


def _split_top_level(params: str) -> list[str]:
    """``a=1,dims=[0,1],layers="2,6"`` -> ``["a=1", "dims=[0,1]", 'layers="2,6"']``: commas inside
    brackets or quotes belong to the value (VISTA's official ``"25,30"`` strings)."""
    items, depth, quote, current = [], 0, "", ""
    for char in params:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        else:
            depth += char in "[{("
            depth -= char in "]})"
        if char == "," and depth == 0 and not quote:
            items.append(current)
            current = ""
        else:
            current += char
    return [*items, current]


def validate_spec(spec: MethodSpec) -> None:
    """Check a name or dict spec without building it (unknown names and hyper-parameters raise)."""
    if isinstance(spec, str):
        method_class(spec)
        return
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise MethodSpecError(f"method dict {dict(spec)!r} has no 'name' key")
        valid = hyperparameters(method_class(spec["name"]))
        unknown = sorted(set(spec) - {"name"} - set(valid))
        if unknown:
            raise MethodSpecError(
                f"unknown hyper-parameter(s) {', '.join(unknown)} for method {spec['name']!r}; "
                f"valid: {', '.join(f'{k}={v!r}' for k, v in valid.items())}"
            )


def build_method(spec: MethodSpec, model: nn.Module, inputs: Inputs) -> object:
    """Instantiate one method from a name, a ``{"name": ..., **hyper-parameters}`` dict or an instance."""
    if not isinstance(spec, (str, Mapping)):
        if type(spec) not in _METHODS.values():
            raise MethodSpecError(
                f"{spec!r} is not a method: give a name, a dict or an instance of a registered method"
            )
        return spec
    validate_spec(spec)
    if isinstance(spec, str):
        return method_class(spec)(model, inputs)
    return method_class(spec["name"])(model, inputs, **{k: v for k, v in spec.items() if k != "name"})

"""Registry of methods by name, and construction from user specs.

A method is given to :func:`veridical.generate` as a registered name (``"vcd"``), a dict with a
``name`` key plus hyper-parameters (``{"name": "vcd", "alpha": 2.0}``), or an instance already built
for the same inputs. Names and hyper-parameter values are checked here (:func:`validate_spec`, with
each class's ``hyperparameter_rules``, see :mod:`veridical.params`) so that a typo or an out-of-range
value fails before any model is loaded.

Importing this module does not import torch; the first call that needs the methods
(:func:`list_methods`, :func:`method_class`, :func:`validate_spec`, ...) imports
:mod:`veridical.decoders` and :mod:`veridical.heads`, which register the built-in methods.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from veridical.errors import MethodSpecError
from veridical.params import Rule, check_values

if TYPE_CHECKING:
    from torch import nn

    from veridical.adapters import Inputs

T = TypeVar("T", bound=type)
MethodSpec = str | Mapping[str, Any] | object

_METHODS: dict[str, type] = {}
#: Arguments every method constructor takes before its hyper-parameters.
_CONTEXT_ARGS = ("model", "inputs")
#: Packages whose import registers the built-in methods.
_BUILTIN_PACKAGES = ("veridical.decoders", "veridical.heads")
_builtins_loaded = False


def _load_builtin_methods() -> None:
    """Import the packages that register the built-in methods (once; they import torch)."""
    global _builtins_loaded
    if not _builtins_loaded:
        for package in _BUILTIN_PACKAGES:
            importlib.import_module(package)
        _builtins_loaded = True


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
    _load_builtin_methods()
    return sorted(_METHODS)


def hyperparameters(cls: type) -> dict[str, Any]:
    """Hyper-parameter names of a method class with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {
        name: p.default
        for name, p in params.items()
        if name not in ("self", *_CONTEXT_ARGS) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def hyperparameter_rules(cls: type) -> dict[str, Rule]:
    """The ``hyperparameter_rules`` a method class declares (``{}`` for a class without any)."""
    return dict(getattr(cls, "hyperparameter_rules", {}))


def check_hyperparameters(method: object, values: Mapping[str, Any]) -> None:
    """Check ``values`` against the rules of ``method`` (an instance or class); constructors call
    ``check_hyperparameters(self, locals())``. Names without a rule are left alone."""
    cls = method if isinstance(method, type) else type(method)
    check_values(getattr(cls, "method_name", cls.__name__), hyperparameter_rules(cls), values)


def method_class(name: str) -> type:
    """The class registered as ``name``."""
    _load_builtin_methods()
    if not isinstance(name, str):
        raise MethodSpecError(f"a method name must be a string, got {name!r}")
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
            spec[key.strip()] = _value(value)
        except yaml.YAMLError as err:
            raise MethodSpecError(
                f"method spec {text!r}: cannot read the value of {key.strip()!r}: {value!r}"
            ) from err
    return spec


#: Numbers YAML 1.1 reads as strings: ``1e-3``, ``1e+3``, ``2E5`` (it wants a dot in a float).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _value(text: str) -> Any:
    """A command-line value as YAML reads it, except that an unquoted number in exponent form is a
    number (YAML 1.1 reads ``1e-3`` as a string) and ``None`` (Python's spelling) is None."""
    import yaml

    bare = text.strip()
    if bare == "None":
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str) and _NUMBER.fullmatch(bare):
        return float(bare)
    return value


def parse_method_stack(text: str) -> list[MethodSpec]:
    """The methods of one stack from the command line: ``vanilla`` -> ``[]``, ``var+vcd:alpha=2`` ->
    ``["var", {"name": "vcd", "alpha": 2}]``.

    Methods are joined by ``+``; a ``+`` inside a value (``vcd:alpha=1e+3``), inside quotes or inside
    brackets or a JSON object is not a separator. Each part is read by :func:`parse_method_spec`;
    names and values are not checked here (:func:`validate_spec` does).
    """
    text = text.strip()
    if text == "vanilla":
        return []
    specs = []
    for part in _split_stack(text):
        part = part.strip()
        if not part:
            raise MethodSpecError(
                f"method stack {text!r} has an empty method: join methods with one '+' (var+vcd)"
            )
        if part == "vanilla":
            raise MethodSpecError(
                f"method stack {text!r}: 'vanilla' means no method and is not stacked with others"
            )
        specs.append(parse_method_spec(part))
    return specs


#: What follows a ``+`` that joins two methods: a method name (then ``:``, ``+`` or the end) or a
#: JSON object; or another ``+`` or the end (an empty method, refused). ``1e+3`` is none of these.
_NEXT_METHOD = re.compile(r"\s*([A-Za-z_]\w*\s*(:|\+|$)|\{|\+|$)")


def _split_stack(text: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "+" and depth == 0 and (i == 0 or _NEXT_METHOD.match(text, i + 1)):
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


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
    """Check a name or dict spec without building it and without a model: unknown names and
    hyper-parameters, and every value against its method's ``hyperparameter_rules``, raise
    :class:`MethodSpecError` (one line)."""
    if isinstance(spec, str):
        method_class(spec)
        return
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise MethodSpecError(f"method dict {dict(spec)!r} has no 'name' key")
        cls = method_class(spec["name"])
        valid = hyperparameters(cls)
        unknown = sorted(set(spec) - {"name"} - set(valid), key=str)
        if unknown:
            raise MethodSpecError(
                f"unknown hyper-parameter(s) {', '.join(map(str, unknown))} for method {spec['name']!r}; "
                f"valid: {', '.join(f'{k}={v!r}' for k, v in valid.items())}"
            )
        check_values(spec["name"], hyperparameter_rules(cls), {k: v for k, v in spec.items() if k != "name"})


def build_method(spec: MethodSpec, model: nn.Module, inputs: Inputs) -> object:
    """Instantiate one method from a name, a ``{"name": ..., **hyper-parameters}`` dict or an instance."""
    if not isinstance(spec, (str, Mapping)):
        _load_builtin_methods()
        if type(spec) not in _METHODS.values():
            raise MethodSpecError(
                f"{spec!r} is not a method: give a name, a dict or an instance of a registered method"
            )
        return spec
    validate_spec(spec)
    if isinstance(spec, str):
        return method_class(spec)(model, inputs)
    return method_class(spec["name"])(model, inputs, **{k: v for k, v in spec.items() if k != "name"})

"""Hyper-parameter rules: one place that says which values each method's hyper-parameters accept.

Every registered method class declares ``hyperparameter_rules``, a dict from each constructor
hyper-parameter to a rule::

    hyperparameter_rules = {"alpha": Real(0), "beta": Real(0, 1), "contrast": Choice("noise", "blank")}

A rule checks a value without any model (:meth:`Rule.check` raises
:class:`~veridical.errors.MethodSpecError` with one line naming the method, the parameter, the value
and what is allowed) and describes its range for listings (:meth:`Rule.describe`: ``[0, inf)``,
``(0, 1]``, ``noise|blank``). :func:`veridical.registry.validate_spec` applies the rules before any
model is loaded, and each constructor applies them again, so a method built by hand refuses the same
values. Checks that need the model (layers within its depth, sink dimensions within its width) stay
in the constructors.

Numbers: NaN, infinities, booleans and non-numbers are refused wherever a number is expected (a NaN
contrast weight silently empties every output); integers are accepted where a real is expected.

This module does not import torch.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from veridical.errors import MethodSpecError

__all__ = [
    "Choice",
    "Custom",
    "Flag",
    "Integer",
    "Layers",
    "Optional",
    "Real",
    "Rule",
    "check_values",
]


def _number(x: float) -> str:
    """``0``, ``0.5``, ``1e-06``, ``inf``: how a bound is written in messages and listings."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Rule:
    """What one hyper-parameter accepts."""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def requirement(self) -> str:
        """What the value must be, for error messages: ``a finite number >= 0``."""
        raise NotImplementedError

    def describe(self) -> str:
        """The range or choices, for listings: ``[0, inf)``, ``noise|blank|no_image``."""
        raise NotImplementedError

    def check(self, method: str, param: str, value: Any) -> None:
        """Raise :class:`MethodSpecError` (one line) unless ``value`` is accepted."""
        if not self.accepts(value):
            raise MethodSpecError(f"{method}: {param} must be {self.requirement()}, got {value!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class Real(Rule):
    """A finite real number (an int is accepted) in ``[low, high]``; ``low_open``/``high_open`` exclude
    a bound. ``None`` bounds are infinite."""

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ):
        self.low = -math.inf if low is None else float(low)
        self.high = math.inf if high is None else float(high)
        # An infinite bound is never reached by a finite number: always open.
        self.low_open = low_open or math.isinf(self.low)
        self.high_open = high_open or math.isinf(self.high)

    def accepts(self, value: Any) -> bool:
        if not _is_real(value) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def _bounds(self) -> str:
        low, high = math.isinf(self.low), math.isinf(self.high)
        if low and high:
            return ""
        if high:
            return f" {'>' if self.low_open else '>='} {_number(self.low)}"
        if low:
            return f" {'<' if self.high_open else '<='} {_number(self.high)}"
        return f" in {self.describe()}"

    def requirement(self) -> str:
        return f"a finite number{self._bounds()}"

    def describe(self) -> str:
        return (
            f"{'(' if self.low_open else '['}{_number(self.low)}, "
            f"{_number(self.high)}{')' if self.high_open else ']'}"
        )


class Integer(Rule):
    """An integer (not a bool, not a float such as ``2.0``) in ``[low, high]``; ``None`` bounds are
    infinite. ``text`` replaces the range in messages and listings (``"a 64-bit integer"``)."""

    def __init__(self, low: int | None = None, high: int | None = None, text: str | None = None):
        self.low, self.high, self.text = low, high, text

    def accepts(self, value: Any) -> bool:
        return (
            _is_integer(value)
            and (self.low is None or value >= self.low)
            and (self.high is None or value <= self.high)
        )

    def requirement(self) -> str:
        if self.text:
            return self.text
        if self.low is None and self.high is None:
            return "an integer"
        if self.high is None:
            return f"an integer >= {self.low}"
        if self.low is None:
            return f"an integer <= {self.high}"
        return f"an integer in [{self.low}, {self.high}]"

    def describe(self) -> str:
        if self.text:
            return self.text.removeprefix("an ").removeprefix("a ")
        low = "(-inf" if self.low is None else f"[{self.low}"
        high = "inf)" if self.high is None else f"{self.high}]"
        return f"integer {low}, {high}"


class Choice(Rule):
    """One of a fixed set of values (compared with their type: ``True`` is not ``1``)."""

    def __init__(self, *values: Any):
        if not values:
            raise ValueError("Choice needs at least one value")
        self.values = values

    def accepts(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def requirement(self) -> str:
        return f"one of {', '.join(map(str, self.values))}"

    def describe(self) -> str:
        return "|".join(map(str, self.values))


class Flag(Rule):
    """``True`` or ``False`` (not ``1``, not ``"yes"``)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def requirement(self) -> str:
        return "true or false"

    def describe(self) -> str:
        return "true|false"


class Optional(Rule):
    """``None`` or what ``rule`` accepts."""

    def __init__(self, rule: Rule):
        self.rule = rule

    def accepts(self, value: Any) -> bool:
        return value is None or self.rule.accepts(value)

    def requirement(self) -> str:
        return f"{self.rule.requirement()} or None"

    def describe(self) -> str:
        return f"{self.rule.describe()} or None"


class Layers(Rule):
    """Decoder layers: one index or a non-empty list of them, and, where a method takes its official
    code's strings, a string of comma-separated integers (``"25,30"``).

    ``negative``: indices may count from the end (``-1``). ``forms``: how many integers an official
    string may hold (``(2,)`` for ``"a,b"``, ``(2, 4)`` adds ``"a,b,c,d"``); none: no strings.
    Whether the layers exist is the constructor's check (it needs the model's depth).
    """

    def __init__(self, negative: bool = False, forms: Sequence[int] = ()):
        self.negative, self.forms = negative, tuple(forms)

    def _index(self, value: Any) -> bool:
        return _is_integer(value) and (self.negative or value >= 0)

    def accepts(self, value: Any) -> bool:
        if isinstance(value, str):
            parts = value.split(",")
            try:
                [int(part) for part in parts]
            except ValueError:
                return False
            return len(parts) in self.forms
        if self._index(value):
            return True
        return (
            isinstance(value, Sequence)
            and not isinstance(value, bytes)
            and len(value) > 0
            and all(self._index(i) for i in value)
        )

    def _strings(self) -> list[str]:
        return [f"'{','.join('abcd'[:count])}'" for count in self.forms]

    def requirement(self) -> str:
        index = "a layer index" if self.negative else "a layer index >= 0"
        strings = f" or a string {' or '.join(self._strings())}" if self.forms else ""
        return f"{index} or a non-empty list of them{strings}"

    def describe(self) -> str:
        return " | ".join(["layer indices" if self.negative else "layer indices >= 0", *self._strings()])


class Custom(Rule):
    """Anything else: ``accepts(value) -> bool``, with its ``requirement`` and ``description`` text."""

    def __init__(self, accepts: Callable[[Any], bool], requirement: str, description: str):
        self._accepts, self._requirement, self._description = accepts, requirement, description

    def accepts(self, value: Any) -> bool:
        try:
            return bool(self._accepts(value))
        except (TypeError, ValueError):
            return False

    def requirement(self) -> str:
        return self._requirement

    def describe(self) -> str:
        return self._description


def existing_file(value: Any) -> bool:
    """``value`` is a path (str or ``os.PathLike``) of an existing file."""
    return isinstance(value, (str, os.PathLike)) and os.path.isfile(value)


def check_values(method: str, rules: Mapping[str, Rule], values: Mapping[str, Any]) -> None:
    """Check every value of ``values`` that has a rule; the first bad one raises."""
    for param, rule in rules.items():
        if param in values:
            rule.check(method, param, values[param])

"""What a protocol is: named settings per benchmark, each with the official line it comes from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from veridical.errors import VeridicalError
from veridical.evals.samples import CHAIR_PROMPT

BENCHMARKS = ("pope", "chair")
GENERATION_KEYS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "num_beams",
    "repetition_penalty",
)
#: Generation settings that only shape sampling.
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
PROMPT_KEYS = ("question_suffix", "instruction", "template")
#: Kept in ``results.json`` as a record of the script; not applied (see :mod:`veridical.evals.protocols`).
RECORDED_KEYS = ("seed",)
#: The default CHAIR request (also OPERA's, ``chair_eval.py`` line 166).
DEFAULT_INSTRUCTION = CHAIR_PROMPT


class ProtocolError(VeridicalError):
    """An unknown protocol, or a protocol that does not define the requested benchmark."""


@dataclass(frozen=True)
class Setting:
    """One value of a protocol and where the official code sets it."""

    value: Any
    source: str


@dataclass(frozen=True)
class BenchmarkProtocol:
    settings: Mapping[str, Setting]
    #: ``model.config.model_type`` -> settings that replace or add to ``settings`` for that family.
    families: Mapping[str, Mapping[str, Setting]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    benchmarks: Mapping[str, BenchmarkProtocol]
    #: benchmark -> why the protocol does not define it.
    missing: Mapping[str, str] = field(default_factory=dict)
    #: Let each method's paper decoding (``generation_defaults``) fill the decoding (default only).
    method_generation: bool = False

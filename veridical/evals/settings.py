"""Checks of ``generate()`` settings before a run starts.

transformers checks few values when a :class:`~transformers.GenerationConfig` is built (``num_beams=0``,
``temperature=-1`` and unknown keys pass) and fails later, mid-run or with a traceback; an eval checks
them here first. Keys must be :class:`~transformers.GenerationConfig` fields.
"""

from __future__ import annotations

from typing import Any

from veridical.errors import VeridicalError
from veridical.params import Choice, Flag, Integer, Real, Rule


class GenerationSettingsError(VeridicalError):
    """A generation setting that ``generate()`` would reject or misread."""


#: Values checked here (with the methods' rule types); other fields go through
#: ``GenerationConfig.validate``.
RULES: dict[str, Rule] = {
    "max_new_tokens": Integer(1),
    "min_new_tokens": Integer(0),
    "max_length": Integer(1),
    "num_beams": Integer(1),
    "num_beam_groups": Integer(1),
    "num_return_sequences": Integer(1),
    "top_k": Integer(0),
    "no_repeat_ngram_size": Integer(0),
    "temperature": Real(0, low_open=True),
    "top_p": Real(0, 1, low_open=True),
    "min_p": Real(0, 1),
    "typical_p": Real(0, 1, low_open=True),
    "repetition_penalty": Real(0, low_open=True),
    "length_penalty": Real(),
    "do_sample": Flag(),
    "early_stopping": Choice(True, False, "never"),
}


def check_generation(settings: dict[str, Any], source: str = "generation settings") -> None:
    """Raise :class:`GenerationSettingsError` (one line) for an unknown key or a bad value."""
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict())
    unknown = sorted(set(settings) - known)
    if unknown:
        raise GenerationSettingsError(
            f"{source}: unknown generate() setting(s) {', '.join(unknown)}; "
            "use transformers.GenerationConfig field names (e.g. max_new_tokens, num_beams, top_p)"
        )
    for key, value in settings.items():
        if key in RULES and not RULES[key].accepts(value):
            raise GenerationSettingsError(
                f"{source}: {key} must be {RULES[key].requirement()}, got {value!r}"
            )
    try:
        GenerationConfig(**settings).validate()  # raises on contradictions, warns on unused flags
    except (ValueError, TypeError) as err:
        lines = [line.strip("- ") for line in str(err).splitlines() if line.strip()]
        raise GenerationSettingsError(f"{source}: {' '.join(lines) or type(err).__name__}") from None

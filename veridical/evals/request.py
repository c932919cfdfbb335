"""What one ``veridical eval`` run is asked to do, as a value: the command line and sweeps both build one.

:class:`EvalRequest` holds every option of ``veridical eval`` with the command line's defaults, the
methods already parsed into specs; :meth:`EvalRequest.check` refuses values of the wrong kind or
range in one line (the command line's argument types do the same for typed text), so a sweep file's
``batch_size: 0`` is refused as ``--batch-size 0`` is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from veridical.errors import VeridicalError

BENCHMARKS = ("pope", "chair")
#: Options that are text when given (paths, names, prompt parts).
OPTIONAL_TEXT = (
    "images",
    "questions",
    "pope_set",
    "hf_dataset",
    "hf_category",
    "gt",
    "coco_annotations",
    "synonyms",
    "protocol",
    "prompt",
    "question_suffix",
    "prompt_template",
    "output",
)


@dataclass
class EvalRequest:
    benchmark: str
    model: str
    #: Method specs of the stack (names, dicts or built methods), in order.
    methods: list[Any] = field(default_factory=list)
    # data
    images: str | None = None
    questions: str | None = None
    pope_set: str | None = None
    hf_dataset: str | None = None
    hf_split: str = "test"
    hf_category: str | None = None
    gt: str | None = None
    coco_annotations: str | None = None
    synonyms: str | None = None
    num_images: int = 500
    limit: int | None = None
    # protocol, prompt and decoding (None: the protocol's)
    protocol: str | None = None
    prompt: str | None = None
    question_suffix: str | None = None
    prompt_template: str | None = None
    #: Explicit ``generate()`` settings; they override the protocol's and are recorded as overrides.
    generation: dict[str, Any] = field(default_factory=dict)
    rule: str | None = None
    # how to run
    batch_size: int = 8
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    output: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    progress: bool = True

    def check(self) -> EvalRequest:
        """Refuse a value of the wrong type or range (one line naming the option); returns itself."""
        from veridical.evals.pope import PARSERS

        if self.benchmark not in BENCHMARKS:
            raise VeridicalError(f"benchmark must be pope or chair, got {self.benchmark!r}")
        for name in ("model", "dtype", "device", "hf_split"):
            _text(name, getattr(self, name), required=True)
        for name in OPTIONAL_TEXT:
            _text(name, getattr(self, name))
        _integer("batch_size", self.batch_size, 1)
        _integer("num_images", self.num_images, 1)
        _integer("seed", self.seed, 0)
        if self.limit is not None:
            _integer("limit", self.limit, 1)
        if self.rule is not None and self.rule not in PARSERS:
            raise VeridicalError(f"rule must be one of {', '.join(sorted(PARSERS))}, got {self.rule!r}")
        if not isinstance(self.generation, dict) or not all(isinstance(k, str) for k in self.generation):
            raise VeridicalError(f"generation must map setting names to values, got {self.generation!r}")
        for name in ("compile", "overwrite", "dry_run", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise VeridicalError(f"{name} must be true or false, got {getattr(self, name)!r}")
        return self


def _text(name: str, value: Any, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise VeridicalError(f"{name} must be text, got {value!r}")


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise VeridicalError(f"{name} must be {kind}, got {value!r}")

"""What every head method shares: construction checks, layer choice, attach/detach as a context manager."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import LogitsProcessor

from veridical.adapters import Inputs, ModelAdapter, get_adapter
from veridical.attention import AttentionHook, intercept_attention
from veridical.errors import UnsupportedModelError
from veridical.layers import REFERENCE_DEPTH, check_layers, layer_range, scale_index

__all__ = ["REFERENCE_DEPTH", "HeadMethod", "check_layers", "layer_range", "prefill_columns", "scale_index"]

#: Spare key columns held by :func:`prefill_columns`: eager decoding (one new key column per step)
#: rebuilds what a method decided at prefill once every this many steps, not at every layer and step.
SPARE_COLUMNS = 64


def prefill_columns(
    store: MutableMapping[Any, Any], key: Any, build: Callable[[int], torch.Tensor], rows: int, keys: int
) -> torch.Tensor:
    """``build(width)`` (a tensor over ``width`` key columns, first dimension ``rows``), cut to ``keys``.

    What a method decided at prefill (sink columns, image columns and what follows from them) is the
    same at every decoding step but for its width, which grows by one key column per step; generated
    columns are zeros (``False``). Built once with :data:`SPARE_COLUMNS` spare columns and kept in
    ``store`` (the sequence's store, new at every prefill) under ``key``; a forward with more key
    columns or another row count rebuilds it. A static cache (compiled decoding) has the same width
    at prefill and every step, so the compiled step only reads the tensor, never rebuilds it.
    """
    found = store.get(key)
    if found is None or found.shape[-1] < keys or found.shape[0] != rows:
        found = store[key] = build(keys + SPARE_COLUMNS)
    return found if found.shape[-1] == keys else found[..., :keys]


class HeadMethod(AttentionHook, AbstractContextManager):
    """A registered attention intervention: ``with Method(model, inputs): model.generate(**inputs)``.

    Subclasses set :attr:`layers` (or pass ``layers=`` through), implement the ``edit_*`` hooks of
    :class:`~veridical.attention.AttentionHook`, and may override :meth:`prepare` for work that must
    run once before generation (measurements on the inputs). A method that also changes the
    next-token distribution exposes it as :attr:`logits_processor`, which :func:`veridical.generate`
    adds for you.
    """

    #: Families the method applies to; ``None``: every supported family.
    families: ClassVar[tuple[str, ...] | None] = None
    logits_processor: LogitsProcessor | None = None

    def __init__(self, model: nn.Module, inputs: Inputs):
        self.model = model
        self.adapter: ModelAdapter = get_adapter(model)
        if self.families is not None and self.adapter.family not in self.families:
            raise UnsupportedModelError(
                f"{type(self).__name__} applies to {', '.join(self.families)} models, "
                f"not to {self.adapter.family}"
            )
        self.adapter.validate_inputs(inputs)
        self.inputs = inputs
        self._attached: AbstractContextManager | None = None

    @property
    def prompts(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    def prepare(self) -> None:
        """Work done once on entry, before any hooked forward (default: nothing)."""

    def hooks(self) -> list[AttentionHook]:
        return [self]

    def __enter__(self) -> HeadMethod:
        if self._attached is not None:
            raise RuntimeError(
                f"{type(self).__name__} is already attached; build one instance per generate() call"
            )
        self.prepare()
        self._attached = intercept_attention(self.model, *self.hooks())
        self._attached.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        attached, self._attached = self._attached, None
        if attached is not None:
            attached.__exit__(*exc)

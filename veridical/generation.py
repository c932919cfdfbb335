"""``veridical.generate``: one call that stacks decoders and head methods on ``model.generate``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from veridical.adapters import Inputs
from veridical.decoders.contrastive import ContrastiveDecoder
from veridical.errors import MethodSpecError
from veridical.fusion import BranchFusion
from veridical.registry import MethodSpec, build_method


def generate(
    model: nn.Module, inputs: Inputs, methods: Sequence[MethodSpec] = (), **generate_kwargs: Any
) -> Any:
    """``model.generate(**inputs, **generate_kwargs)`` with ``methods`` applied.

    Decoders (logits processors) are appended after any ``logits_processor`` the caller passes;
    head methods (context managers) are active for exactly the span of the call and removed
    afterwards, also when generation raises. Contrast branches run batched with the main rows
    (:mod:`veridical.fusion`). ``methods=[]`` is exactly ``model.generate``.
    """
    if not methods:
        return model.generate(**inputs, **generate_kwargs)
    built = [build_method(spec, model, inputs) for spec in methods]
    # A method that is its own generation loop (OPERA) replaces model.generate; at most one can.
    loops = [m for m in built if hasattr(m, "custom_generate")]
    if len(loops) > 1:
        names = ", ".join(type(m).__name__ for m in loops)
        raise MethodSpecError(f"{names} each run their own generation loop; use at most one of them")
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    with ExitStack() as stack:
        for method in built:
            if isinstance(method, LogitsProcessor):
                processors.append(method)
                continue
            if method in loops:
                continue
            stack.enter_context(method)
            # A head method that also reweights the next token (PAI's text-only contrast) exposes it.
            extra = getattr(method, "logits_processor", None)
            if extra is not None:
                processors.append(extra)
        if loops:
            return loops[0].custom_generate(logits_processor=processors, **generate_kwargs)
        branched = [p for p in processors if isinstance(p, ContrastiveDecoder)]
        if branched:
            stack.enter_context(BranchFusion(model, branched))
        return model.generate(**inputs, logits_processor=processors, **generate_kwargs)

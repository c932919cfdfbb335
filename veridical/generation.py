"""``veridical.generate``: one call that stacks decoders and head methods on ``model.generate``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from torch import nn
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

from veridical.adapters import Inputs, check_generate_inputs
from veridical.contrastive import ContrastiveDecoder
from veridical.errors import MethodSpecError
from veridical.fusion import BranchFusion
from veridical.registry import MethodSpec, build_method, validate_spec


def generate(
    model: nn.Module,
    inputs: Inputs,
    methods: Sequence[MethodSpec] = (),
    *,
    compile: bool = False,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate(**inputs, **generate_kwargs)`` with ``methods`` applied.

    Decoders (logits processors) are appended after any ``logits_processor`` the caller passes;
    head methods (context managers) are active for exactly the span of the call and removed
    afterwards, also when generation raises. Contrast branches run batched with the main rows
    (:mod:`veridical.fusion`). ``methods=[]`` is exactly ``model.generate``.

    Every call, ``methods=[]`` included, refuses (:class:`~veridical.errors.InputError`) an empty
    batch, right-padded rows and image tokens that do not match the images; every method spec is
    checked (:func:`~veridical.registry.validate_spec`) before any method is built.

    ``compile=True`` decodes with a static cache and transformers' compiled decoding step (on any
    device, CPU included): the prefill stays eager, each decode step replays one graph. A
    ``cache_implementation`` or ``compile_config`` the caller passes wins. A method that runs its own
    generation loop (OPERA) runs it eagerly: its rollback re-decodes from an earlier position and its
    look-ahead forwards take a different set of rows at each step, which one fixed graph cannot replay.
    """
    methods = _method_list(methods)
    check_generate_inputs(model, inputs)
    if not methods:
        return model.generate(**inputs, **_compiled(generate_kwargs, compile))
    for spec in methods:
        if isinstance(spec, (str, Mapping)):
            validate_spec(spec)
    built = [build_method(spec, model, inputs) for spec in methods]
    caller = generate_kwargs.pop("logits_processor", None)
    loops, processors = check_stack(built, generate_kwargs, caller)
    if not loops:
        generate_kwargs = _compiled(generate_kwargs, compile)
    with ExitStack() as stack:
        for method in built:
            # Head methods and processors that read the forward (DeCo) attach hooks for the call;
            # contrastive decoders join the fusion below; a method with its own loop runs it.
            if method not in loops and not isinstance(method, ContrastiveDecoder):
                if hasattr(method, "__enter__"):
                    stack.enter_context(method)
        if loops:
            return loops[0].custom_generate(logits_processor=processors, **generate_kwargs)
        branched = [p for p in processors if isinstance(p, ContrastiveDecoder)]
        if branched:
            stack.enter_context(BranchFusion(model, branched))
        return model.generate(**inputs, logits_processor=processors, **generate_kwargs)


def check_stack(
    built: Sequence[object], generate_kwargs: Mapping[str, Any], logits_processor: Any = None
) -> tuple[list[object], LogitsProcessorList]:
    """Check that built methods can run together with ``generate_kwargs``, without generating.

    Returns the method that is its own generation loop (OPERA; at most one), and the logits
    processors in order: the caller's, then each decoder and each head method's next-token
    reweighting (PAI's text-only contrast) in the order of ``built``. ``veridical eval`` calls it
    before a run starts, so a stack that cannot run fails before anything is written.
    """
    loops = [m for m in built if hasattr(m, "custom_generate")]
    if len(loops) > 1:
        names = ", ".join(type(m).__name__ for m in loops)
        raise MethodSpecError(f"{names} each run their own generation loop; use at most one of them")
    processors = LogitsProcessorList(logits_processor or [])
    for method in built:
        if isinstance(method, LogitsProcessor):
            processors.append(method)
        elif getattr(method, "logits_processor", None) is not None:
            processors.append(method.logits_processor)
    if loops:
        loops[0].check_generation(processors, **generate_kwargs)
    return loops, processors


def _compiled(generate_kwargs: dict[str, Any], compile: bool) -> dict[str, Any]:
    """``generate_kwargs`` with a static cache and :func:`compile_everywhere` when ``compile``."""
    if compile:
        generate_kwargs.setdefault("cache_implementation", "static")
        generate_kwargs.setdefault("compile_config", compile_everywhere())
    return generate_kwargs


def compile_everywhere() -> CompileConfig:
    """A one-graph compile configuration that generate() also applies off CUDA (transformers compiles
    the decoding step only on CUDA unless ``_compile_all_devices`` is set: generation/utils.py,
    ``_valid_auto_compile_criteria``)."""
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True
    return config


def _method_list(methods: Any) -> list[MethodSpec]:
    """``methods`` as a list; a lone name, dict or method is refused with the list to write instead."""
    if methods is None:
        return []
    if isinstance(methods, (str, Mapping)):
        shown = repr(methods if isinstance(methods, str) else dict(methods))
        raise MethodSpecError(
            f"methods must be a list of methods, got the {type(methods).__name__} {shown}: "
            f"pass methods=[{shown}]"
        )
    if not isinstance(methods, Iterable):
        raise MethodSpecError(
            f"methods must be a list of methods, got one {type(methods).__name__}: pass methods=[method]"
        )
    return list(methods)

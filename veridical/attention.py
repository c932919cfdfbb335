"""Attention interception: read and rewrite attention inside the text decoder of a loaded model.

Head methods (VAR, VHR, PAI, ACT, ...) and OPERA need the attention probabilities of some layers, or
the per-head outputs before ``o_proj``. transformers 5 picks each attention module's kernel by name
from ``AttentionInterface``; veridical registers one more kernel, ``"veridical"``, and switches only
the text decoder to it while hooks are attached. In a layer with no hook that needs probabilities it
runs sdpa; in a layer that does, it runs eager attention and lets the hooks edit

- the pre-softmax scores (after the causal/padding mask is added),
- the post-softmax probabilities ``(batch, heads, queries, keys)``,
- the per-head outputs ``(batch, queries, heads, head_dim)`` before ``o_proj`` (in every hooked layer,
  sdpa ones included),

and observe the residual stream entering a layer (:meth:`AttentionHook.observe_layer_input`).

Every edit receives a :class:`ForwardContext`: which key columns hold image tokens, which are padding,
how many positions were cached before this forward, and a per-sequence store where a method keeps
what it decided at prefill (VAR's sinks, ACT's sink columns). The context is tracked per KV cache, so a
contrast branch that runs the same model on another prompt (VCD's image-free prompt, say) gets its
own image positions and its own store.

Hooks live on the attention modules of one model, so two models in one process never see each
other's hooks. Attaching and detaching is not thread-safe for one model: do not run two
``generate`` calls with different methods on the same model object concurrently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from veridical.adapters import ModelAdapter, get_adapter
from veridical.errors import InputError
from veridical.outputs import output_cache

ATTENTION_NAME = "veridical"
_HOOKS = "_veridical_hooks"
_STATE = "_veridical_attention_state"


@contextmanager
def _scoped(local: threading.local, name: str, value: Any, default: Any) -> Iterator[None]:
    """``local.name`` set to ``value`` inside the block, then back to what it was (``default`` if unset)."""
    previous = getattr(local, name, default)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, previous)


_PROMPTS = threading.local()


def running_prompts(indices: list[int]) -> AbstractContextManager[None]:
    """Forwards inside run only these prompts of the batch a method was built for (OPERA decodes one
    prompt at a time): per-prompt method state is taken for them alone."""
    return _scoped(_PROMPTS, "indices", list(indices), None)


_FUSED = threading.local()


def fused_rows(segments: list[Segment] | None) -> None:
    """Declare the forward about to run as several sequences batched together (their segments in
    row order; see :mod:`veridical.fusion`), or ``None`` once it is done."""
    _FUSED.segments = segments


def prompt_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-prompt tensor for the ``rows`` of the running forward (see :func:`running_prompts`).

    In a forward of several sequences batched together, every sequence's rows get what they would
    get in a forward of their own.
    """
    segments = getattr(_FUSED, "segments", None)
    if segments and rows == sum(segment.rows for segment in segments):
        return torch.cat([_prompt_rows(tensor, segment.rows, segment.prompt) for segment in segments])
    return _prompt_rows(tensor, rows, None)


def _prompt_rows(tensor: torch.Tensor, rows: int, prompt: int | None) -> torch.Tensor:
    if prompt is not None:
        return expand_rows(tensor[prompt : prompt + 1], rows)
    indices = getattr(_PROMPTS, "indices", None)
    if indices is not None:
        tensor = tensor[indices]
    return expand_rows(tensor, rows)


def prompt_of_rows(prompts: int, rows: int) -> list[int] | None:
    """The prompt index of each row of the running forward, or ``None`` if the rows do not fit."""
    indices = getattr(_PROMPTS, "indices", None) or list(range(prompts))
    if rows % len(indices):
        return None
    per_prompt = rows // len(indices)
    return [indices[row // per_prompt] for row in range(rows)]


def expand_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` (first dim = prompts) repeated for ``rows`` rows, as generate expands beams."""
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] == 0 or rows % tensor.shape[0]:
        raise InputError(
            f"a method was built for {tensor.shape[0]} prompt(s) but the model ran {rows} row(s); "
            "build the method with the inputs you pass to generate()"
        )
    return tensor.repeat_interleave(rows // tensor.shape[0], dim=0)


def fit_keys(tensor: torch.Tensor, keys: int) -> torch.Tensor:
    """``tensor`` over prompt columns, cut or zero-padded (``False``) on the right to ``keys`` columns."""
    if tensor.shape[-1] >= keys:
        return tensor[..., :keys]
    pad = tensor.new_zeros(*tensor.shape[:-1], keys - tensor.shape[-1])
    return torch.cat([tensor, pad], dim=-1)


_ALTERNATIVES = threading.local()


def alternative_tokens(width: int) -> AbstractContextManager[None]:
    """The forwards inside append ``width`` alternative next tokens to every row (OPERA's look-ahead
    candidates: each query sees the cache and itself only), so each of the last ``width`` queries is
    its row's newest token (:attr:`ForwardContext.newest`)."""
    return _scoped(_ALTERNATIVES, "width", width, 1)


_AUXILIARY = threading.local()


@contextmanager
def auxiliary_forwards() -> Iterator[None]:
    """Mark the forwards run inside as veridical's own (contrast branches, measurements).

    Hooks still edit them; methods that read the model's *main* forward (VISTA's logits
    augmentation) skip sequences started here.
    """
    _AUXILIARY.depth = getattr(_AUXILIARY, "depth", 0) + 1
    try:
        yield
    finally:
        _AUXILIARY.depth -= 1


def in_auxiliary_forward() -> bool:
    """Whether the running forward is veridical's own (see :func:`auxiliary_forwards`)."""
    return getattr(_AUXILIARY, "depth", 0) > 0


@dataclass
class SequenceState:
    """What is known about one sequence (one KV cache) across its forwards."""

    #: ``(rows, prompt_len)``: prompt positions that hold image features.
    image_mask: torch.Tensor
    #: Started by veridical itself (see :func:`auxiliary_forwards`), not by the caller's generate().
    auxiliary: bool = False
    #: Per-method data decided at prefill, keyed by :attr:`AttentionHook.store_key`.
    store: dict[Any, Any] = field(default_factory=dict)

    @cached_property
    def has_image(self) -> bool:
        """Whether any row holds image tokens (asked once per sequence: a GPU sync)."""
        return bool(self.image_mask.any())


#: Attribute of a KV cache that holds several sequences' rows (see :mod:`veridical.fusion`).
SEGMENTS = "_veridical_segments"
#: Attribute of a KV cache that holds its :class:`SequenceState`. An attribute, not a dictionary keyed
#: by the cache: under ``torch.compile`` a lookup keyed by the cache object guards on that object, so
#: every ``generate()`` call (a new cache) would recompile the decoding step.
SEQUENCE = "_veridical_sequence"


@dataclass
class Segment:
    """Consecutive rows of a shared KV cache that belong to one sequence."""

    rows: int
    #: Columns of left padding that fit this sequence into the shared cache.
    pad: int
    #: The sequence's own state; ``None`` for the first (main) segment, known from the cache.
    sequence: SequenceState | None
    #: The prompt (of the batch the methods were built for) these rows decode, when only one.
    prompt: int | None = None


@dataclass
class ForwardContext:
    """One forward pass of the text decoder, as seen by the hooks."""

    sequence: SequenceState
    #: Positions already in the KV cache before this forward (0 at prefill).
    past: int
    #: Rows of this forward (prompts x beams).
    rows: int
    #: ``(rows, keys)`` or ``None``: key columns that are real tokens (not padding).
    valid_keys: torch.Tensor | None
    #: In a forward of several sequences batched together, ``(first row, left padding, context)`` of
    #: each: hooks edit each part in that sequence's own key columns, as in a forward of its own.
    parts: list[tuple[int, int, ForwardContext]] | None = None
    #: The one prompt all rows decode (a part of a forward over several prompts), if so.
    prompt: int | None = None
    #: Trailing queries that are each a row's newest token: 1, or the width of
    #: :func:`alternative_tokens`. Edits of "the last query" apply to all of them.
    newest: int = 1
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def is_prefill(self) -> bool:
        return self.past == 0

    def image_keys(self, keys: int) -> torch.Tensor:
        """``(rows, keys)`` boolean: key columns that hold image tokens (generated tokens never do)."""
        return self.once(
            "image_keys", lambda: fit_keys(expand_rows(self.sequence.image_mask, self.rows), keys), keys
        )

    def once(self, key: Any, compute: Callable[[], Any], keys: int | None = None) -> Any:
        """``compute()`` the first time ``key`` is asked in this forward: every hooked layer of a
        forward shares what only depends on the forward (image columns, per-key weights).

        A tensor over key columns passes ``keys``: it is recomputed for a layer with another key count.
        The count is compared, never part of ``key``: under ``torch.compile`` hashing it would fix the
        cache length into the graph, and every prompt length would compile a new one."""
        found = self._memo.get(key)
        if found is None or (keys is not None and found.shape[-1] != keys):
            found = self._memo[key] = compute()
        return found

    def query_positions(self, queries: int, device: torch.device) -> torch.Tensor:
        """Column index of each query of this forward."""
        return torch.arange(self.past, self.past + queries, device=device)

    def per_row(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor kept for this sequence (one row per prompt row at prefill) expanded to its rows."""
        return expand_rows(tensor, self.rows)

    def per_prompt(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-prompt tensor of the batch a method was built for, for this forward's rows."""
        return _prompt_rows(tensor, self.rows, self.prompt)


class AttentionHook:
    """One method's edits of attention. Override the ``edit_*`` methods you need.

    ``layers`` limits the hook to those text-decoder layer indices (``None``: all). Set
    ``needs_weights = False`` when only :meth:`edit_outputs` is used, so those layers keep sdpa, and
    ``observes_layer_inputs = True`` to receive :meth:`observe_layer_input` calls.
    """

    layers: Collection[int] | None = None
    needs_weights: bool = True
    observes_layer_inputs: bool = False
    _store_key: Any = None

    @property
    def store_key(self) -> Any:
        """This hook's key in :attr:`SequenceState.store`.

        While attached: its class name and how many hooks of that class the model had before it, the
        same in every ``generate()`` call with the same methods. A compiled decoding step guards on
        the store's keys; keyed by the hook object itself, every call (a new method object) would
        recompile it. Detached (a hook used by hand): the hook itself.
        """
        return self if self._store_key is None else self._store_key

    def edit_logits(self, module: nn.Module, logits: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        return logits

    def edit_weights(self, module: nn.Module, weights: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        return weights

    def edit_outputs(self, module: nn.Module, outputs: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        return outputs

    def observe_layer_input(self, layer_idx: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        """The residual stream ``(rows, queries, hidden)`` entering decoder layer ``layer_idx``."""


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    hooks: Collection[AttentionHook] = (),
    context: ForwardContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with hook points; softmax in float32 as the reference does.

    Grouped-query heads are multiplied against their shared key/value head directly (the queries of
    a group stacked), not against copies of it: the same numbers without copying the cache per head.
    """
    batch, heads, queries, dim = query.shape
    groups = heads // key.shape[1]
    grouped = query.reshape(batch, key.shape[1], groups * queries, dim)
    logits = torch.matmul(grouped, key.transpose(2, 3)).view(batch, heads, queries, -1) * scaling
    if attention_mask is not None:
        if attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        logits = logits + attention_mask
    logits = _edit(logits, hooks, "edit_logits", module, context, keyed=True)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights = _edit(weights, hooks, "edit_weights", module, context, keyed=True)
    if weights.dtype != query.dtype:
        weights = weights.to(query.dtype)
    if dropout and module.training:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    outputs = torch.matmul(weights.reshape(batch, key.shape[1], groups * queries, -1), value)
    outputs = outputs.view(batch, heads, queries, value.shape[-1]).transpose(1, 2).contiguous()
    return outputs, weights


def veridical_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered ``"veridical"`` attention kernel (see the module docstring)."""
    hooks = getattr(module, _HOOKS, ())
    context = current_context(module) if hooks else None
    weight_hooks = [h for h in hooks if h.needs_weights]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if weight_hooks or kwargs.get("output_attentions"):
        outputs, weights = eager_attention(
            module, query, key, value, attention_mask, scaling, dropout, weight_hooks, context
        )
    else:
        outputs, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    outputs = _edit(outputs, hooks, "edit_outputs", module, context, keyed=False)
    return outputs, weights


def _edit(
    tensor: torch.Tensor,
    hooks: Collection[AttentionHook],
    name: str,
    module: nn.Module,
    context: ForwardContext | None,
    keyed: bool,
) -> torch.Tensor:
    """Apply every hook's ``name`` edit; per sequence (its rows, its key columns) in a fused forward."""
    hooks = [hook for hook in hooks if _overrides(type(hook), name)]
    if not hooks:
        return tensor
    if context is None or context.parts is None:
        for hook in hooks:
            tensor = getattr(hook, name)(module, tensor, context)
        return tensor
    pieces = []
    for start, pad, part in context.parts:
        piece = tensor[start : start + part.rows]
        padding, piece = (piece[..., :pad], piece[..., pad:]) if keyed else (None, piece)
        for hook in hooks:
            piece = getattr(hook, name)(module, piece, part)
        pieces.append(torch.cat([padding, piece], dim=-1) if keyed and pad else piece)
    return torch.cat(pieces)


@cache
def _overrides(hook_type: type, name: str) -> bool:
    """Whether ``hook_type`` edits with ``name`` (the base class's edits return their input)."""
    return getattr(hook_type, name) is not getattr(AttentionHook, name)


AttentionInterface.register(ATTENTION_NAME, veridical_attention)
# Without a registered mask function a custom kernel silently receives no causal/padding mask.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)


class _InterceptionState:
    """Per-model bookkeeping: what to restore, the torch hooks, and the sequence being run."""

    def __init__(self, adapter: ModelAdapter, original: str | None):
        self.adapter = adapter
        self.original = original
        self.active = 0
        self.handles: list[Any] = []
        self.pending_ids: torch.Tensor | None = None
        self.current: ForwardContext | None = None
        #: Class names of the hooks attached so far (see :attr:`AttentionHook.store_key`).
        self.attached_types: list[str] = []

    # -- torch hooks that track which sequence each forward belongs to --------------------------
    def on_embed(self, module: nn.Module, args: tuple) -> None:
        # The only place where every family's text decoder input ids are visible: the multimodal
        # wrappers embed the ids (image placeholders included) before passing embeddings on.
        if args and torch.is_tensor(args[0]) and args[0].dim() == 2:
            self.pending_ids = args[0]

    def on_text_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            input_ids = self.pending_ids
        self.pending_ids = None
        # InstructBLIP embeds the prompts before generate() expands them into beams: count rows on
        # the embeddings the decoder actually runs.
        new = kwargs.get("inputs_embeds")
        if new is None:
            new = input_ids
        rows, length = int(new.shape[0]), int(new.shape[1])
        sequence = getattr(cache, SEQUENCE, None) if (cache is not None and past > 0) else None
        if sequence is None:
            if input_ids is not None and past == 0:
                image_mask = self.adapter.image_mask(input_ids)
            else:  # embeddings passed in directly, or a cache built outside: no known image tokens
                image_mask = torch.zeros(rows, past + length, dtype=torch.bool, device=new.device)
            sequence = SequenceState(image_mask=image_mask, auxiliary=in_auxiliary_forward())
        valid = _valid_keys(kwargs.get("attention_mask"))
        self.current = ForwardContext(
            sequence=sequence,
            past=past,
            rows=rows,
            valid_keys=valid,
            newest=getattr(_ALTERNATIVES, "width", 1),
        )
        segments = getattr(cache, SEGMENTS, None) if past > 0 else None
        if segments and rows == sum(segment.rows for segment in segments):
            self.current.parts = self._parts(self.current, segments)

    @staticmethod
    def _parts(whole: ForwardContext, segments: list[Segment]) -> list[tuple[int, int, ForwardContext]]:
        parts, start = [], 0
        for segment in segments:
            sequence = segment.sequence
            if sequence is None and start == 0:
                sequence = whole.sequence
            elif sequence is None:  # joined while no hook tracked it: no known image tokens
                empty = whole.sequence.image_mask.new_zeros(segment.rows, 0)
                sequence = SequenceState(image_mask=empty, auxiliary=True)
            valid = None if whole.valid_keys is None else whole.valid_keys[start : start + segment.rows]
            context = ForwardContext(
                sequence=sequence,
                past=whole.past - segment.pad,
                rows=segment.rows,
                valid_keys=None if valid is None else valid[:, segment.pad :],
                prompt=segment.prompt,
                newest=whole.newest,
            )
            parts.append((start, segment.pad, context))
            start += segment.rows
        return parts

    def on_text_model_done(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = output_cache(output)
        context, self.current = self.current, None
        # Set at prefill (a static cache may be reused by the next generate() call) or for a cache
        # first seen here; a decoding step finds it set and leaves it, so a compiled step has no
        # side effect to replay.
        if cache is not None and context is not None:
            if context.is_prefill or getattr(cache, SEQUENCE, None) is None:
                setattr(cache, SEQUENCE, context.sequence)

    def on_layer(self, layer_idx: int, hooks: tuple[AttentionHook, ...]):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            context = self.current
            parts = context.parts if context is not None and context.parts else [(0, 0, context)]
            for start, _, part in parts:
                rows = hidden if len(parts) == 1 else hidden[start : start + part.rows]
                for hook in hooks:
                    hook.observe_layer_input(layer_idx, rows, part)

        return pre_hook


def sequence_of(model: nn.Module, cache: Any) -> SequenceState | None:
    """What the hooks on ``model`` know of the sequence held in ``cache`` (``None``: no hooks)."""
    state: _InterceptionState | None = getattr(model, _STATE, None)
    return None if state is None or cache is None else getattr(cache, SEQUENCE, None)


def share_sequence(model: nn.Module, source: Any, copy: Any) -> None:
    """Let the hooks on ``model`` treat ``copy`` (a copy of the KV cache ``source``, rows repeated
    or reordered within a prompt) as the same sequence: same image positions, same prefill store."""
    state: _InterceptionState | None = getattr(model, _STATE, None)
    sequence = getattr(source, SEQUENCE, None)
    if state is not None and sequence is not None:
        setattr(copy, SEQUENCE, sequence)


def _valid_keys(mask: Any) -> torch.Tensor | None:
    """``(rows, keys)``: key columns that are real tokens, from the decoder's attention mask.

    ``generate()`` passes the 2D padding mask, or, with a static cache (compiled decoding), the 4D
    mask it builds itself ``(rows, 1, queries, keys)`` over every cache column (a dictionary of them
    for models with several attention kinds). The last query of a row sees every real key column
    there is so far: its row of the 4D mask is the padding mask, over the static cache's columns.
    """
    if isinstance(mask, dict):
        mask = mask.get("full_attention")
    if not torch.is_tensor(mask):
        return None
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() == 4:
        last = mask[:, 0, -1, :]
        return last if last.dtype == torch.bool else last == 0
    return None


def current_context(module: nn.Module) -> ForwardContext:
    """The :class:`ForwardContext` of the text-decoder forward running now, from one of its attention
    modules (a hook on another part of a layer, such as MemVR's on the MLP, reads it through the
    layer's attention module)."""
    state: _InterceptionState = getattr(module, _STATE)
    if state.current is None:
        raise RuntimeError("attention ran outside a tracked text-decoder forward")
    return state.current


@contextmanager
def intercept_attention(model: nn.Module, *hooks: AttentionHook) -> Iterator[None]:
    """Attach ``hooks`` to the text decoder of ``model`` for the span of the ``with`` block.

    Nested and stacked uses compose: hooks run in the order they were attached. When the last hook
    is removed (also after an exception) the text decoder's original attention implementation is
    restored and every torch hook removed, so the model computes bit-identically to one never touched.
    """
    adapter = get_adapter(model)
    modules = adapter.attention_modules
    for hook in hooks:
        if hook.layers is not None:
            bad = sorted(i for i in hook.layers if not 0 <= i < len(modules))
            if bad:
                raise ValueError(f"{type(hook).__name__} asks for layers {bad}; the model has {len(modules)}")
    state: _InterceptionState | None = getattr(model, _STATE, None)
    if state is None:
        state = _InterceptionState(adapter, adapter.text_config._attn_implementation)
        model.set_attn_implementation({"text_config": ATTENTION_NAME})
        state.handles = [
            adapter.embed_tokens.register_forward_pre_hook(state.on_embed),
            adapter.text_model.register_forward_pre_hook(state.on_text_model, with_kwargs=True),
            adapter.text_model.register_forward_hook(state.on_text_model_done, with_kwargs=True),
        ]
        setattr(model, _STATE, state)
    state.active += 1
    attached: list[tuple[nn.Module, AttentionHook]] = []
    layer_handles = []
    try:
        for hook in hooks:
            name = type(hook).__qualname__
            hook._store_key = (name, state.attached_types.count(name))
            state.attached_types.append(name)
            for idx, module in enumerate(modules):
                if hook.layers is None or idx in hook.layers:
                    setattr(module, _HOOKS, (*getattr(module, _HOOKS, ()), hook))
                    setattr(module, _STATE, state)
                    attached.append((module, hook))
                    if hook.observes_layer_inputs:
                        layer_handles.append(
                            adapter.layers[idx].register_forward_pre_hook(
                                state.on_layer(idx, (hook,)), with_kwargs=True
                            )
                        )
        yield
    finally:
        for handle in layer_handles:
            handle.remove()
        for module, hook in attached:
            remaining = tuple(h for h in getattr(module, _HOOKS) if h is not hook)
            if remaining:
                setattr(module, _HOOKS, remaining)
            else:
                delattr(module, _HOOKS)
                delattr(module, _STATE)
        for hook in hooks:
            hook._store_key = None
        state.active -= 1
        if state.active == 0:
            for handle in state.handles:
                handle.remove()
            model.set_attn_implementation({"text_config": state.original})
            delattr(model, _STATE)

"""Attention interception: read and rewrite attention inside the text decoder of a loaded model.

Head methods (VAR, VHR, PAI, ACT, ...) and OPERA need the attention probabilities of some layers, or
the per-head outputs before ``o_proj``. transformers 5 picks each attention module's kernel by name
from ``AttentionInterface``; veridical registers one more kernel, ``"veridical"``, and switches only
the text decoder to it while hooks are attached. In a layer with no hook that needs probabilities it
runs sdpa; in a layer that does, it runs eager attention and lets the hooks edit

- the pre-softmax scores (after the causal/padding mask is added),
- the post-softmax probabilities ``(batch, heads, queries, keys)``,
- the per-head outputs ``(batch, queries, heads, head_dim)`` before ``o_proj`` (in every hooked layer,
  sdpa ones included).

Hooks live on the attention modules of one model, so two models in one process never see each
other's hooks. Attaching and detaching is not thread-safe for one model: do not run two
``generate`` calls with different methods on the same model object concurrently.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from veridical.adapters import get_adapter

ATTENTION_NAME = "veridical"
_HOOKS = "_veridical_hooks"
_STATE = "_veridical_attention_state"


class AttentionHook:
    """One method's edits of attention. Override the ``edit_*`` methods you need.

    ``layers`` limits the hook to those text-decoder layer indices (``None``: all). Set
    ``needs_weights = False`` when only :meth:`edit_outputs` is used, so those layers keep sdpa.
    """

    layers: Collection[int] | None = None
    needs_weights: bool = True

    def edit_logits(self, module: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def edit_weights(self, module: nn.Module, weights: torch.Tensor) -> torch.Tensor:
        return weights

    def edit_outputs(self, module: nn.Module, outputs: torch.Tensor) -> torch.Tensor:
        return outputs


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    return states.repeat_interleave(groups, dim=1)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    hooks: Collection[AttentionHook] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with hook points; softmax in float32 as the reference does."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, :, : key.shape[-2]]
    for hook in hooks:
        logits = hook.edit_logits(module, logits)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
    for hook in hooks:
        weights = hook.edit_weights(module, weights)
    weights = weights.to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    outputs = torch.matmul(weights, value).transpose(1, 2).contiguous()
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
    weight_hooks = [h for h in hooks if h.needs_weights]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if weight_hooks or kwargs.get("output_attentions"):
        outputs, weights = eager_attention(
            module, query, key, value, attention_mask, scaling, dropout, weight_hooks
        )
    else:
        outputs, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    for hook in hooks:
        outputs = hook.edit_outputs(module, outputs)
    return outputs, weights


AttentionInterface.register(ATTENTION_NAME, veridical_attention)
# Without a registered mask function a custom kernel silently receives no causal/padding mask.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)


class _InterceptionState:
    """Per-model bookkeeping: the implementation to restore and how many hooks are attached."""

    def __init__(self, original: str | None):
        self.original = original
        self.active = 0


@contextmanager
def intercept_attention(model: nn.Module, *hooks: AttentionHook) -> Iterator[None]:
    """Attach ``hooks`` to the text decoder of ``model`` for the span of the ``with`` block.

    Nested and stacked uses compose: hooks run in the order they were attached. When the last hook
    is removed (also after an exception) the text decoder's original attention implementation is
    restored, so the model computes bit-identically to one never touched.
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
        state = _InterceptionState(adapter.text_config._attn_implementation)
        model.set_attn_implementation({"text_config": ATTENTION_NAME})
        setattr(model, _STATE, state)
    state.active += 1
    attached: list[tuple[nn.Module, AttentionHook]] = []
    try:
        for hook in hooks:
            for idx, module in enumerate(modules):
                if hook.layers is None or idx in hook.layers:
                    setattr(module, _HOOKS, (*getattr(module, _HOOKS, ()), hook))
                    attached.append((module, hook))
        yield
    finally:
        for module, hook in attached:
            remaining = tuple(h for h in getattr(module, _HOOKS) if h is not hook)
            if remaining:
                setattr(module, _HOOKS, remaining)
            else:
                delattr(module, _HOOKS)
        state.active -= 1
        if state.active == 0:
            model.set_attn_implementation({"text_config": state.original})
            delattr(model, _STATE)

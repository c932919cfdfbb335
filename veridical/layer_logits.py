"""Early-layer logits: the residual stream of chosen layers, read at the newest position of the model's
own forward and turned into next-token logits by the LM head.

Decoders that mix the final logits with earlier layers' (DeCo's anchor layer, VISTA's window) read
the same thing: :class:`LayerReadout` collects it during each forward and :func:`early_logits` applies
the head. Indices follow transformers' ``hidden_states``: ``i < depth`` is the input of decoder layer
``i`` (0: the embeddings), ``depth`` the last layer's output after the final norm.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from veridical.adapters import ModelAdapter
from veridical.attention import AttentionHook, ForwardContext


class LayerReadout(AttentionHook):
    """The newest position's residual state at each of ``indices``, from the model's own forwards.

    A forward veridical runs for itself (a contrast branch on its own cache, a steering vector's
    prompt) is skipped; in a forward that carries contrast rows below the main ones, only the main
    rows are kept. Reading ``depth`` needs :meth:`observe_final_norm` as a forward hook on the final
    norm (:meth:`attach_final_norm`).
    """

    observes_layer_inputs = True
    needs_weights = False

    def __init__(self, adapter: ModelAdapter, indices: Iterable[int]):
        self.depth = adapter.num_layers
        self.indices = sorted(set(indices))
        bad = [i for i in self.indices if not 0 <= i <= self.depth]
        if bad:
            raise ValueError(f"hidden-state indices {bad} are not in 0..{self.depth}")
        self.reads_final = self.depth in self.indices
        inputs = {i for i in self.indices if i < self.depth}
        # The last layer's input tells how many rows are the main ones before its output is normed.
        self.layers = sorted(inputs | ({self.depth - 1} if self.reads_final else set()))
        self._inputs = inputs
        self.final_norm = adapter.final_norm
        self.states: dict[int, torch.Tensor] = {}
        self._main_rows: int | None = None

    def observe_layer_input(self, layer_idx: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        if context.sequence.auxiliary:
            return
        if layer_idx in self._inputs:
            self.states[layer_idx] = hidden[:, -1]
        if self.reads_final and layer_idx == self.depth - 1:
            self._main_rows = hidden.shape[0]

    def observe_final_norm(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        rows, self._main_rows = self._main_rows, None
        if rows is not None:
            self.states[self.depth] = output[:rows, -1]

    def attach_final_norm(self) -> Any:
        """Register :meth:`observe_final_norm` on the final norm; returns the handle (or None)."""
        return self.final_norm.register_forward_hook(self.observe_final_norm) if self.reads_final else None

    def read(self, rows: int, who: str, indices: Iterable[int] | None = None) -> list[torch.Tensor]:
        """The states at ``indices`` (default :attr:`indices`) from the last forward, in that order,
        each ``(rows, d)``; ``who`` names the reader in the error when no forward was seen."""
        states = [self.states.get(i) for i in (self.indices if indices is None else indices)]
        if any(s is None or s.shape[0] != rows for s in states):
            raise RuntimeError(f"{who} saw no forward of this generate() call (its hooks were not attached)")
        return states


def early_logits(
    lm_head: nn.Module, states: list[torch.Tensor], norm: nn.Module | None = None
) -> torch.Tensor:
    """``(len(states), rows, vocab)`` float32 logits of each state, through ``norm`` first if given.

    One LM-head product over the stacked states: one weight read and one kernel per step, not one per
    layer (each row equals its own product up to the rounding of the larger matrix product).
    """
    stacked = torch.stack(states)
    if norm is not None:
        stacked = norm(stacked)
    return lm_head(stacked).float()

"""Image attention amplification before the softmax: the mechanism PAI and PAINT share."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import ForwardContext
from veridical.contrastive import TextOnlyContrast
from veridical.heads.base import HeadMethod, check_layers, layer_range
from veridical.params import Flag, Layers, Optional, Real

#: The rules of the settings every boost method has (:mod:`veridical.params`).
BOOST_RULES = {"gamma": Real(1), "layers": Optional(Layers()), "boost_prefill": Optional(Flag())}


class AttentionBoost(HeadMethod):
    r"""The newest query's pre-softmax scores :math:`a_j` raised by :math:`w_j |a_j|` in ``layers``
    (default: 2..31 of a 32-layer decoder, scaled), with per-key weights :math:`w` from
    :meth:`key_weights` and an optional per-head factor from :meth:`head_weights`; ``gamma > 1`` adds
    the text-only contrast (:class:`~veridical.contrastive.TextOnlyContrast` with ``alpha = gamma - 1``,
    cutoff 0.1) as :attr:`logits_processor`, and then the prompt's own forward stays unboosted unless
    ``boost_prefill``. See :class:`~veridical.heads.pai.PAI` for the official code this follows.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        gamma: float,
        layers: Sequence[int] | None,
        boost_prefill: bool | None,
    ):
        super().__init__(model, inputs)
        depth = self.adapter.num_layers
        name = type(self).__name__
        self.layers = check_layers(name, layers, depth) if layers is not None else layer_range(2, 32, depth)
        self.gamma = gamma
        # The official code skips the prefill exactly when its contrast processor is in use.
        self.boost_prefill = gamma == 1 if boost_prefill is None else boost_prefill
        if gamma != 1:
            self.logits_processor = TextOnlyContrast(model, inputs, alpha=gamma - 1, beta=0.1)

    _skipped_prefill = False

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        contrast = self.logits_processor
        if self._skipped_prefill and contrast is not None and getattr(contrast, "_branch", None) is None:
            # The prefill was left unboosted for a contrast that never ran: neither half of PAI applied.
            warnings.warn(
                f"{type(self).__name__}(gamma={self.gamma}) ran without its text-only contrast: pass "
                "method.logits_processor to generate() or use veridical.generate",
                stacklevel=2,
            )

    def key_weights(self, context: ForwardContext, keys: int) -> torch.Tensor:
        """``(rows, keys)`` amplification of each key column for the newest query."""
        raise NotImplementedError

    def head_weights(self, layer: int, context: ForwardContext) -> torch.Tensor | None:
        """Optional ``(rows, heads)`` per-head factor of the amplification (PAINT's modulation)."""
        return None

    def edit_logits(self, module: nn.Module, logits: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        if not context.sequence.has_image:  # a contrast branch without the image
            return logits
        if context.is_prefill and not self.boost_prefill:
            self._skipped_prefill = True
            return logits
        keys = logits.shape[-1]
        weights = context.once(  # (rows, 1, 1, keys), the same in every layer of this forward
            self, lambda: self.key_weights(context, keys).to(logits.device)[:, None, None, :], keys
        )
        per_head = self.head_weights(module.layer_idx, context)
        if per_head is not None:
            weights = weights * per_head[:, :, None, None].to(weights)
        newest = logits[:, :, -context.newest :, :]
        boost = (weights * newest.float().abs()).to(logits.dtype)
        if newest.shape[2] == logits.shape[2]:  # a decoding step: every query is a newest one
            return logits + boost
        logits = logits.clone()
        logits[:, :, -context.newest :, :] += boost
        return logits

"""PAI: Paying More Attention to Image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import ForwardContext
from veridical.errors import MethodSpecError
from veridical.heads.base import HeadMethod, check_layers, layer_range
from veridical.registry import register_method


@register_method("pai")
class PAI(HeadMethod):
    r"""Image attention amplification before the softmax.

    Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating
    Hallucination in LVLMs", ECCV 2024; official code LALBJ/PAI (``attention.py``, ``CFG.py``).

    In layers 2..31 of a 32-layer decoder (the same relative depth on other models), the last query
    row's pre-softmax scores :math:`a` to image keys are raised by their magnitude,

    .. math:: a_j \leftarrow a_j + \alpha\,|a_j| \quad (j \text{ an image token}),

    at prefill (the last prompt token) and at every generated token. Defaults as the official
    scripts: ``alpha=0.2``, ``--start-layer 2 --end-layer 32``.

    ``gamma > 1`` adds the official text-only contrast (``--use-cfg --gamma 1.1``):
    :math:`\gamma\,l - (\gamma - 1)\,l_{\text{text}}` with a plausibility cutoff at 0.1 of the top
    probability, where :math:`l_{\text{text}}` comes from the prompt without the image (that branch has
    no image tokens, so it runs unboosted as in the official code). It is off by default so that PAI
    alone is a pure attention intervention; it is exposed as :attr:`logits_processor`, which
    :func:`veridical.generate` adds, or pass it yourself to ``model.generate``.

    Args:
        model: a supported vision-language model.
        inputs: the processor's output passed to ``generate``.
        alpha: amplification; 0 leaves attention unchanged.
        gamma: text-only contrast strength; 1 disables it.
        layers: decoder layers to modify (default: the scaled official range).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        alpha: float = 0.2,
        gamma: float = 1.0,
        layers: Sequence[int] | None = None,
    ):
        super().__init__(model, inputs)
        if alpha < 0:
            raise MethodSpecError(f"{type(self).__name__} alpha must be >= 0, got {alpha}")
        if gamma < 1:
            raise MethodSpecError(
                f"{type(self).__name__} gamma must be >= 1 (1 disables the contrast), got {gamma}"
            )
        depth = self.adapter.num_layers
        self.layers = check_layers("PAI", layers, depth) if layers is not None else layer_range(2, 32, depth)
        self.alpha, self.gamma = alpha, gamma
        if gamma != 1:
            from veridical.decoders.vcd import VCD

            self.logits_processor = VCD(model, inputs, alpha=gamma - 1, beta=0.1, contrast="no_image")

    def key_weights(self, context: ForwardContext, keys: int) -> torch.Tensor:
        """``(rows, keys)`` amplification of each key column for the newest query."""
        return context.image_keys(keys).float() * self.alpha

    def head_weights(self, layer: int, context: ForwardContext) -> torch.Tensor | None:
        """Optional ``(rows, heads)`` per-head factor of the amplification (PAINT's modulation)."""
        return None

    def edit_logits(self, module: nn.Module, logits: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        if not context.sequence.has_image:  # a contrast branch without the image
            return logits
        keys = logits.shape[-1]
        weights = context.once(  # (rows, 1, 1, keys), the same in every layer of this forward
            (self, keys), lambda: self.key_weights(context, keys).to(logits.device)[:, None, None, :]
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

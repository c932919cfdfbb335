"""VHR: vision-aware head reinforcement."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import AttentionHook, ForwardContext
from veridical.errors import InputError
from veridical.heads.base import HeadMethod, check_layers, scale_index
from veridical.heads.paired import last_token_head_outputs, paired_forward
from veridical.params import Custom, Layers, Optional, Real, Rule, existing_file
from veridical.registry import check_hyperparameters, register_method


def default_vhr_layers(family: str, depth: int) -> list[int]:
    """The paper's layers, scaled to ``depth``: InstructBLIP the last 18, others layer 1 plus the last 14."""
    if family == "instructblip":
        return list(range(depth - scale_index(18, depth), depth))
    return sorted({scale_index(1, depth)} | set(range(depth - scale_index(14, depth), depth)))


def select_heads(divergence: torch.Tensor, text_norm: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(B, heads)`` output scales of one layer from its heads' VHD and no-image output norms.

    Heads whose VHD and no-image norm both exceed their layer's mean + std are outliers (large
    outputs whatever the image) and get score 0; heads whose score exceeds the layer median are
    reinforced by ``alpha``.
    """

    def above_mean_std(values: torch.Tensor) -> torch.Tensor:
        return values > values.mean(dim=-1, keepdim=True) + values.std(dim=-1, keepdim=True, unbiased=False)

    score = divergence.masked_fill(above_mean_std(divergence) & above_mean_std(text_norm), 0.0)
    median = torch.quantile(score, 0.5, dim=-1, keepdim=True)
    return torch.where(score > median, torch.full_like(score, alpha), torch.ones_like(score))


@register_method("vhr")
class VHR(HeadMethod):
    r"""Vision-aware Head Reinforcement.

    He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence", ACL 2025
    (arXiv 2412.13949). The paper (v3) announces code at github.com/jinghan1he/VHR; no copy of it could
    be read for this implementation, so the paper is the reference, and the choices it leaves open
    are stated below.

    Vision-aware head divergence of head :math:`i` in layer :math:`l` at the first generated token
    (the last prompt position):

    .. math:: \mathrm{VHD}(l, i) = \lVert o_{l,i}(v, x) - o_{l,i}(x) \rVert_2,

    with :math:`o_{l,i}` the head's output before ``o_proj``, with and without the image. Heads whose
    VHD and no-image output norm are both above their layer's mean + std (population std) get score 0;
    heads scoring above the layer median have their slice of the ``o_proj`` input multiplied by
    ``alpha = 2``, at every position and step. Heads are chosen layer by layer with the earlier layers
    already reinforced, on entry, then frozen: one stacked forward of the prompts with and without
    the image (no per-layer re-runs). Layers: LLaVA-1.5-7B layer 1 plus the last 14, InstructBLIP the
    last 18 (scaled to other depths; ``layers=`` overrides). Works with sdpa: only head outputs are read.

    ``head_scales`` (a path saved with :meth:`save`, or a tensor ``(prompts or 1, layers, heads)``)
    skips the measurement and reuses earlier choices; one row applies to every prompt.

    Args:
        alpha: reinforcement factor; 1 leaves the model unchanged.
        layers: decoder layers to choose heads in.
        head_scales: saved per-head scales to reuse.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "alpha": Real(0),
        "layers": Optional(Layers()),
        # A tensor's shape is checked against the model on construction.
        "head_scales": Optional(
            Custom(
                lambda v: existing_file(v) or hasattr(v, "shape"),
                "the path of an existing file saved with VHR.save or a tensor",
                "path | tensor",
            )
        ),
    }

    needs_weights = False

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        alpha: float = 2.0,
        layers: Sequence[int] | None = None,
        head_scales: str | Path | torch.Tensor | None = None,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
        depth = self.adapter.num_layers
        self.layers = (
            check_layers("VHR", layers, depth)
            if layers is not None
            else default_vhr_layers(self.adapter.family, depth)
        )
        self.alpha = alpha
        self.head_scales = self._load(head_scales) if head_scales is not None else None

    def _load(self, source: str | Path | torch.Tensor) -> torch.Tensor:
        scales = source if torch.is_tensor(source) else torch.load(source, weights_only=True)
        expected = (self.adapter.num_layers, self.adapter.num_heads)
        if (
            scales.dim() != 3
            or tuple(scales.shape[1:]) != expected
            or scales.shape[0] not in (1, self.prompts)
        ):
            raise InputError(
                f"VHR head_scales of shape {tuple(scales.shape)} do not fit this model and batch: expected "
                f"(1 or {self.prompts}, {expected[0]}, {expected[1]})"
            )
        return scales.float()

    def save(self, path: str | Path) -> None:
        """Save the chosen head scales for reuse with ``head_scales=path``."""
        if self.head_scales is None:
            self.prepare()
        torch.save(self.head_scales, path)

    def prepare(self) -> None:
        if self.head_scales is None:
            chooser = _LayerByLayerChoice(self.layers, self.prompts, self.adapter, self.alpha)
            paired_forward(self.adapter, self.inputs, chooser)
            self.head_scales = chooser.scales

    def edit_outputs(self, module: nn.Module, outputs: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        scales = self.head_scales[:, module.layer_idx]
        if scales.shape[0] == 1:
            scales = scales.expand(self.prompts, -1)
        scales = context.per_prompt(scales).to(outputs.device, outputs.dtype)
        return outputs * scales[:, None, :, None]


class _LayerByLayerChoice(AttentionHook):
    """In the stacked with/without-image forward: choose a layer's heads, apply them to both halves."""

    needs_weights = False

    def __init__(self, layers: list[int], prompts: int, adapter, alpha: float):
        self.layers = layers
        self.prompts = prompts
        self.alpha = alpha
        self.scales = torch.ones(prompts, adapter.num_layers, adapter.num_heads)

    def edit_outputs(self, module: nn.Module, outputs: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        with_image, without_image = last_token_head_outputs(outputs, self.prompts)
        divergence = (with_image - without_image).norm(dim=-1)
        scales = select_heads(divergence, without_image.norm(dim=-1), self.alpha)
        self.scales[:, module.layer_idx] = scales.cpu()
        both = torch.cat([scales, scales]).to(outputs.device, outputs.dtype)
        return outputs * both[:, None, :, None]

"""M3ID: Multi-Modal Mutual-Information Decoding."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.contrast import contrast_inputs
from veridical.contrastive import ContrastiveDecoder, plausibility_mask
from veridical.params import Choice, Real, Rule
from veridical.registry import check_hyperparameters, register_method

VARIANTS = ("paper", "avisc")


@register_method("m3id")
class M3ID(ContrastiveDecoder):
    r"""Multi-Modal Mutual-Information Decoding.

    Favero et al., "Multi-Modal Hallucination Control by Visual Information Grounding", CVPR 2024
    (arXiv:2403.14003; no official code). The paper's M3ID update, with :math:`l_c` and :math:`l_u`
    the log-softmax of the next-token logits with and without the image, and :math:`t = 1` at the
    first generated token:

    .. math::
        \gamma_t = e^{-\lambda t}, \qquad
        l = l_c + \mathbb{1}\left[\max_y l_c < \log\alpha\right]\,\frac{1 - \gamma_t}{\gamma_t}\,(l_c - l_u).

    The correction grows as generation goes on (the image's pull fades with distance) and is applied
    only where the model is unsure (top probability below ``alpha``). Defaults are the paper's:
    ``alpha=0.3, lam=0.02``, greedy decoding.

    ``variant="avisc"`` is the M3ID of the AvisC code base (sangminwoo/AvisC at 772eba4,
    ``avisc_utils/avisc_sample.py`` lines 246-277), used as a baseline there: the same
    :math:`\gamma_t` (``lamda = 0.02`` hard-coded, :math:`t` from 1), no confidence gate, VCD's
    plausibility cutoff ``beta`` (0.1) on the image logits, and sampling (pass ``do_sample=True,
    top_k=0``: the AvisC scripts pass ``top_k=None``, no top-k under transformers 4.31). There the
    image-free branch never advances: its state is updated into another variable (lines 326-329),
    so (as we read ``llava_arch.py`` lines 199-202) LLaVA's second step fails an attention-mask
    assertion, and InstructBLIP's branch re-reads the prompt alone at every step
    (``lavis/models/blip2_models/modeling_llama.py`` line 848); veridical's image-free branch
    follows the generated tokens, as the paper describes.
    The image-free branch is the prompt with the image tokens removed
    (:func:`veridical.contrast.contrast_inputs` ``"no_image"``).

    Args:
        alpha: confidence gate; the correction applies where ``max p < alpha`` (0 never applies it).
        lam: decay rate of :math:`\gamma_t`; 0 makes the correction vanish.
        variant: ``"paper"`` or ``"avisc"``.
        beta: plausibility cutoff of the ``"avisc"`` variant.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "alpha": Real(0, 1),
        "lam": Real(0),
        "variant": Choice(*VARIANTS),
        "beta": Real(0, 1),
    }

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        alpha: float = 0.3,
        lam: float = 0.02,
        variant: str = "paper",
        beta: float = 0.1,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
        self.alpha, self.lam, self.variant, self.beta = alpha, lam, variant, beta

    def contrast_inputs(self) -> Inputs:
        return contrast_inputs(self.adapter, self.inputs, "no_image")

    def weight(self) -> float:
        """:math:`(1 - \\gamma_t) / \\gamma_t` at the current step."""
        gamma = math.exp(-self.lam * (self.generated + 1))
        return (1 - gamma) / gamma

    def combine(self, log_probs: torch.Tensor, contrast_log_probs: torch.Tensor) -> torch.Tensor:
        # Tokens another processor removed stay removed; lam=0 would otherwise make 0 * -inf.
        allowed = torch.isfinite(log_probs)
        scores = torch.where(
            allowed, log_probs + self.weight() * (log_probs - contrast_log_probs), -torch.inf
        )
        if self.variant == "avisc":
            scores = scores.masked_fill(plausibility_mask(log_probs, self.beta), float("-inf"))
        else:
            unsure = log_probs.amax(dim=-1, keepdim=True) < math.log(max(self.alpha, 1e-45))
            scores = torch.where(unsure, scores, log_probs)
        return torch.log_softmax(scores, dim=-1)

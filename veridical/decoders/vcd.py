"""Visual Contrastive Decoding (VCD)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.contrast import CONTRAST_KINDS, contrast_inputs, diffusion_alpha_bar
from veridical.decoders.contrastive import ContrastiveDecoder, check_contrast_settings, contrast_with_cutoff
from veridical.errors import MethodSpecError
from veridical.registry import register_method


@register_method("vcd")
class VCD(ContrastiveDecoder):
    r"""Visual Contrastive Decoding.

    Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models through Visual
    Contrastive Decoding", CVPR 2024; official code DAMO-NLP-SG/VCD (``vcd_utils/vcd_sample.py``).

    The next-token distribution contrasts the image :math:`v` with a distorted image :math:`v'`:

    .. math::
        s = (1 + \alpha)\, l(y \mid v, x) - \alpha\, l(y \mid v', x), \qquad
        s_y = -\infty \text{ where } l(y \mid v, x) < \log\beta + \max_{y'} l(y' \mid v, x).

    Defaults are the official scripts' (``--cd_alpha 1 --cd_beta 0.1 --noise_step 500``, sampling
    with temperature 1, top-p 1). ``v'`` adds forward-diffusion noise at step 500 of 1000 to the
    normalised pixels (about ``0.863 x + 0.505 eps``). ``contrast="blank"`` uses the mean image and
    ``contrast="no_image"`` drops the image tokens from the prompt (the "no image" contrast of
    instruction-contrastive work), both beyond the paper.

    Scores are returned as the log-softmax of ``s``: a per-row shift of the official logits that
    changes neither greedy choices nor sampling, and makes beam search sum log-probabilities of the
    contrastive distribution (the official code supports sampling only). Code and paper agree on the
    formula and on the cutoff (the code's "version 2" cutoff on logits equals the paper's
    ``p >= beta * max p``).

    Args:
        model: a supported vision-language model.
        inputs: the processor's output passed to ``generate``.
        alpha: contrast strength; 0 keeps the plausibility cutoff only.
        beta: plausibility cutoff in (0, 1]; 0 disables it.
        noise_step: diffusion step of the noise, 0..999 (``contrast="noise"`` only).
        contrast: ``"noise"``, ``"blank"`` or ``"no_image"``.
        seed: seed of the noise; ``None`` draws from torch's global generator as the official code.
    """

    #: The official scripts sample (temperature 1, top-p 1); ``veridical eval`` uses this by default.
    generation_defaults: ClassVar[dict] = {"do_sample": True, "temperature": 1.0, "top_p": 1.0}

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        alpha: float = 1.0,
        beta: float = 0.1,
        noise_step: int = 500,
        contrast: str = "noise",
        seed: int | None = None,
    ):
        super().__init__(model, inputs)
        check_contrast_settings("VCD", alpha, beta)
        if contrast not in CONTRAST_KINDS:
            raise MethodSpecError(
                f"VCD contrast must be one of {', '.join(CONTRAST_KINDS)}, got {contrast!r}"
            )
        diffusion_alpha_bar(noise_step)  # validates the range
        self.alpha, self.beta, self.noise_step, self.contrast, self.seed = (
            alpha,
            beta,
            noise_step,
            contrast,
            seed,
        )

    def contrast_inputs(self) -> Inputs:
        return contrast_inputs(self.adapter, self.inputs, self.contrast, self.noise_step, self.seed)

    def combine(self, log_probs: torch.Tensor, contrast_log_probs: torch.Tensor) -> torch.Tensor:
        return contrast_with_cutoff(log_probs, contrast_log_probs, self.alpha, self.beta)

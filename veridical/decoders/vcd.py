"""Visual Contrastive Decoding (VCD)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.contrast import CONTRAST_KINDS, DIFFUSION_STEPS, contrast_inputs
from veridical.contrastive import ContrastiveDecoder, contrast_with_cutoff
from veridical.params import Choice, Integer, Optional, Real, Rule
from veridical.registry import check_hyperparameters, register_method

#: A seed torch's generators accept.
SEED = Integer(-(2**63), 2**64 - 1, text="an integer in [-2**63, 2**64 - 1]")


@register_method("vcd")
class VCD(ContrastiveDecoder):
    r"""Visual Contrastive Decoding.

    Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models through Visual
    Contrastive Decoding", CVPR 2024; official code DAMO-NLP-SG/VCD at d6568ff
    (``vcd_utils/vcd_sample.py``, ``vcd_utils/vcd_add_noise.py``).

    The next-token distribution contrasts the image :math:`v` with a distorted image :math:`v'`
    (``vcd_sample.py`` lines 150-153):

    .. math::
        s = (1 + \alpha)\, l(y \mid v, x) - \alpha\, l(y \mid v', x), \qquad
        s_y = -\infty \text{ where } l(y \mid v, x) < \log\beta + \max_{y'} l(y' \mid v, x).

    Defaults are the LLaVA evaluation script's argument defaults
    (``experiments/eval/object_hallucination_vqa_llava.py`` lines 111-118: ``cd_alpha 1``,
    ``cd_beta 0.1``, ``noise_step 500``, temperature 1, top-p 1, ``top_k None``), with sampling.
    The official settings differ between scripts:

    - the shipped LLaVA POPE script passes ``cd_beta 0.2`` (``experiments/cd_scripts/llava1.5_pope.bash``
      line 6);
    - the InstructBLIP script never passes ``cd_alpha``, so ``vcd_sample.py`` line 142 falls back to
      ``alpha = 0.5``; it also leaves ``top_k`` unset, so transformers 4.31's top-k 50 applies there
      (``experiments/eval/object_hallucination_vqa_instructblip.py`` lines 61-64).

    Sampling: the LLaVA scripts pass ``top_k=None``, which under the pinned transformers 4.31 means
    no top-k at all; transformers 5 fills an unset ``top_k`` with 50. :attr:`generation_defaults`
    therefore sets ``top_k=0`` (no top-k); pass it yourself when you call ``generate`` directly.

    ``v'`` adds forward-diffusion noise at step 500 of 1000 to the normalised pixels (about
    ``0.863 x + 0.505 eps``). ``contrast="blank"`` uses the mean image and ``contrast="no_image"``
    drops the image tokens from the prompt (the "no image" contrast of instruction-contrastive work),
    both beyond the paper.

    Scores are returned as the log-softmax of ``s``: a per-row shift of the official logits that
    changes neither greedy choices nor sampling, and makes beam search sum log-probabilities of the
    contrastive distribution (the official code supports sampling only). Code and paper agree on the
    formula and on the cutoff (the code's "version 2" cutoff on logits equals the paper's
    ``p >= beta * max p``). The official code contrasts raw logits before every other processor
    (``vcd_sample.py`` lines 156-157); as a logits processor VCD runs after the processors
    ``generate()`` puts first (repetition penalty, minimum length, ...) and before the sampling
    warpers (temperature, top-k, top-p), as the official code. The official LLaVA script uses none
    of the former.

    Args:
        model: a supported vision-language model.
        inputs: the processor's output passed to ``generate``.
        alpha: contrast strength, >= 0; 0 keeps the plausibility cutoff only.
        beta: plausibility cutoff in [0, 1]; 0 disables it.
        noise_step: diffusion step of the noise, 0..999 (``contrast="noise"`` only).
        contrast: ``"noise"``, ``"blank"`` or ``"no_image"``.
        seed: seed of the noise; ``None`` draws from torch's global generator as the official code.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "alpha": Real(0),
        "beta": Real(0, 1),
        "noise_step": Integer(0, DIFFUSION_STEPS - 1),
        "contrast": Choice(*CONTRAST_KINDS),
        "seed": Optional(SEED),
    }

    #: The official LLaVA scripts' sampling: temperature 1, top-p 1 and no top-k (``top_k=None``
    #: under transformers 4.31; transformers 5 needs 0). ``veridical eval`` uses this by default.
    generation_defaults: ClassVar[dict] = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}

    @staticmethod
    def draws_random_numbers(params: dict) -> bool:
        """Whether a run's outputs depend on its batching (``veridical eval`` then keeps the batch size
        in the run's identity): the noise contrast draws one noise tensor per batch."""
        return params.get("contrast", "noise") == "noise"

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
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
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

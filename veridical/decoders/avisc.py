"""AvisC: attentional vision calibration."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import AttentionHook, ForwardContext, auxiliary_forwards, intercept_attention
from veridical.contrastive import ContrastiveDecoder, contrast_with_cutoff
from veridical.params import Real, Rule
from veridical.registry import check_hyperparameters, register_method


def top_share_layers(share: torch.Tensor, gamma: float) -> torch.Tensor:
    """Indices of the layers with the largest ``share`` (sums to 1) until ``gamma`` of it is covered.

    As the official ``count_top_p``: ``k`` = number of sorted shares whose running sum stays below
    ``gamma``, plus one.
    """
    ordered = torch.sort(share, descending=True).values
    k = int((torch.cumsum(ordered, dim=0) < gamma).sum()) + 1
    return torch.topk(share, min(k, share.numel())).indices


def blind_tokens(per_layer: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """AvisC's blind image tokens of one prompt from ``per_layer`` ``(layers, image tokens)``, the
    head-mean attention of the last query to each image token (``avisc_sample.py`` lines 160-179).

    The layers holding the largest share of image attention (:func:`top_share_layers`), the tokens'
    mean attention over them, and ``True`` where it is not below mean + ``lam`` x std (unbiased).
    """
    share = per_layer.sum(dim=-1)
    layers = top_share_layers(share / share.sum(), gamma)
    token_attention = per_layer[layers].mean(dim=0)
    threshold = token_attention.mean() + lam * token_attention.std()
    return token_attention >= threshold


class _PromptProbe(AttentionHook):
    """On the prompt: each layer's head-mean attention of the last query, and the input embeddings."""

    observes_layer_inputs = True

    def __init__(self) -> None:
        self.last_query: dict[int, torch.Tensor] = {}
        self.embeddings: torch.Tensor | None = None

    def observe_layer_input(self, layer_idx: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        if layer_idx == 0:
            self.embeddings = hidden.detach().clone()

    def edit_weights(self, module: nn.Module, weights: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        self.last_query[module.layer_idx] = weights[:, :, -1, :].mean(dim=1).float()
        return weights


@register_method("avisc")
class AvisC(ContrastiveDecoder):
    r"""Attentional Vision Calibration.

    Woo et al., "Don't Miss the Forest for the Trees: Attentional Vision Calibration for Large Vision
    Language Models", 2024; official code sangminwoo/AvisC at 772eba4 (``avisc_utils/avisc_sample.py``).

    On the prompt, with :math:`a_l` the head-mean attention of the last query in layer :math:`l`
    (``avisc_sample.py`` lines 152-179):

    1. each layer's share of image attention :math:`s_l = \sum_{j \in \text{img}} a_{l,j}`, normalised
       over layers; keep the top layers until ``gamma`` (0.5) of it is covered (plus one, as the code's
       ``count_top_p``);
    2. per image token, its mean attention over those layers; *blind* tokens are those at or above
       mean + ``lam`` (1.0) x std over the image tokens (unbiased std, as ``torch.std``);
    3. a contrast branch where every non-blind image token's input embedding is zeroed
       (``masking_scheme="zeros"``, ``experiments/llava/model/language_model/llava_llama.py`` lines
       93-112), so it sees the image only through the blind tokens;
    4. :math:`(1 + \alpha)\,l - \alpha\,l_{\text{blind}}` with VCD's cutoff ``beta`` (0.1) on the
       main logits (lines 203-210); a row whose contrast logits hold a NaN uses the main logits as
       its contrast instead (lines 200-201).

    Defaults are ``eval_bench/scripts/pope_eval_batch.sh`` (lines 11-18: ``layer_gamma 0.5``,
    ``lamb 1.0``, ``cd_alpha 1.0``, ``cd_beta 0.1``) with the LLaVA script's sampling
    (``eval_bench/pope_eval_llavab.py`` lines 61-63 and 262-279: temperature 1, top-p 1,
    ``top_k=None``, i.e. no top-k under transformers 4.31; :attr:`generation_defaults` sets
    ``top_k=0`` because transformers 5 fills an unset ``top_k`` with 50). The scripts' own argument
    defaults differ: ``lamb`` 0.99 (``pope_eval_llavab.py`` line 81) and 0.95 for InstructBLIP
    (``pope_eval_instructblipb.py`` line 82); AMBER uses ``cd_alpha`` 2.5 (``amber_eval.sh`` line 17).

    Image positions come from the adapter (the official code hard-codes LLaVA's 35..610 and
    InstructBLIP's 0..31), and the statistics and the NaN fallback are per prompt (the code pools a
    batch). Finding the blind tokens costs one extra prompt forward with eager attention, at the
    first step. As VCD, the contrast runs after the processors ``generate()`` puts first and before
    the sampling warpers; the official code runs all of them after it.

    Args:
        alpha: contrast strength; 0 keeps the plausibility cutoff only.
        beta: plausibility cutoff.
        gamma: share of image attention covered by the selected layers.
        lam: blind-token threshold in standard deviations above the mean (any finite number: the
            official scripts use 0.95..1.0; the code checks none).
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "alpha": Real(0),
        "beta": Real(0, 1),
        "gamma": Real(0, 1, low_open=True),
        "lam": Real(),
    }

    #: The official scripts' sampling: temperature 1, top-p 1 and no top-k (see above).
    generation_defaults: ClassVar[dict] = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        alpha: float = 1.0,
        beta: float = 0.1,
        gamma: float = 0.5,
        lam: float = 1.0,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
        self.alpha, self.beta, self.gamma, self.lam = alpha, beta, gamma, lam
        self.blind: torch.Tensor | None = None

    @torch.no_grad()
    def contrast_inputs(self) -> Inputs:
        probe = _PromptProbe()
        with intercept_attention(self.adapter.model, probe), auxiliary_forwards():
            self.adapter.run_prompt(self.inputs, logits_to_keep=1)
        image = self.adapter.image_mask(self.inputs["input_ids"])
        attention = torch.stack([probe.last_query[i] for i in sorted(probe.last_query)], dim=1)  # (B, L, P)
        self.blind = torch.zeros_like(image)
        for row in range(image.shape[0]):
            columns = image[row].nonzero().flatten()
            self.blind[row, columns] = blind_tokens(attention[row][:, columns], self.gamma, self.lam)
        embeddings = probe.embeddings.clone()
        embeddings[image & ~self.blind] = 0
        return {**self.inputs, "inputs_embeds": embeddings}

    def combine(self, log_probs: torch.Tensor, contrast_log_probs: torch.Tensor) -> torch.Tensor:
        broken = torch.isnan(contrast_log_probs).any(dim=-1, keepdim=True)
        contrast_log_probs = torch.where(broken, log_probs, contrast_log_probs)
        return contrast_with_cutoff(log_probs, contrast_log_probs, self.alpha, self.beta)

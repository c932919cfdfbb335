"""PAINT: PAI with local and summary image tokens weighted apart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import AttentionHook, ForwardContext, fit_keys, prompt_of_rows
from veridical.errors import InputError, MethodSpecError
from veridical.heads.boost import BOOST_RULES, AttentionBoost
from veridical.heads.paired import last_token_head_outputs, paired_forward
from veridical.params import Flag, Real, Rule
from veridical.registry import check_hyperparameters, register_method


def cls_attention(vision_tower: nn.Module, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """``(images, patches)``: CLS-query attention to each patch in one CLIP layer, summed over heads."""
    layers = vision_tower.encoder.layers
    index = layer % len(layers)
    out = vision_tower(pixel_values.to(vision_tower.dtype), output_hidden_states=True)
    block = layers[index]
    hidden = block.layer_norm1(out.hidden_states[index])
    attn = block.self_attn
    heads, head_dim = attn.num_heads, attn.head_dim
    batch, tokens, _ = hidden.shape
    query = attn.q_proj(hidden[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    key = attn.k_proj(hidden).view(batch, tokens, heads, head_dim).transpose(1, 2)
    probs = torch.softmax((query @ key.transpose(-1, -2)).float() * attn.scale, dim=-1)  # (B, H, 1, T)
    return probs[:, :, 0, 1:].sum(dim=1)


def iqr_outliers(values: torch.Tensor) -> int:
    """How many of ``values`` lie above Q3 + 1.5 IQR (quartiles interpolated as numpy's percentile)."""
    q1, q3 = torch.quantile(values.float(), torch.tensor([0.25, 0.75], device=values.device))
    return int((values > q3 + 1.5 * (q3 - q1)).sum())


@register_method("paint")
class PAINT(AttentionBoost):
    r"""PAI with separate boosts for local and summary image tokens.

    Arif et al., "PAINT: Paying Attention to INformed Tokens to Mitigate Hallucination in Large
    Vision-Language Model" ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination"); official
    code hasanar1f/PAINT (commit 2a9e8f8: ``modPAI/attention.py``,
    ``modPAI/llava/model/multimodal_encoder/clip_encoder.py``, ``modPAI/chair_eval.py``).

    From the CLIP tower's CLS-query attention (summed over heads; ``clip_encoder.py`` lines 38-39):

    - *summary* tokens: the :math:`k` patches with the largest attention in vision layer -2, where
      :math:`k` is the number of IQR outliers (above :math:`Q_3 + 1.5\,\mathrm{IQR}`) there
      (lines 16-29, 48);
    - *local* tokens: the top 25% by attention in vision layer 0, minus the summary tokens
      (lines 42, 46, 51-55).

    The last query's pre-softmax scores in decoder layers 2..31 (scaled to depth) get
    :math:`a \leftarrow a + 0.7|a|` on local tokens and :math:`a + 0.3|a|` on summary tokens
    (``attention.py`` lines 139-147), at every generated token; like PAI, the prompt's own forward is
    boosted only while the text-only contrast is off (``gamma=1``; line 139 tests ``not use_cfg``).
    Defaults are ``chair_eval.py``'s (``--alpha 0.7 --beta 0.3``, lines 51-52; local ratio 0.25 is
    fixed in ``clip_encoder.py`` line 37); its shipped command ``modpai_eval.sh`` line 17 runs
    ``--alpha 0.9 --beta 0.3 --use-cfg --gamma 1.1`` (``local_alpha=0.9, gamma=1.1``).

    Code and paper differ: the paper also scales the boost per head by its measured visual
    sensitivity; the released code does not. Default as the code; ``head_modulation=True`` adds a
    per-head factor: each head's output divergence with and without the image at the last prompt
    token (VHR's VHD) divided by its layer's mean, measured once on entry.

    The official code counts the summary tokens as ``int(n * outliers / n)``, which floating point can
    round one below the outlier count; here it is the count itself. It reads only the first image of a
    batch; here every image gets its own tokens.

    Applies to LLaVA-1.5 models (one vision-tower patch per image token) whose vision tower has a CLS
    token (CLIP); other families and CLS-less towers (SigLIP) raise.

    Args:
        local_alpha: boost of local tokens (0.7).
        summary_alpha: boost of summary tokens (0.3).
        local_ratio: share of patches taken as local candidates (0.25).
        head_modulation: scale the boost per head by visual sensitivity (paper variant).
        gamma, layers, boost_prefill: as :class:`~veridical.heads.pai.PAI`.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "local_alpha": Real(0),
        "summary_alpha": Real(0),
        "local_ratio": Real(0, 1, low_open=True),
        "head_modulation": Flag(),
        **BOOST_RULES,
    }

    families = ("llava",)

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        local_alpha: float = 0.7,
        summary_alpha: float = 0.3,
        local_ratio: float = 0.25,
        head_modulation: bool = False,
        gamma: float = 1.0,
        layers: Sequence[int] | None = None,
        boost_prefill: bool | None = None,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs, gamma, layers, boost_prefill)
        tower = model.model.vision_tower
        if getattr(getattr(tower, "embeddings", None), "class_embedding", None) is None:
            # Without a CLS token the CLS query would silently be the first patch.
            raise MethodSpecError(
                f"PAINT chooses tokens from the vision tower's CLS-token attention; "
                f"{type(tower).__name__} has no CLS token"
            )
        self.local_alpha, self.summary_alpha, self.local_ratio = local_alpha, summary_alpha, local_ratio
        self.head_modulation = head_modulation
        self.token_weights = self._token_weights()  # per prompt: one weight per image token
        self.head_factors: torch.Tensor | None = None

    @torch.no_grad()
    def _token_weights(self) -> list[torch.Tensor]:
        tower = self.model.model.vision_tower
        pixels = self.inputs["pixel_values"]
        local_scores = cls_attention(tower, pixels, 0)
        summary_scores = cls_attention(tower, pixels, -2)
        patches = local_scores.shape[1]
        with_cls = self.model.config.vision_feature_select_strategy == "full"
        per_image = []
        for local_row, summary_row in zip(local_scores, summary_scores, strict=True):
            weights = torch.zeros(patches)
            local = torch.topk(local_row, int(patches * self.local_ratio)).indices.cpu()
            summary = torch.topk(summary_row, iqr_outliers(summary_row)).indices.cpu()
            weights[local] = self.local_alpha
            weights[summary] = self.summary_alpha  # summary wins where both pick a patch
            per_image.append(torch.cat([torch.zeros(1), weights]) if with_cls else weights)
        counts = self.adapter.image_mask(self.inputs["input_ids"]).sum(dim=1).tolist()
        per_prompt, start = [], 0
        for count in counts:
            images = count // len(per_image[0])
            if images * len(per_image[0]) != count:
                raise InputError(
                    f"PAINT expects {len(per_image[0])} image tokens per image, a prompt has {count}"
                )
            per_prompt.append(torch.cat(per_image[start : start + images]))
            start += images
        return per_prompt

    def prepare(self) -> None:
        if self.head_modulation and self.head_factors is None:
            probe = _Sensitivity(self.layers, self.prompts, self.adapter.num_layers, self.adapter.num_heads)
            paired_forward(self.adapter, self.inputs, probe)
            divergence = probe.divergence  # (B, layers, heads)
            self.head_factors = divergence / divergence.mean(dim=-1, keepdim=True).clamp_min(1e-12)

    def key_weights(self, context: ForwardContext, keys: int) -> torch.Tensor:
        store = context.sequence.store
        key = self.store_key
        if key not in store:  # once per sequence: image tokens stay put, generated ones get nothing
            store[key] = self._scatter(context.image_keys(keys))
        return fit_keys(context.per_row(store[key]), keys)

    def _scatter(self, image_keys: torch.Tensor) -> torch.Tensor:
        """Each row's token weights onto its image positions (rows of another layout get none)."""
        weights = torch.zeros(image_keys.shape, dtype=torch.float32, device=image_keys.device)
        prompts = prompt_of_rows(self.prompts, image_keys.shape[0])
        for row, prompt in enumerate(prompts or []):
            row_weights = self.token_weights[prompt]
            if int(image_keys[row].sum()) == len(row_weights):  # not a contrast branch without image
                weights[row, image_keys[row]] = row_weights.to(weights.device)
        return weights

    def head_weights(self, layer: int, context: ForwardContext) -> torch.Tensor | None:
        if self.head_factors is None:
            return None
        return context.per_prompt(self.head_factors[:, layer])


class _Sensitivity(AttentionHook):
    """Records each head's output divergence with and without the image at the last prompt token."""

    needs_weights = False

    def __init__(self, layers: list[int], prompts: int, depth: int, heads: int):
        self.layers = layers
        self.prompts = prompts
        self.divergence = torch.ones(prompts, depth, heads)

    def edit_outputs(self, module: nn.Module, outputs: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        with_image, without_image = last_token_head_outputs(outputs, self.prompts)
        self.divergence[:, module.layer_idx] = (with_image - without_image).norm(dim=-1).cpu()
        return outputs

"""VAF: Visual Amplification Fusion (ClearSight)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import ForwardContext
from veridical.heads.base import HeadMethod, check_layers, layer_range
from veridical.params import Layers, Optional, Real, Rule
from veridical.registry import check_hyperparameters, register_method


@register_method("vaf")
class VAF(HeadMethod):
    r"""Middle-layer attention scores to the image scaled up, to the system prompt scaled down.

    Yin et al., "ClearSight: Visual Signal Enhancement for Object Hallucination Mitigation in
    Multimodal Large Language Models", CVPR 2025; official code ustc-hyin/ClearSight (commit 5466c94:
    ``visaug/inference/AttnAdapter.py``, ``infer_pope.py``, ``infer_pope.sh``).

    In layers 9..14 of a 32-layer decoder (``infer_pope.py`` lines 52-58: ``8 < i < 15``; the same
    relative depth on other models), every head's pre-softmax scores :math:`a = q k^\top/\sqrt d` of
    a text query after the image are multiplied, before the mask is added,

    .. math:: a_j \leftarrow \text{enhance}\cdot a_j \ (j \text{ an image token}), \qquad
              a_j \leftarrow \text{suppress}\cdot a_j \ (j \text{ before the image})

    (``AttnAdapter.py`` lines 68-78). At the prompt's forward only the query rows after the image are
    edited; at each decoding step the new token's row. Defaults as ``infer_pope.sh``:
    ``--enh-para 1.15 --sup-para 0.95``; ``enhance = suppress = 1`` leaves attention unchanged.
    The official script decodes greedily (``infer_pope.py`` lines 91-96 set no sampling) with the
    suffix " Please just answer yes or no." (protocol ``vaf``); no CHAIR setting is published.

    The product scales a score, not a probability: a positive score grows and a negative one falls,
    so the softmax over the image tokens sharpens as well as gaining mass.

    Differences from the official code: the columns come from each row's own tokens instead of the
    constants ``SYS_LEN = 35`` and ``IMG_LEN = 576`` (LLaVA-1.5 at 336 px with the vicuna_v1 system
    prompt): image columns are the row's image tokens (every image feature of LLaVA-NeXT and Qwen-VL,
    InstructBLIP's query tokens), "system" columns are the row's real tokens before its first image
    token (LLaVA-1.5's chat template without a system prompt has BOS and "USER:" there; InstructBLIP
    has none, so ``suppress`` does nothing), and the rows edited at the prompt's forward are those
    after the row's last image token, so left-padded batches get what each prompt gets alone. The
    official code edits scores in the model's dtype before the mask; here the mask is already added,
    so only real columns are scaled (padding stays masked) and the product is rounded to the
    scores' dtype as the official in-place product is. A prompt without an image is left alone.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "enhance": Real(0),
        "suppress": Real(0),
        "layers": Optional(Layers()),
    }

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        enhance: float = 1.15,
        suppress: float = 0.95,
        layers: Sequence[int] | None = None,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
        depth = self.adapter.num_layers
        self.layers = check_layers("VAF", layers, depth) if layers is not None else layer_range(9, 15, depth)
        self.enhance, self.suppress = enhance, suppress

    def column_scale(self, context: ForwardContext, keys: int) -> torch.Tensor:
        """``(rows, keys)`` factor of each key column: ``enhance`` on image columns, ``suppress`` on the
        real columns before a row's first image column, 1 elsewhere (and on rows without an image)."""
        image = context.image_keys(keys)
        valid = context.valid_keys
        real = torch.ones_like(image) if valid is None else valid.to(image.device)
        before_image = (image.cumsum(dim=-1) == 0) & real & image.any(dim=-1, keepdim=True)
        scale = torch.ones(image.shape, dtype=torch.float32, device=image.device)
        scale = scale.masked_fill(image, self.enhance)
        return scale.masked_fill(before_image, self.suppress)

    def edit_logits(self, module: nn.Module, logits: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        if not context.sequence.has_image:  # a contrast branch without the image
            return logits
        keys = logits.shape[-1]
        scale = context.once(  # (rows, 1, 1, keys), the same in every layer of this forward
            self, lambda: self.column_scale(context, keys).to(logits.device)[:, None, None, :], keys
        )
        if context.is_prefill:
            # Only the queries after the row's last image token (AttnAdapter.py lines 73-75).
            image = context.image_keys(keys).to(logits.device)
            columns = torch.arange(keys, device=logits.device)
            last_image = torch.where(image, columns, -1).amax(dim=-1)  # (rows,)
            queries = context.query_positions(logits.shape[2], logits.device)
            after = (queries[None, :] > last_image[:, None])[:, None, :, None]  # (rows, 1, queries, 1)
            scale = torch.where(after, scale, 1.0)
        return (logits.float() * scale).to(logits.dtype)

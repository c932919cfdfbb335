"""DeCo: Dynamic Correction Decoding."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import LogitsProcessor

from veridical.adapters import Inputs, get_adapter
from veridical.attention import intercept_attention
from veridical.layer_logits import LayerReadout, early_logits
from veridical.layers import check_layers, layer_range
from veridical.params import Integer, Layers, Optional, Real, Rule
from veridical.registry import check_hyperparameters, register_method


@register_method("deco")
class DeCo(LogitsProcessor, AbstractContextManager):
    r"""The final logits corrected by the preceding layer that is most confident in a candidate token.

    Wang et al., "MLLM Can See? Dynamic Correction Decoding for Hallucination Mitigation", ICLR 2025;
    official code zjunlp/Deco at fee8d75 (a vendored transformers 4.31: ``transformers/generation/
    utils.py``, ``transformers/models/llama/modeling_llama.py``; scripts ``chair_llava.py``,
    ``pope_llava.py``).

    At every generated token, from the step's own forward (no extra forward):

    1. Candidates (``utils.py`` lines 2661-2666): the final distribution's top ``top_k`` tokens, cut
       after the first whose cumulative probability reaches ``top_p`` (``searchsorted(..., right=False)
       + 1``, at most ``top_k``).
    2. Anchor layer (lines 2668-2675): the early-exit logits :math:`l_i = \mathrm{lm\_head}(\mathrm{norm}
       (h_i))` of each layer in the window (transformers' ``hidden_states[i]``, the input of layer
       :math:`i`, through the final norm: ``modeling_llama.py`` lines 819-824); the layer and candidate
       of the largest :math:`\mathrm{softmax}(l_i)` probability over the candidates (flat argmax: ties
       go to the earlier layer, then the higher-ranked candidate); :math:`p_{\max}` that probability.
    3. Mix (lines 2681-2682): :math:`l_N + \alpha\, p_{\max}\, l_{\text{anchor}}` on raw logits, every
       non-candidate set to :math:`-\infty`.

    Defaults of both official scripts: ``alpha=0.6``, ``top_p=0.9``, ``top_k=20``, window
    ``hidden_states[20..28]`` (``--start_layer 20 --end_layer 29``: ``chair_llava.py`` lines 136,
    171-175; ``pope_llava.py`` lines 123, 161-165), greedy; other depths get the same relative window.
    ``alpha=0`` leaves greedy decoding unchanged (the top token is always a candidate); sampling and
    beam search still keep only the candidates, as in the official code.

    Differences from the official code:

    - each row of a batch has its own candidates, anchor layer and :math:`p_{\max}` (the official greedy
      and sampling paths assume one prompt: ``.squeeze(0)`` then a slice of the token ids);
    - the early-exit probabilities are float32 (official: the model's dtype, float16 in its scripts);
    - the scores are returned as log-probabilities (a per-row shift of the official mix: the same
      greedy token and samples; under beam search the official code log-softmaxes the mix too);
    - processors ``generate()`` runs before this one (repetition penalty, ...) act before the mix,
      the official code runs them after it (its scripts use none); the candidates come from the scores
      this processor receives;
    - ``pope_llava.py`` passes ``alpha=args.aplha`` (line 120), which raises: its parser default 0.6
      is taken as the intended value.

    Use it around ``generate()`` (``veridical.generate`` does): its layer readout is attached for the
    span of the ``with`` block, and it is the logits processor to pass.

    Args:
        alpha: weight of the anchor layer's logits (times :math:`p_{\max}`); 0 leaves greedy decoding
            unchanged.
        top_p: cumulative probability that closes the candidate set.
        top_k: largest candidate set.
        layers: hidden-state indices of the window (inputs of those decoder layers); default
            ``hidden_states[20..28]`` of a 32-layer decoder, scaled.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "alpha": Real(0),
        "top_p": Real(0, 1, low_open=True),
        "top_k": Integer(1),
        "layers": Optional(Layers()),
    }
    #: Reads the hidden states of the forward that produced the scores (OPERA refuses it).
    reads_model_forward = True

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        alpha: float = 0.6,
        top_p: float = 0.9,
        top_k: int = 20,
        layers: Sequence[int] | None = None,
    ):
        check_hyperparameters(self, locals())
        self.adapter = get_adapter(model)
        self.adapter.validate_inputs(inputs)
        depth = self.adapter.num_layers
        self.layers = (
            check_layers("DeCo", layers, depth) if layers is not None else layer_range(20, 29, depth)
        )
        self.alpha, self.top_p, self.top_k = alpha, top_p, top_k
        self.readout = LayerReadout(self.adapter, self.layers)
        self._attached: AbstractContextManager | None = None

    def __enter__(self) -> DeCo:
        if self._attached is not None:
            raise RuntimeError("DeCo is already attached; build one instance per generate() call")
        self._attached = intercept_attention(self.adapter.model, self.readout)
        self._attached.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        attached, self._attached = self._attached, None
        if attached is not None:
            attached.__exit__(*exc)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        states = self.readout.read(scores.shape[0], "DeCo")
        with torch.no_grad():
            early = early_logits(self.adapter.lm_head, states, self.adapter.final_norm).to(scores.device)
        final = torch.log_softmax(scores.float(), dim=-1)
        probs, ids = final.exp().topk(min(self.top_k, final.shape[-1]), dim=-1)  # (rows, k), descending
        # The first rank whose cumulative probability reaches top_p closes the set.
        count = ((probs.cumsum(dim=-1) < self.top_p).sum(dim=-1, keepdim=True) + 1).clamp(max=ids.shape[-1])
        is_candidate = torch.arange(ids.shape[-1], device=ids.device) < count  # (rows, k)
        early_probs = torch.softmax(early, dim=-1).gather(-1, ids.expand(len(states), -1, -1))  # (L, rows, k)
        early_probs = early_probs.masked_fill(~is_candidate, -1.0).transpose(0, 1)  # (rows, L, k)
        p_max, flat = early_probs.flatten(1).max(dim=-1)  # layer-major: the first maximum wins
        anchor = early.transpose(0, 1)[torch.arange(len(flat)), flat // ids.shape[-1]]  # (rows, vocab)
        mixed = final + self.alpha * p_max[:, None] * anchor
        keep = torch.zeros_like(final, dtype=torch.bool).scatter(-1, ids, is_candidate)
        out = torch.log_softmax(mixed.masked_fill(~keep, -torch.inf), dim=-1)
        # Rows that other processors fully masked stay as they were instead of turning into NaN.
        dead = ~torch.isfinite(final).any(dim=-1, keepdim=True)
        return torch.where(dead, scores.float(), out).to(scores.dtype)

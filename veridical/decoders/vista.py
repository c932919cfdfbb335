"""VISTA: visual steering vectors and self-logits augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LogitsProcessor

from veridical.adapters import Inputs
from veridical.attention import AttentionHook, ForwardContext, auxiliary_forwards, prompt_rows
from veridical.errors import MethodSpecError
from veridical.heads.base import HeadMethod, check_layers, scale_index
from veridical.heads.paired import with_and_without_image
from veridical.outputs import language_output
from veridical.registry import register_method


def steer(update: torch.Tensor, vector: torch.Tensor, lam: float) -> torch.Tensor:
    r"""VISTA's norm-preserving push of MLP outputs ``(rows, tokens, d)`` towards ``vector`` ``(rows, d)``.

    .. math:: x \leftarrow \mathrm{normalize}\big(\mathrm{normalize}(x)
              + \lambda\,(1 + \max(0, \cos(x, -v)))\,\mathrm{normalize}(v)\big)\,\lVert x \rVert
    """
    x = update.float()
    v = vector.float()[:, None, :]
    strength = lam * (1 + F.cosine_similarity(x, -v, dim=-1).clamp_min(0))[..., None]
    steered = F.normalize(F.normalize(x, dim=-1) + strength * F.normalize(v, dim=-1), dim=-1)
    return (steered * x.norm(dim=-1, keepdim=True)).to(update.dtype)


class _SelfLogits(AttentionHook, LogitsProcessor):
    r"""Self-logits augmentation: mixes the final logits with ``lm_head`` of earlier residual states.

    :math:`(1 - w)\,l_{\text{final}} + w\,\overline{\mathrm{lm\_head}(h_i)}` over the window, where
    :math:`h_i` is the last position's residual stream entering layer :math:`i` (no final norm, as the
    official code), read from the model's own forward (never from a contrast branch).
    """

    observes_layer_inputs = True
    needs_weights = False
    #: Reads the hidden states of the forward that produced the scores (OPERA refuses it).
    reads_model_forward = True

    def __init__(self, lm_head: nn.Module, layers: list[int], weight: float):
        self.lm_head, self.layers, self.weight = lm_head, layers, weight
        self.states: dict[int, torch.Tensor] = {}

    def observe_layer_input(self, layer_idx: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        if not context.sequence.auxiliary:
            self.states[layer_idx] = hidden[:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        states = [self.states[i] for i in self.layers]
        if states[0].shape[0] != scores.shape[0]:
            raise RuntimeError("VISTA's logits augmentation saw no forward of this generate() call")
        with torch.no_grad():
            early = torch.stack([self.lm_head(h).float() for h in states]).mean(dim=0).to(scores.device)
        final = torch.log_softmax(
            scores.float(), dim=-1
        )  # a per-row shift of the logits, as under beam search
        mixed = torch.log_softmax((1 - self.weight) * final + self.weight * early, dim=-1)
        return torch.where(torch.isfinite(final), mixed, final).to(scores.dtype)


@register_method("vista")
class VISTA(HeadMethod):
    r"""Visual Information Steering with Token-logit Augmentation.

    Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via
    Visual Information Steering", ICML 2025; official code LzVv123456/VISTA (``llm_layers.py``,
    ``steering_vector.py``).

    1. *Visual steering vector*: for every decoder layer :math:`l`, :math:`v_l` = the layer's output at
       the last prompt token with the image minus without it (one stacked forward on entry, per
       prompt). Each layer's MLP output is then steered at every position and step by :func:`steer`
       with ``lam`` (0.17 for captioning, 0.01 for yes/no questions as the official scripts;
       ``veridical eval pope`` uses 0.01 unless you set it).
    2. *Self-logits augmentation*: the next-token logits become :math:`0.7\,l + 0.3` x the mean of
       ``lm_head`` applied to the residual states of hidden-state indices 25..30 (LLaVA-7B, scaled to
       the model's depth), without the final norm as in the code. Exposed as :attr:`logits_processor`.

    Args:
        lam: steering strength; 0 disables steering.
        logits_alpha: weight of the early-layer logits; 0 disables the augmentation.
        logits_layers: hidden-state indices of the augmentation window (default: scaled 25..30).
        layers: decoder layers whose MLP output is steered (default: all).
    """

    needs_weights = False
    #: Official per-task settings that ``veridical eval`` applies unless the user sets them.
    benchmark_hyperparameters: ClassVar[dict[str, dict[str, Any]]] = {"pope": {"lam": 0.01}}

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        lam: float = 0.17,
        logits_alpha: float = 0.3,
        logits_layers: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
    ):
        super().__init__(model, inputs)
        if lam < 0:
            raise MethodSpecError(f"VISTA lam must be >= 0, got {lam}")
        if not 0 <= logits_alpha <= 1:
            raise MethodSpecError(f"VISTA logits_alpha must be in [0, 1], got {logits_alpha}")
        depth = self.adapter.num_layers
        self.steered = check_layers("VISTA", layers, depth) if layers is not None else list(range(depth))
        if logits_layers is None:
            first, last = (min(max(scale_index(i, depth), 1), depth - 1) for i in (25, 30))
            logits_layers = range(first, last + 1)
        window = check_layers("VISTA logits", logits_layers, depth)
        if window[0] < 1:
            raise MethodSpecError("VISTA logits_layers are hidden-state indices from 1 (0 is the embeddings)")
        self.lam, self.logits_alpha = lam, logits_alpha
        self.augmentation = _SelfLogits(self.adapter.lm_head, window, logits_alpha) if logits_alpha else None
        self.logits_processor = self.augmentation
        self.vectors: torch.Tensor | None = None
        self._handles: list[Any] = []

    @torch.no_grad()
    def prepare(self) -> None:
        if self.lam and self.vectors is None:
            with auxiliary_forwards():
                output = self.adapter.run_prompt(
                    with_and_without_image(self.adapter, self.inputs),
                    output_hidden_states=True,
                    logits_to_keep=1,
                )
            last = torch.stack(language_output(output).hidden_states[1:], dim=1)[
                :, :, -1
            ].float()  # (2B, layers, d)
            self.vectors = last[: self.prompts] - last[self.prompts :]

    def hooks(self) -> list[AttentionHook]:
        return [self.augmentation] if self.augmentation else []

    def __enter__(self) -> VISTA:
        super().__enter__()
        if self.lam:
            for layer in self.steered:
                mlp = self.adapter.layers[layer].mlp
                self._handles.append(mlp.register_forward_hook(self._steer_hook(layer)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().__exit__(*exc)

    def _steer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            vectors = prompt_rows(self.vectors[:, layer], output.shape[0]).to(output.device)
            return steer(output, vectors, self.lam)

        return hook

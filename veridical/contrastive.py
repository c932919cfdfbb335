"""Two-branch contrast, the core of contrastive decoders (VCD, M3ID, AvisC, ...) and of PAI's text-only
contrast: a logits processor that runs a contrast branch beside the main rows and combines the two
next-token distributions. Methods subclass :class:`ContrastiveDecoder`; none imports another method."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LogitsProcessor

from veridical.adapters import Inputs, ModelAdapter, get_adapter
from veridical.branch import Branch
from veridical.contrast import contrast_inputs
from veridical.fusion import BranchFusion


class ContrastiveDecoder(LogitsProcessor):
    """A logits processor that compares each step's scores with a contrast branch's logits.

    Subclasses build the contrast inputs and implement :meth:`combine`. The branch keeps its own
    KV cache, follows beam reordering and expanded rows (see :class:`veridical.branch.Branch`).
    One instance serves one ``generate()`` call.

    Used as a context manager around ``generate()`` (``veridical.generate`` does this), the branch
    runs in the same batched forward as the main rows from the second token on
    (:class:`veridical.fusion.BranchFusion`); as a bare logits processor it runs its own forward.
    """

    def __init__(self, model: nn.Module, inputs: Inputs):
        self.adapter: ModelAdapter = get_adapter(model)
        self.adapter.validate_inputs(inputs)
        self.inputs = inputs
        self._branch: Branch | None = None
        #: The fusion the branch joins, set while one is entered for this decoder.
        self.fusion: BranchFusion | None = None
        self._own_fusion: BranchFusion | None = None
        #: Tokens generated before the current step (0 at the first generated token).
        self.generated = 0

    def __enter__(self) -> ContrastiveDecoder:
        self._own_fusion = BranchFusion(self.adapter.model, [self]).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        fusion, self._own_fusion = self._own_fusion, None
        if fusion is not None:
            fusion.__exit__(*exc)

    def contrast_inputs(self) -> Inputs:
        """Inputs of the contrast branch; called once, lazily, at the first generation step."""
        raise NotImplementedError

    def combine(self, log_probs: torch.Tensor, contrast_log_probs: torch.Tensor) -> torch.Tensor:
        """New scores from the main and contrast branches' float32 log-probabilities (rows, vocab)."""
        raise NotImplementedError

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._branch is None:
            branch_inputs = self.contrast_inputs()
            self._branch = Branch(self.adapter, branch_inputs, self.inputs["input_ids"], self.fusion)
        self.generated = input_ids.shape[1] - self.inputs["input_ids"].shape[1]
        contrast = self._branch.next_logits(input_ids).to(scores.device)
        # Scores are raw logits under greedy/sampling and log-probabilities under beam search; the
        # log-softmax makes both the same, and is a per-row shift that changes no argmax or sample.
        log_probs = torch.log_softmax(scores.float(), dim=-1)
        combined = self.combine(log_probs, torch.log_softmax(contrast, dim=-1))
        # Rows that other processors fully masked stay as they were instead of turning into NaN.
        dead = ~torch.isfinite(log_probs).any(dim=-1, keepdim=True)
        return torch.where(dead, scores.float(), combined).to(scores.dtype)


def plausibility_mask(log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """True for tokens outside the adaptive plausibility set ``p >= beta * max p`` (VCD, Li et al.)."""
    cutoff = torch.log(torch.tensor(beta, dtype=log_probs.dtype)) + log_probs.amax(dim=-1, keepdim=True)
    return log_probs < cutoff


def contrast_with_cutoff(
    log_probs: torch.Tensor, contrast_log_probs: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    r"""Log-softmax of :math:`(1 + \alpha) l - \alpha l'` on VCD's plausibility set, -inf off it."""
    scores = (1 + alpha) * log_probs - alpha * contrast_log_probs
    scores = scores.masked_fill(plausibility_mask(log_probs, beta), float("-inf"))
    return torch.log_softmax(scores, dim=-1)


class TextOnlyContrast(ContrastiveDecoder):
    r"""The prompt without its image as the contrast, combined as
    :math:`(1 + \alpha) l - \alpha l_{\text{text}}` on the plausibility set ``p >= beta * max p``
    (:func:`contrast_with_cutoff`).

    Classifier-free guidance towards the image: PAI's ``gamma`` is ``1 + alpha`` (LALBJ/PAI ``CFG.py``
    lines 29-57); the same as VCD with ``contrast="no_image"``.
    """

    def __init__(self, model: nn.Module, inputs: Inputs, alpha: float, beta: float):
        super().__init__(model, inputs)
        self.alpha, self.beta = alpha, beta

    def contrast_inputs(self) -> Inputs:
        return contrast_inputs(self.adapter, self.inputs, "no_image")

    def combine(self, log_probs: torch.Tensor, contrast_log_probs: torch.Tensor) -> torch.Tensor:
        return contrast_with_cutoff(log_probs, contrast_log_probs, self.alpha, self.beta)

"""PAI: Paying More Attention to Image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import ForwardContext
from veridical.heads.boost import BOOST_RULES, AttentionBoost
from veridical.params import Real, Rule
from veridical.registry import check_hyperparameters, register_method


@register_method("pai")
class PAI(AttentionBoost):
    r"""Image attention amplification before the softmax.

    Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating
    Hallucination in LVLMs", ECCV 2024; official code LALBJ/PAI (commit 9bbd8bd: ``attention.py``,
    ``CFG.py``, ``model_loader.py``).

    In layers 2..31 of a 32-layer decoder (the same relative depth on other models), the last query
    row's pre-softmax scores :math:`a` to image keys are raised by their magnitude,

    .. math:: a_j \leftarrow a_j + \alpha\,|a_j| \quad (j \text{ an image token})

    (``attention.py`` lines 90-94: row ``-1``, columns ``img_start_idx:img_end_idx``, after the mask),
    at every generated token. Defaults as the official scripts: ``alpha=0.2``, ``--start-layer 2
    --end-layer 32`` (``pope_eval.py``/``chair_eval.py`` lines 50, 54-55).

    ``gamma > 1`` adds the official text-only contrast (``--use-cfg --gamma 1.1``, ``CFG.py`` lines
    29-57): :math:`\gamma\,l - (\gamma - 1)\,l_{\text{text}}` over log-probabilities with a
    plausibility cutoff at 0.1 of the top probability, where :math:`l_{\text{text}}` comes from the
    prompt without the image. It is exposed as :attr:`logits_processor`, which
    :func:`veridical.generate` adds; with the bare context manager pass it to ``model.generate``
    yourself.

    The prompt's own forward (prefill, which produces the first generated token: the whole answer on
    POPE) is boosted only while the contrast is off, as in the official code: ``attention.py`` boosts
    only ``if use_attn and not use_cfg`` (line 90); ``llama_modify`` sets ``use_cfg`` to the
    command's ``--use-cfg`` before ``generate`` (line 125), and only the contrast processor, after the
    prefill, sets it back to ``False`` (``CFG.py`` line 49) once it has run the image-free branch
    with it ``True`` (lines 33-47). So with the contrast on, the prefill and the image-free branch run
    unboosted and every later token is boosted; without it, every forward is boosted.
    ``boost_prefill=True`` boosts the prefill with the contrast on too (the paper describes no
    exception).

    Default ``gamma=1`` (contrast off), the official scripts' own default (``--use-cfg`` is a flag,
    ``pope_eval.py`` line 52) and what keeps PAI alone a pure attention intervention. Every command
    the official README publishes adds ``--use-cfg --gamma 1.1``: ``gamma=1.1`` reproduces them.

    Differences from the official code: image columns come from each row's image tokens (batches,
    left padding), not one ``img_start_idx:img_end_idx`` slice for the batch; the image-free
    branch follows beam search (the official one does not reorder with the beams); the contrast's
    scores are returned as log-probabilities, as the official processor returns them.

    Args:
        model: a supported vision-language model.
        inputs: the processor's output passed to ``generate``.
        alpha: amplification; 0 leaves attention unchanged.
        gamma: text-only contrast strength; 1 disables it.
        layers: decoder layers to modify (default: the scaled official range).
        boost_prefill: boost the prompt's forward too; default: only when ``gamma == 1`` (official).
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {"alpha": Real(0), **BOOST_RULES}

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        alpha: float = 0.2,
        gamma: float = 1.0,
        layers: Sequence[int] | None = None,
        boost_prefill: bool | None = None,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs, gamma, layers, boost_prefill)
        self.alpha = alpha

    def key_weights(self, context: ForwardContext, keys: int) -> torch.Tensor:
        """Every image column by ``alpha`` (``attention.py`` lines 90-94)."""
        return context.image_keys(keys).float() * self.alpha

"""VISTA: visual steering vectors and self-logits augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LogitsProcessor

from veridical.adapters import Inputs, ModelAdapter
from veridical.attention import AttentionHook, auxiliary_forwards, prompt_rows
from veridical.errors import MethodSpecError
from veridical.heads.base import HeadMethod, check_layers, scale_index
from veridical.heads.paired import with_and_without_image
from veridical.layer_logits import LayerReadout, early_logits
from veridical.params import Flag, Layers, Optional, Real, Rule
from veridical.registry import check_hyperparameters, register_method

#: The official self-logits window (``--logits-layers 25,30``) and the depth it was written for.
OFFICIAL_WINDOW = (25, 30)


def steer(update: torch.Tensor, vector: torch.Tensor, lam: float) -> torch.Tensor:
    r"""VISTA's norm-preserving push of MLP outputs ``(rows, tokens, d)`` towards ``vector`` ``(rows, d)``.

    .. math:: x \leftarrow \mathrm{normalize}\big(\mathrm{normalize}(x)
              + \lambda\,(1 + \max(0, \cos(x, -v)))\,\mathrm{normalize}(v)\big)\,\lVert x \rVert

    (``llm_layers.py`` lines 26-30 of LzVv123456/VISTA at dc62252, with one vector per layer.)
    """
    neg_unit, unit = vector_units(vector.float()[:, None, :])
    return steer_with_units(update, neg_unit, unit, lam)


def vector_units(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``-v / max(|v|, 1e-8)`` and ``normalize(v)`` over the last dimension of float32 ``vectors``.

    What :func:`steer` divides the steering vector by, computed once per vector rather than at every
    layer and decoding step: ``torch.cosine_similarity`` normalises each side by its norm clamped at
    its ``eps`` (1e-8) before the dot product, ``F.normalize`` clamps at 1e-12.
    """
    neg = -vectors
    neg_unit = neg / torch.linalg.vector_norm(neg, 2, dim=-1, keepdim=True).clamp_min(1e-8)
    return neg_unit, F.normalize(vectors, dim=-1)


def steer_with_units(
    update: torch.Tensor, neg_unit: torch.Tensor, unit: torch.Tensor, lam: float
) -> torch.Tensor:
    """:func:`steer` with the vector's :func:`vector_units` ``(rows, 1, d)`` given.

    The same operations as ``cosine_similarity``, ``normalize`` and ``norm`` in :func:`steer`, in the
    same order, with the norm of ``update`` computed once instead of three times: the same bits
    (``tests/test_heads.py::test_vista_steering_fast_path_is_bitwise_the_formula``).
    """
    x = update if update.dtype == torch.float32 else update.float()
    norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True)
    cos = ((x / norm.clamp_min(1e-8)) * neg_unit).sum(dim=-1, keepdim=True)
    strength = lam * (1 + cos.clamp_min(0))
    direction = x / norm.clamp_min(1e-12) + strength * unit
    steered = direction / torch.linalg.vector_norm(direction, 2, dim=-1, keepdim=True).clamp_min(1e-12)
    steered = steered * norm
    return steered if steered.dtype == update.dtype else steered.to(update.dtype)


def default_logits_window(depth: int) -> list[int]:
    """The official window 25..30 of a 32-layer decoder at the same relative depth of a ``depth``-deep one.

    Indices are layer outputs, as the official code counts them. At 32 layers the window ends one
    layer before the last (whose output, after the final norm, gives the logits themselves); the
    scaled window never reaches past that either.
    """
    first, last = (scale_index(i, depth) for i in OFFICIAL_WINDOW)
    last = max(0, min(last, depth - 2))
    return list(range(min(first, last), last + 1))


def _official_numbers(name: str, text: str, count: tuple[int, ...]) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in count:
        forms = " or ".join(",".join(["n"] * k) for k in count)
        raise MethodSpecError(f"VISTA {name} {text!r}: expected comma-separated integers ({forms})")
    return numbers


def logits_window(layers: Sequence[int] | str | None, depth: int) -> list[int]:
    """Layer outputs averaged by the self-logits augmentation.

    ``None``: :func:`default_logits_window`. A string ``"a,b"`` is the official ``--logits-layers``:
    the outputs of layers ``a..b``, both included (negative indices count from the end, as the
    official list indexing does). A sequence lists layer outputs. Index ``depth - 1`` is the last
    layer's output after the final norm, as in the official code (transformers' last hidden state).
    """
    if layers is None:
        return default_logits_window(depth)
    if isinstance(layers, str):
        first, last = _official_numbers("logits_layers", layers, (2,))
        layers = list(range(first, last + 1))
    if isinstance(layers, int):
        layers = [layers]
    if not all(isinstance(i, int) for i in layers):
        raise MethodSpecError(f"VISTA logits_layers must be layer indices or 'a,b', got {layers!r}")
    window = [i + depth if -depth <= i < 0 else i for i in layers]
    bad = [i for i in window if not 0 <= i < depth]
    if bad or not window:
        raise MethodSpecError(
            f"VISTA logits_layers {layers!r} are not layer outputs 0..{depth - 1} of this decoder"
        )
    return window


def steering_pairs(layers: Sequence[int] | str | None, depth: int) -> list[tuple[int, int]]:
    """``(steered layer, steering vector's layer)`` pairs.

    ``None``: every layer with its own vector. A string is the official ``--layers``: ``"s,e"``
    steers layers ``s:e`` (a Python slice) with their own vectors, ``"a,b,c,d"`` steers layers
    ``a:b`` with the vectors of layers ``c:d``, paired in order (``llm_layers.py`` lines 136-150). A
    sequence lists layers, each steered with its own vector.
    """
    if layers is None:
        return [(i, i) for i in range(depth)]
    if isinstance(layers, str):
        numbers = _official_numbers("layers", layers, (2, 4))
        steered = range(depth)[numbers[0] : numbers[1]]
        sources = range(depth)[numbers[-2] : numbers[-1]]
        if not steered or len(sources) < len(steered):
            raise MethodSpecError(
                f"VISTA layers {layers!r} select {len(steered)} layer(s) and {len(sources)} vector(s) of "
                f"a {depth}-layer decoder; each steered layer needs a vector"
            )
        return list(zip(steered, sources, strict=False))
    return [(i, i) for i in check_layers("VISTA", layers, depth)]


def layer_outputs(adapter: ModelAdapter, inputs: Inputs) -> torch.Tensor:
    """``(rows, layers, d)``: every decoder layer's raw output at the last prompt token (float32).

    Read with forward hooks on the layers, as the official ``ForwardTracer`` does
    (``steering_vector.py`` lines 65-88): the last layer's output comes before the final norm.
    """
    outputs: dict[int, torch.Tensor] = {}

    def record(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden[:, -1].float()

        return hook

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(adapter.layers)]
    try:
        with auxiliary_forwards():
            adapter.run_prompt(inputs, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([outputs[i] for i in range(len(adapter.layers))], dim=1)


class _SelfLogits(LogitsProcessor):
    r"""Self-logits augmentation: mixes the final logits with ``lm_head`` of earlier layer outputs.

    :math:`(1 - w)\,l_{\text{final}} + w\,\overline{\mathrm{lm\_head}(h_i)}` over the window, where
    :math:`h_i` is layer :math:`i`'s output at the last position (the residual stream entering layer
    :math:`i + 1`, no final norm; the last layer's output after the final norm, as the official
    code's hidden states), read from the model's own forward (never from a contrast branch) by a
    :class:`~veridical.layer_logits.LayerReadout`.
    """

    #: Reads the hidden states of the forward that produced the scores (OPERA refuses it).
    reads_model_forward = True

    def __init__(self, adapter: ModelAdapter, window: list[int], weight: float):
        self.lm_head, self.window, self.weight = adapter.lm_head, window, weight
        # Layer i's output is transformers' hidden_states[i + 1]: the input of layer i + 1, or for the
        # last layer the final norm's output.
        self.indices = [i + 1 for i in window]
        self.readout = LayerReadout(adapter, self.indices)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        states = self.readout.read(scores.shape[0], "VISTA's logits augmentation", self.indices)
        with torch.no_grad():
            if len(states) == 1:  # the mean of one is itself
                early = self.lm_head(states[0]).float()
            else:
                # At most 5e-7 from per-layer products in the scores of the test models.
                early = early_logits(self.lm_head, states).mean(dim=0)
        if early.device != scores.device:
            early = early.to(scores.device)
        raw = scores if scores.dtype == torch.float32 else scores.float()
        # A per-row shift of the logits (the official code mixes raw logits), as under beam search.
        final = torch.log_softmax(raw, dim=-1)
        # Tokens another processor removed stay removed (the official code mixes before them all);
        # masking before the product keeps logits_alpha=1 free of 0 * -inf.
        allowed = torch.isfinite(final)
        mixed = torch.where(allowed, (1 - self.weight) * final + self.weight * early, -torch.inf)
        alive = allowed.any(dim=-1, keepdim=True)
        out = torch.where(alive, torch.log_softmax(mixed, dim=-1), raw)
        return out if out.dtype == scores.dtype else out.to(scores.dtype)


@register_method("vista")
class VISTA(HeadMethod):
    r"""Visual Information Steering with Token-logit Augmentation.

    Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via
    Visual Information Steering", ICML 2025; official code LzVv123456/VISTA at dc62252
    (``llm_layers.py``, ``steering_vector.py``, ``llava/model/language_model/llava_llama.py``).

    1. *Visual steering vector* (``steering_vector.py`` ``obtain_vsv``, lines 113-129): for every
       decoder layer :math:`l`, :math:`v_l` = the layer's raw output (no final norm, also for the
       last layer) at the last prompt token with the image minus without it (one stacked forward on
       entry, per prompt). Each steered layer's MLP output is then pushed at every position and step
       by :func:`steer` with ``lam`` (``run_chair.sh`` 0.17, ``run_pope.sh`` 0.01; ``veridical eval
       pope`` uses 0.01 unless you set it).
    2. *Self-logits augmentation* (``llava_llama.py`` lines 93-103): the next-token logits become
       :math:`0.7\,l + 0.3` x the mean of ``lm_head`` applied to the outputs of layers 25..30 (the
       official ``--logits-layers 25,30``, which indexes the hidden states after dropping the
       embeddings: transformers' ``hidden_states[26..31]``), without the final norm. Exposed as
       :attr:`logits_processor`. Other depths get the same relative window, ending at least one layer
       before the last (:func:`default_logits_window`).

    The official ``obtain_vsv`` fits a rank-1 PCA to the one (image - no image) difference of a
    prompt and returns ``component + mean``. The centred data of a single row are zero, so its
    component is the first unit vector (what SVD returns for a zero matrix; the sign flip makes it
    positive): the official vectors carry an extra +1 at layer 0, dimension 0. ``official_pca=True``
    (default) reproduces it; ``False`` gives the plain difference the paper describes.

    Other differences from the official code:

    - one steering vector per prompt of a batch (the official scripts run batch size 1);
    - the augmentation mixes after any processors ``generate()`` runs before it (repetition
      penalty, ...), the official code before all of them (the official scripts use none);
    - a window or ``layers`` written as a list uses veridical's list form (below); the official
      strings are accepted as strings.

    Args:
        lam: steering strength; 0 disables steering.
        logits_alpha: weight of the early-layer logits; 0 disables the augmentation.
        logits_layers: layer outputs averaged: ``"a,b"`` (official, ``a..b`` inclusive), a list of
            layer indices, or ``None`` (25..30 scaled). Index ``depth - 1`` reads the last layer's
            output after the final norm, as the official code.
        layers: steered layers: ``"s,e"`` (official, layers ``s:e`` with their own vectors),
            ``"a,b,c,d"`` (official, layers ``a:b`` with the vectors of layers ``c:d``), a list of
            layers (each with its own vector), or ``None`` (all).
        official_pca: add the official single-pair PCA's +1 at layer 0, dimension 0.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lam": Real(0),
        "logits_alpha": Real(0, 1),
        "logits_layers": Optional(Layers(negative=True, forms=(2,))),
        "layers": Optional(Layers(forms=(2, 4))),
        "official_pca": Flag(),
    }

    needs_weights = False
    #: Official per-task settings that ``veridical eval`` applies unless the user sets them.
    benchmark_hyperparameters: ClassVar[dict[str, dict[str, Any]]] = {"pope": {"lam": 0.01}}

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        lam: float = 0.17,
        logits_alpha: float = 0.3,
        logits_layers: Sequence[int] | str | None = None,
        layers: Sequence[int] | str | None = None,
        official_pca: bool = True,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
        depth = self.adapter.num_layers
        self.pairs = steering_pairs(layers, depth)
        window = logits_window(logits_layers, depth)
        self.lam, self.logits_alpha, self.official_pca = lam, logits_alpha, official_pca
        self.augmentation = _SelfLogits(self.adapter, window, logits_alpha) if logits_alpha else None
        self.logits_processor = self.augmentation
        self.vectors: torch.Tensor | None = None
        #: Per steering vector's layer: :func:`vector_units` of every prompt's vector ``(B, 1, d)``.
        self._units: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []

    @torch.no_grad()
    def prepare(self) -> None:
        if self.lam and self.vectors is None:
            outputs = layer_outputs(self.adapter, with_and_without_image(self.adapter, self.inputs))
            self.vectors = outputs[: self.prompts] - outputs[self.prompts :]  # (B, layers, d)
            if self.official_pca:
                self.vectors[:, 0, 0] += 1

    def hooks(self) -> list[AttentionHook]:
        return [self.augmentation.readout] if self.augmentation else []

    def __enter__(self) -> VISTA:
        super().__enter__()
        if self.lam:
            # The vectors are fixed for the call: their norms are taken once here, not per layer and step.
            neg_units, units = vector_units(self.vectors.float())
            self._units = {
                source: (neg_units[:, source, None].contiguous(), units[:, source, None].contiguous())
                for source in {source for _, source in self.pairs}
            }
            for layer, source in self.pairs:
                mlp = self.adapter.layers[layer].mlp
                self._handles.append(mlp.register_forward_hook(self._steer_hook(source)))
        if self.augmentation is not None and self.augmentation.readout.reads_final:
            self._handles.append(self.augmentation.readout.attach_final_norm())
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._units = {}
        super().__exit__(*exc)

    def _steer_hook(self, source: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            neg_unit, unit = (prompt_rows(units, output.shape[0]) for units in self._units[source])
            if unit.device != output.device:
                neg_unit, unit = neg_unit.to(output.device), unit.to(output.device)
            return steer_with_units(output, neg_unit, unit, self.lam)

        return hook

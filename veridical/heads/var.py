"""VAR: visual attention redistribution away from sink tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import ForwardContext, fit_keys
from veridical.errors import MethodSpecError
from veridical.heads.base import HeadMethod, check_layers, layer_range, prefill_columns
from veridical.heads.sinks import detect_sink_dims, known_sink_dims, rms_normalized
from veridical.params import Custom, Flag, Layers, Optional, Real, Rule
from veridical.registry import check_hyperparameters, register_method


def _sink_dims(value: Any) -> bool:
    """``None``, ``"auto"`` or a list of dimensions (whether they exist is checked on the model)."""
    if value is None or value == "auto":
        return True
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    )


@register_method("var")
class VAR(HeadMethod):
    r"""Visual Attention Redistribution.

    Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025;
    official code seilk/VisAttnSink at 98e62d6 (``src/logic/logic.py``: ``DimProspector`` L98-110,
    ``HeadFork`` L112-145, ``VARProcessor`` L147-212; defaults in ``A_exps/lv1.5_7b.yml``).

    *Sinks.* At prefill, for layers 2..L-1 (scaled from 32 layers), token :math:`j` is a sink of layer
    :math:`l` when its residual stream entering :math:`l`, RMS-normalised without weight, exceeds
    ``tau`` (20) in any sink dimension (LLaMA-2-7B: 2533, 1415; see :mod:`veridical.heads.sinks`).
    Sinks are fixed after prefill; generated tokens are never sinks.

    *Image-centric rows.* In a layer with at least one image sink, a (head, query) row is selected
    when its attention to image tokens is at least ``summ`` (0.2) and the sink share of that image
    attention, :math:`\sum_{\text{img sinks}} a / (\sum_{\text{img}} a + 10^{-6} n_{\text{img}})`, is
    at most ``rho`` (0.5). At prefill only rows after the (last) image are eligible.

    *Redistribution.* In a selected row every sink, text sinks included, keeps ``p`` (0.6) of its
    weight; the freed mass :math:`(1-p)\sum_{\text{sinks}} a` goes to the non-sink image tokens in
    proportion to their weights, so the row still sums to 1.

    Code and paper differ on the last layer: the paper excludes it, the code's skip flag is dead
    (``VARProcessor.except_last_layer = False`` at L148 shadows the configured value, so L169 never
    skips) and it is modified. Default as the code; ``skip_last_layer=True`` is the paper.

    Differences from the official code (its behaviours that are not carried over):

    - Sink dimensions: the code tests LLaMA-2-7B's dimensions (2533, 1415) on every model
      (``DefaultVars.dim_sink`` is fixed from ``llm_name = "llama-v2-7b"``, L10-15, and ``set_llm_name``
      never updates it), LLaVA-1.5-13B included. Here each model gets its own published dimensions
      (13B: 2100, 4743, as in ``src/logic/constants.py`` L10), keyed on its text architecture, or
      detected ones.
    - Sinks across prompts: the code's token counter lives in a class-level dictionary that
      ``StashEngine.clear()`` does not reset (``src/stash.py`` L24-29, L88-93, L119-120), so sinks are
      found only during the first prompt's prefill (``src/model/llava.py`` L314-316); every later
      prompt reuses the first prompt's sink positions and is never limited to rows after the image
      (L179). Here each prompt's sinks and image rows are its own.
    - Start token: the code rebuilds the prompt ids without special tokens (``src/mm_utils.py``
      L203-212, ``src/stash.py`` L230 and L283), so LLaVA sees no ``<s>``. Here the prompt is used as
      the processor built it: with ``<s>``, itself a massive-activation token and so a text sink
      whose attention is redistributed in selected rows.
    - Batches: the code runs one prompt at a time (it pools sink indices over the batch); here
      sinks, image positions and the "after the image" rule are per row, so left-padded batches and
      beams give each row its own.
    - Precision: the code edits float16 probabilities; here they are edited in float32.
    - A selected row whose image tokens are all sinks has nothing to receive the freed mass: the
      code divides by zero (NaN), here the row is left as it is.

    Beyond the paper, ``sink_dims="auto"`` (the default for models without published dimensions)
    detects them from the prompts and caches them per model, so VAR runs on every family.

    Args:
        p: share of attention a sink keeps; 1 leaves attention unchanged.
        rho: largest sink share of image attention for a row to be selected.
        summ: smallest image attention for a row to be selected.
        tau: sink threshold on the normalised residual stream.
        sink_dims: dimensions to test, ``"auto"`` (detect), or ``None`` (published if known, else auto).
        sink_ratio: for ``"auto"``: how many times the median dimension's peak a sink dimension's
            peak must reach (see :func:`~veridical.heads.sinks.detect_sink_dims`).
        skip_last_layer: leave the last layer alone (paper variant).
        layers: decoder layers to find sinks and redistribute in.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "p": Real(0, 1),
        "rho": Real(0, 1),
        "summ": Real(0, 1),
        # Any finite threshold is meaningful (the code checks none); below 0 every token is a sink.
        "tau": Real(),
        "sink_dims": Custom(
            _sink_dims, "a list of hidden dimensions >= 0, 'auto' or None", "dimensions | auto | None"
        ),
        "sink_ratio": Real(0),
        "skip_last_layer": Flag(),
        "layers": Optional(Layers()),
    }

    observes_layer_inputs = True

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        p: float = 0.6,
        rho: float = 0.5,
        summ: float = 0.2,
        tau: float = 20.0,
        sink_dims: Sequence[int] | str | None = None,
        sink_ratio: float = 5.0,
        skip_last_layer: bool = False,
        layers: Sequence[int] | None = None,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
        depth = self.adapter.num_layers
        chosen = check_layers("VAR", layers, depth) if layers is not None else layer_range(2, 32, depth)
        if skip_last_layer:
            chosen = [i for i in chosen if i != depth - 1]
        self.layers = chosen
        self.p, self.rho, self.summ, self.tau = p, rho, summ, tau
        if sink_dims is None:
            sink_dims = known_sink_dims(self.adapter) or "auto"
        if sink_dims == "auto":
            sink_dims = detect_sink_dims(model, inputs, self.layers, min_ratio=sink_ratio)
        hidden = int(self.adapter.text_config.hidden_size)
        if any(not 0 <= int(d) < hidden for d in sink_dims):
            raise MethodSpecError(f"VAR sink_dims {list(sink_dims)} are outside 0..{hidden - 1}")
        self.sink_dims = [int(d) for d in sink_dims]

    # -- sinks, decided at prefill ------------------------------------------------------------
    def observe_layer_input(self, layer_idx: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        if not context.is_prefill:
            return
        if self.sink_dims:
            values = rms_normalized(hidden)[..., self.sink_dims].abs().amax(dim=-1)
            sinks = values > self.tau
        else:
            sinks = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        # Padding may pass the threshold too; real queries never attend to it, so it changes nothing.
        image = context.image_keys(hidden.shape[1]).to(sinks.device)
        store = context.sequence.store.setdefault(self.store_key, {})
        # Always a tensor: a compiled decoding step runs the same graph for every batch, and its
        # ``has_image_sink`` term leaves a layer without image sinks as it is. Eager decoding skips
        # such a layer, asked once here (a GPU sync) rather than at every layer and step.
        store[layer_idx] = sinks
        store["edited", layer_idx] = bool((sinks & image).any())
        store.pop(("columns", layer_idx), None)  # built from these sinks when first read

    def sinks(self, layer: int, context: ForwardContext, keys: int) -> torch.Tensor | None:
        """``(rows, keys)`` sink columns of ``layer`` for this forward; ``None`` before any prefill or
        (eager only) when no image token is a sink."""
        store = context.sequence.store.get(self.store_key, {})
        sinks = store.get(layer)
        if sinks is None or not (torch.compiler.is_compiling() or store["edited", layer]):
            return None
        return fit_keys(context.per_row(sinks), keys)

    def _columns(
        self, layer: int, context: ForwardContext, keys: int, device: torch.device
    ) -> tuple[torch.Tensor, ...] | None:
        """What the redistribution reads of ``layer``'s prefill decision, for this forward's ``keys``
        columns (``None`` as :meth:`sinks`): the image, image-sink, sink and receiver columns
        ``(rows, 1, 1, keys)``, whether a row has an image sink and ``1e-6`` x its image token count
        ``(rows, 1, 1, 1)``.

        Built once per prefill and layer (:func:`~veridical.heads.base.prefill_columns`): a decoding
        step cuts them to its width, with no padding, mask algebra or count per layer and step.
        """
        store = context.sequence.store.get(self.store_key, {})
        if store.get(layer) is None:
            return None
        edited = torch.compiler.is_compiling() or store["edited", layer]
        if not (edited or context.is_prefill):
            return None

        def build(width: int) -> torch.Tensor:
            sinks = fit_keys(context.per_row(store[layer]), width).to(device)
            image = context.image_keys(width).to(device)
            image_sinks = image & sinks
            store["per_row", layer] = (
                image_sinks.any(dim=-1)[:, None, None, None],
                1e-6 * image.sum(dim=-1).float()[:, None, None, None],
            )
            # One tensor, so that a step cuts all four with one operation.
            return torch.stack([image, image_sinks, sinks, image & ~sinks], dim=1)[:, :, None, None, :]

        # Built at prefill in every layer, edited or not: a compiled decoding step then only reads it
        # (building it there would be a side effect, and the next step would compile anew).
        columns = prefill_columns(store, ("columns", layer), build, context.rows, keys)
        return (*columns.unbind(1), *store["per_row", layer]) if edited else None

    # -- redistribution --------------------------------------------------------------------------
    def edit_weights(self, module: nn.Module, weights: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        if self.p == 1:
            return weights
        keys = weights.shape[-1]
        found = self._columns(module.layer_idx, context, keys, weights.device)
        if found is None:
            return weights
        image, image_sinks, sinks, receivers, has_image_sink, image_count = found
        # Kept over the key dimension (keepdim) so that the row decisions broadcast against the weights
        # without a reshape; the sums are the same.
        image_mass = (weights * image).sum(dim=-1, keepdim=True)  # (rows, heads, queries, 1)
        sink_share = (weights * image_sinks).sum(dim=-1, keepdim=True) / (image_mass + image_count)
        selected = (sink_share <= self.rho) & (image_mass >= self.summ) & has_image_sink
        if context.is_prefill:
            columns = torch.arange(keys, device=weights.device)
            image_end = torch.where(image[:, 0, 0], columns, -1).amax(dim=-1) + 1  # (rows,)
            queries = context.query_positions(weights.shape[2], weights.device)
            selected &= (queries[None, None, :] >= image_end[:, None, None])[..., None]
        receiver_weights = weights * receivers
        receiver_mass = receiver_weights.sum(dim=-1, keepdim=True)
        # Rows with nothing to receive the mass keep their attention instead of dividing by zero.
        selected &= receiver_mass > 0
        freed = (1 - self.p) * (weights * sinks).sum(dim=-1, keepdim=True)
        kept = torch.where(sinks, weights * self.p, weights)
        # kept + freed * receiver_weights / mass, in one operation with the same rounding.
        redistributed = torch.addcdiv(kept, freed * receiver_weights, receiver_mass.clamp_min(1e-30))
        return torch.where(selected, redistributed, weights)

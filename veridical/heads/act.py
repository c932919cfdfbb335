"""ACT: attention calibration of hidden attention sinks, with a per-model head calibration."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from veridical.adapters import Inputs
from veridical.attention import ForwardContext, fit_keys
from veridical.errors import InputError, MethodSpecError
from veridical.heads.base import HeadMethod, check_layers, layer_range, prefill_columns
from veridical.params import Custom, Layers, Optional, Real, Rule, existing_file
from veridical.registry import check_hyperparameters, register_method

HeadSet = dict[int, list[int]]


def sink_columns(weights: torch.Tensor, valid: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """``(rows, heads, keys)``: columns with mean attention above ``threshold`` over the queries seeing them,
    except the first such column of each row and head.

    ``weights`` is a square prefill map ``(rows, heads, tokens, tokens)``; padding rows and columns never
    count. The official code drops the first column it detects (``models/llama_modelling_aug.py`` L27-28,
    ``indices[1:]``): the start token wherever that token is a sink, but in a head where it is not, the
    first hidden sink, which then keeps its attention.
    """
    rows, _, tokens, _ = weights.shape
    if valid is None:
        valid = torch.ones(rows, tokens, dtype=torch.bool, device=weights.device)
    valid = valid[:, -tokens:].to(weights.device)
    column_sum = (weights * valid[:, None, :, None]).sum(dim=2)
    # Real queries at or after column j: the causal rows that can attend to it.
    seen_by = valid.flip(-1).cumsum(-1).flip(-1).float()
    # A padding column gets no attention from real queries, so its mean (0) never passes the threshold.
    sinks = column_sum / seen_by.clamp_min(1)[:, None, :] > threshold
    # argmax returns the first maximum: the first detected column (0, already False, when none is).
    first = sinks.to(torch.uint8).argmax(dim=-1, keepdim=True)
    return sinks.scatter(-1, first, False)


def redistribute(weights: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale sink columns by ``scale`` and give the freed mass to the other columns in proportion.

    ``weights * sinks`` is computed once: the sink mass is its sum and the other columns' weights are
    ``weights`` minus it (exactly ``weights * ~sinks``: ``w - w`` is 0 and ``w - 0`` is ``w``).
    ``addcdiv(a, b, c)`` is ``a + b / c`` in one operation, with the same rounding.
    """
    on_sinks = weights * sinks
    others = weights - on_sinks
    other_mass = others.sum(dim=-1, keepdim=True)
    freed = (1 - scale) * on_sinks.sum(dim=-1, keepdim=True)
    kept = torch.where(sinks, weights * scale, weights)
    edited = torch.addcdiv(kept, freed * others, other_mass.clamp_min(1e-30))
    return torch.where(other_mass > 0, edited, weights)


def save_heads(heads: Mapping[int, Sequence[int]], path: str | Path, **meta: Any) -> None:
    """Write a head set as JSON: ``{"heads": {"layer": [head, ...]}, ...meta}``."""
    payload = {"heads": {str(k): sorted(int(h) for h in v) for k, v in sorted(heads.items())}, **meta}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def load_heads(path: str | Path) -> HeadSet:
    """Read a head set written by :func:`save_heads`."""
    try:
        payload = json.loads(Path(path).read_text())
        return {int(k): [int(h) for h in v] for k, v in payload["heads"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: not an ACT head file ({err})") from err


def _head_set(value: Any) -> bool:
    """A ``{layer: [head, ...]}`` mapping of indices >= 0 (layer keys may be JSON's digit strings)."""

    def index(i: Any) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and i >= 0

    return isinstance(value, Mapping) and all(
        (index(layer) or isinstance(layer, str) and layer.isdigit())
        and isinstance(heads, Sequence)
        and not isinstance(heads, str)
        and all(index(h) for h in heads)
        for layer, heads in value.items()
    )


@register_method("act")
class ACT(HeadMethod):
    r"""Attention Calibration Technique.

    Yu et al., "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models
    without Training through Attention Calibration", ICML 2024; official code GATECH-EIC/ACT at
    a267af7 (``models/llama_modelling_aug.py`` ``atten_process_eval`` L16-39, ``models/augment_index.py``,
    ``scripts/evaluation.sh``: ``BETA=0.4``, ``THRES=0.1``).

    In each chosen head, a column :math:`j` whose mean attention over the queries that can see it
    (:math:`\sum_i a_{ij} / (T - j)`) exceeds ``threshold`` (0.1) is a sink, except the first column
    so detected (the code's ``indices[1:]``: the start token wherever it is a sink, otherwise the
    first hidden sink, which keeps its attention). A sink keeps ``scale`` (0.4) of its weight and the
    freed mass goes to the row's other columns in proportion to their weights.

    Heads: the official code ships per-layer head lists for layers 2..30 of LLaMA-2-7B found by a
    calibration that keeps a head when calibrating it alone improves the model on a calibration set;
    :func:`calibrate_act_heads` runs that search on any model and :func:`save_heads` /
    ``heads="path.json"`` reuse it. Without a head set every head of layers 2..30 (scaled) is
    calibrated.

    Differences from the official code:

    - Generation: the code calibrates whole sequences scored in one forward (``main.py``, one prompt
      at a time); its MT-bench script patches the stock attention, whose decoder layers never pass
      the layer ``signal``, so generated tokens are never calibrated there. Here the sink columns
      are found on the prompt at prefill and kept; every later query row is calibrated on them (a
      generated token is never a sink).
    - Batches: the code edits batch row 0 only (its batch size is 1); here every row is calibrated
      on its own sinks, a column's mean runs over that row's real queries and padding is never a sink.
    - Precision: the code thresholds the probabilities after casting them to the model's dtype
      (float16); here they are thresholded in float32.
    - A row whose whole mass sits on sinks has nothing to give the freed mass to: the code divides by
      zero (NaN), here the row is left as it is.

    Args:
        scale: share of attention a sink column keeps; 1 leaves attention unchanged.
        threshold: mean attention above which a column is a sink.
        heads: ``{layer: [heads]}``, a JSON path from :func:`save_heads`, or ``None`` (all heads).
        layers: layers used when ``heads`` is ``None``.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    #: Settings of ``veridical calibrate act`` (see :func:`calibrate_act_heads`), checked like
    #: hyper-parameters.
    calibration_rules: ClassVar[dict[str, Rule]] = {
        "layers": Optional(Layers()),
        "scale": Real(0, 1),
        "threshold": Real(0, 1, low_open=True, high_open=True),
    }

    @classmethod
    def calibrate(
        cls,
        model: nn.Module,
        samples: list[tuple[Inputs, torch.Tensor]],
        output: str,
        progress: bool = True,
        meta: Mapping[str, Any] | None = None,
        layers: Sequence[int] | None = None,
        scale: float = 0.4,
        threshold: float = 0.1,
    ) -> str:
        """``veridical calibrate act``: choose the heads on ``samples`` (:func:`calibrate_act_heads`),
        write them to ``output`` as a head file with ``meta``, ``scale`` and ``threshold``; returns a
        summary line."""
        heads = calibrate_act_heads(model, samples, layers, scale, threshold, progress)
        save_heads(heads, output, **dict(meta or {}), scale=scale, threshold=threshold)
        return f"{sum(map(len, heads.values()))} head(s) kept in {len(heads)} layer(s)"

    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "scale": Real(0, 1),
        "threshold": Real(0, 1, low_open=True, high_open=True),
        # Whether the heads exist is checked on the model.
        "heads": Optional(
            Custom(
                lambda v: existing_file(v) or _head_set(v),
                "a {layer: [heads]} mapping or the path of an existing head file (veridical calibrate-act)",
                "{layer: [heads]} | path",
            )
        ),
        "layers": Optional(Layers()),
    }

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        scale: float = 0.4,
        threshold: float = 0.1,
        heads: Mapping[int, Sequence[int]] | str | Path | None = None,
        layers: Sequence[int] | None = None,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
        depth, num_heads = self.adapter.num_layers, self.adapter.num_heads
        if isinstance(heads, (str, Path)):
            heads = load_heads(heads)
        if heads is None:
            chosen = check_layers("ACT", layers, depth) if layers is not None else layer_range(2, 31, depth)
            heads = {layer: list(range(num_heads)) for layer in chosen}
        heads = {int(k): sorted({int(h) for h in v}) for k, v in heads.items() if len(v)}
        bad = [(k, h) for k, v in heads.items() for h in v if not (0 <= k < depth and 0 <= h < num_heads)]
        if bad:
            raise MethodSpecError(
                f"ACT heads {bad} are outside this model's {depth} layers x {num_heads} heads"
            )
        self.heads: HeadSet = heads
        self.layers = sorted(heads)
        self.scale, self.threshold = scale, threshold

    def edit_weights(self, module: nn.Module, weights: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        layer = module.layer_idx
        heads = self.heads.get(layer)
        if not heads or self.scale == 1:
            return weights
        store = context.sequence.store.setdefault(self.store_key, {})
        if context.is_prefill:
            # A static cache (compiled decoding) hands the prefill all its columns, the prompt's first:
            # the sinks are found on the square prompt map.
            tokens = weights.shape[2]
            valid = None if context.valid_keys is None else context.valid_keys[:, :tokens]
            store[layer] = sink_columns(weights[:, heads, :, :tokens], valid, self.threshold)
            store.pop(("columns", layer), None)
        found = store.get(layer)
        if found is None:
            return weights
        # (rows, heads, 1, keys), built once per prefill: every step reads it (no padding per layer).
        sinks = prefill_columns(
            store,
            ("columns", layer),
            lambda width: fit_keys(context.per_row(found), width)[:, :, None, :],
            context.rows,
            weights.shape[-1],
        )
        if len(heads) == weights.shape[1]:
            return redistribute(weights, sinks, self.scale)
        weights = weights.clone()
        weights[:, heads] = redistribute(weights[:, heads], sinks, self.scale)
        return weights


@torch.no_grad()
def calibrate_act_heads(
    model: nn.Module,
    samples: Iterable[tuple[Inputs, torch.Tensor]],
    layers: Sequence[int] | None = None,
    scale: float = 0.4,
    threshold: float = 0.1,
    progress: bool = True,
) -> HeadSet:
    """ACT's head search: keep each head whose calibration alone raises the score of the references.

    ``samples`` are ``(inputs, target_ids)`` pairs: a prompt with its image and the token ids of the
    reference answer (a POPE "yes"/"no", a caption, ...). The score is the mean log-probability of
    the targets given the prompt, teacher-forced (the official code uses accuracy on a few
    classification sets; log-probabilities separate heads with far fewer samples). A head is kept
    when its score beats its layer run through the same attention kernel unedited, so a head whose
    calibration changes nothing (no sink left) ties and is not kept, where a comparison with the
    model's own (sdpa) attention would decide it on rounding. Cost: one forward per sample per
    candidate head, and one per sample per layer.
    """
    from tqdm.auto import tqdm

    from veridical.adapters import get_adapter

    adapter = get_adapter(model)
    samples = [_teacher_forced(adapter, inputs, target) for inputs, target in samples]
    if not samples:
        raise InputError("ACT calibration needs at least one (inputs, target_ids) sample")
    depth = adapter.num_layers
    layers = check_layers("ACT", layers, depth) if layers is not None else layer_range(2, 31, depth)
    all_heads = list(range(adapter.num_heads))

    def score(heads: HeadSet, scale: float) -> float:
        total = 0.0
        for inputs, target_len in samples:
            with ACT(model, inputs, scale=scale, threshold=threshold, heads=heads):
                logits = adapter.run_prompt(inputs).logits.float()
            total += _target_log_prob(logits, inputs["input_ids"], target_len)
        return total / len(samples)

    chosen: HeadSet = {}
    candidates = [(layer, head) for layer in layers for head in all_heads]
    baselines: dict[int, float] = {}
    for layer, head in tqdm(candidates, desc="ACT calibration", disable=not progress):
        if layer not in baselines:  # scale 1: the layer's attention computed as ACT computes it, unedited
            baselines[layer] = score({layer: all_heads}, 1.0)
        if score({layer: [head]}, scale) > baselines[layer]:
            chosen.setdefault(layer, []).append(head)
    return chosen


def _teacher_forced(adapter, inputs: Inputs, target: torch.Tensor) -> tuple[dict[str, Any], int]:
    """The prompt with the reference answer appended, and the answer's length."""
    adapter.validate_inputs(inputs)
    target = torch.as_tensor(target).reshape(1, -1).expand(inputs["input_ids"].shape[0], -1)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], target.to(inputs["input_ids"])], dim=1)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    full["attention_mask"] = torch.cat([mask, torch.ones_like(target).to(mask)], dim=1)
    if "mm_token_type_ids" in inputs:
        extra = torch.zeros_like(target).to(inputs["mm_token_type_ids"])
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], extra], dim=1)
    return full, target.shape[1]


def _target_log_prob(logits: torch.Tensor, input_ids: torch.Tensor, target_len: int) -> float:
    log_probs = torch.log_softmax(logits[:, -target_len - 1 : -1], dim=-1)
    target = input_ids[:, -target_len:]
    return float(log_probs.gather(-1, target[..., None]).mean())

"""Sink dimensions: the few residual-stream dimensions where attention-sink tokens carry massive values.

VAR marks token ``j`` as a sink in layer ``l`` when its residual stream entering ``l``, RMS-normalised
without the learned weight, exceeds ``tau`` in any sink dimension. The paper lists the dimensions of
the LLMs it studied; for any other model :func:`detect_sink_dims` finds them from a few prompts
(massive-activation dimensions: the largest values, far above a typical dimension's) and caches the
answer per model.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from veridical.adapters import Inputs, ModelAdapter, get_adapter
from veridical.attention import AttentionHook, ForwardContext, auxiliary_forwards, intercept_attention

#: Published sink dimensions, keyed by the text model's architecture: (family, text model type, hidden
#: size, MLP width, layers, attention heads, key/value heads). Width and depth alone cannot tell
#: LLaMA-2-7B from LLaMA-3-8B (both 4096 wide and 32 deep; LLaMA-3-8B has a 14336-wide MLP and 8
#: key/value heads, as in llama3-llava-next-8b), whose massive-activation dimensions differ. Any
#: architecture not listed here finds its own dimensions (:func:`detect_sink_dims`). A LLaMA-1-7B-based
#: text model (same shapes as LLaMA-2-7B) cannot be told apart by its config; no LLaVA or LLaVA-NeXT
#: release uses one.
KNOWN_SINK_DIMS: dict[tuple, tuple[int, ...]] = {
    # LLaMA-2-7B / Vicuna-7B-v1.5 (LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B); VisAttnSink
    # src/logic/constants.py L9
    ("llava", "llama", 4096, 11008, 32, 32, 32): (2533, 1415),
    ("llava_next", "llama", 4096, 11008, 32, 32, 32): (2533, 1415),
    # LLaMA-2-13B / Vicuna-13B-v1.5; VisAttnSink src/logic/constants.py L10
    ("llava", "llama", 5120, 13824, 40, 40, 40): (2100, 4743),
    ("llava_next", "llama", 5120, 13824, 40, 40, 40): (2100, 4743),
    # Qwen2-VL-7B (reported in the paper; not in the official code)
    ("qwen2_vl", "qwen2_vl_text", 3584, 18944, 28, 28, 4): (458, 2570),
}

_DETECTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rms_normalized(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``hidden`` divided by its RMS over the last dimension, in float32, with no learned weight."""
    hidden = hidden.float()
    return hidden * torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + eps)


def architecture_key(adapter: ModelAdapter) -> tuple:
    """What :data:`KNOWN_SINK_DIMS` is keyed on, read from the model's text config."""
    text = adapter.text_config
    return (
        adapter.family,
        str(text.model_type),
        int(text.hidden_size),
        getattr(text, "intermediate_size", None),
        adapter.num_layers,
        adapter.num_heads,
        adapter.num_kv_heads,
    )


def known_sink_dims(adapter: ModelAdapter) -> tuple[int, ...] | None:
    """The published sink dimensions of this model's text decoder, or ``None`` if none are published."""
    return KNOWN_SINK_DIMS.get(architecture_key(adapter))


class _PeakRecorder(AttentionHook):
    """Per dimension, the largest |RMS-normalised| residual value over real tokens of the given layers."""

    observes_layer_inputs = True
    needs_weights = False

    def __init__(self, layers: list[int], hidden_size: int):
        self.layers = layers
        self.peak = torch.zeros(hidden_size)

    def observe_layer_input(self, layer_idx: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        values = rms_normalized(hidden).abs()
        if context.valid_keys is not None:
            values = values * context.valid_keys[:, -hidden.shape[1] :, None].to(values)
        self.peak = torch.maximum(self.peak, values.amax(dim=(0, 1)).cpu())


@torch.no_grad()
def detect_sink_dims(
    model: nn.Module, inputs: Inputs, layers: list[int], num_dims: int = 2, min_ratio: float = 5.0
) -> tuple[int, ...]:
    """The (at most ``num_dims``) dimensions whose peak is ``min_ratio`` times the median dimension's.

    Peaks are taken over the prompt tokens of ``inputs`` entering ``layers``; the first call for a
    model and settings decides, later calls (other prompts) reuse its answer. An RMS-normalised value
    cannot exceed ``sqrt(hidden_size)`` (8 for a 64-wide toy model, 64 for a 7B model whose sink
    dimensions reach 20-60 against a median dimension's 3-5), so small models need a lower
    ``min_ratio``. The result is cached per
    model object; :func:`clear_sink_dims` forgets it. A model with no massive activations gets ``()``
    (and a warning): VAR then has no sinks to act on.
    """
    settings = (tuple(layers), num_dims, min_ratio)
    cached = _DETECTED.setdefault(model, {})
    if settings in cached:
        return cached[settings]
    adapter = get_adapter(model)
    recorder = _PeakRecorder(layers, int(adapter.text_config.hidden_size))
    with intercept_attention(model, recorder), auxiliary_forwards():
        adapter.run_prompt(inputs, logits_to_keep=1)
    peak = recorder.peak
    order = torch.argsort(peak, descending=True)[:num_dims]
    median = peak.median().clamp_min(1e-12)
    dims = tuple(int(d) for d in order if peak[d] >= min_ratio * median)
    if not dims:
        warnings.warn(
            f"no massive-activation dimensions found (largest peak {float(peak.max()):.1f} is "
            f"{float(peak.max() / median):.1f}x the median dimension's, below {min_ratio}x): "
            "VAR finds no sinks",
            stacklevel=2,
        )
    cached[settings] = dims
    return dims


def clear_sink_dims(model: nn.Module) -> None:
    _DETECTED.pop(model, None)

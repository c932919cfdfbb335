"""MemVR: Memory-space Visual Retracing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from veridical.adapters import Inputs
from veridical.attention import ForwardContext, current_context
from veridical.errors import MethodSpecError, UnsupportedModelError
from veridical.heads.base import HeadMethod
from veridical.layers import check_layers, layer_range, scale_index
from veridical.params import Choice, Layers, Optional, Real, Rule
from veridical.registry import check_hyperparameters, register_method

#: Top logits whose normalised entropy measures a layer's uncertainty (``memvr.py`` line 213).
TOP_K = 10


@register_method("memvr")
class MemVR(HeadMethod):
    r"""Image tokens re-read as FFN key-value memory in the layer after the first uncertain one.

    Zou et al., "Look Twice Before You Answer: Memory-Space Visual Retracing for Hallucination
    Mitigation in Multimodal Large Language Models", ICML 2025; official code 1zhou-Wang/MemVR
    (commit de2e3cf, transformers 4.40.0): ``memvr.py`` (LLaVA-1.5), ``modeling/modeling_qwen.py``
    (Qwen-VL), ``eval/llava_model_vqa_loader_chair.py``, ``eval_scripts/llava/*.sh``.

    In every forward (the prompt's and each generated token's), as the official LLaVA code does:

    1. *Memory* :math:`V` ``(N, d)``: the text decoder's input embeddings at the image positions of
       the prompt, i.e. the projected image features (``memvr.py`` lines 456-458, set when the
       prompt is embedded; decoding steps keep it, lines 282-283).
    2. *Uncertainty*: after each decoder layer :math:`l`, the logits
       ``lm_head(norm(h_l))`` of the last position in float32 (lines 206-209), the softmax over
       their top 10 and its entropy divided by :math:`\ln 10` (lines 213-215).
    3. *Trigger*: the first layer with :math:`5 < l < 16` (strict, line 240; layers 6..15 of 32,
       the same relative depth on other models) whose entropy exceeds ``entropy_threshold`` sets
       the adapter in the MLP of layer :math:`l+1` for this forward only, once per forward
       (lines 240-249, reset lines 226-233).
    4. *Retracing* in that MLP, at every position of the forward (lines 86-90), with :math:`x` the
       MLP input and :math:`f` the MLP output:

       .. math:: W_1 = \frac{\overline{|W_{up}|}}{\overline{|V|}} V,\quad
                 W_2 = \frac{\overline{|W_{down}|}}{\overline{|V|}} V^\top,\quad
                 a = (x W_1^\top) W_2^\top,\quad
                 \text{out} = (1 - r) f + r\,\frac{\overline{|f|}}{\overline{|a|}}\, a

       (lines 248-249: bars are means of absolute values over whole tensors). The retracing ratio
       :math:`r` is set on layers 0..30 only (lines 478-479): retracing into layer 31 of 32 (the
       same relative depth elsewhere, reachable only with explicit ``layers``) uses :math:`r = 0`,
       i.e. spends the forward's one retrace without changing anything, as the official code does.

    Defaults as the official scripts that run: ``retracing_ratio=0.12, entropy_threshold=0.75``,
    ``starting_layer 5, ending_layer 16`` (README lines 104-107, ``eval_scripts/llava/mme.sh`` lines
    11-15). The LLaVA CHAIR script ``eval/llava_model_vqa_loader_chair.py`` hard-codes the same values
    (lines 114-119) and ignores the ``--retracing-ratio 0.31`` that ``eval_scripts/llava/chair.sh``
    passes (line 13): 0.12 is what ran. Every published script decodes greedily (``--temperature 0``,
    e.g. ``eval_scripts/llava/chair.sh`` line 10). No POPE script is published.

    The magnitude matching of :math:`W_1` and :math:`W_2` cancels in exact arithmetic (the output
    is rescaled to :math:`\overline{|f|}` afterwards); it keeps the half-precision products in
    range, and is done here in the same order, in the model's dtype.

    Variant (option): ``activation="silu"`` reads the memory as the Qwen-VL code does,
    :math:`a = \mathrm{silu}(x W_1^\top) W_2^\top` (``modeling_qwen.py`` line 353), a key-value read
    with an activation between keys and values, as in the FFN-as-memory view the paper builds on (its
    abstract: visual tokens re-injected "through FFN as key-value memory"; the method section was not
    read here). The Qwen-VL code differs otherwise in ways not offered: it reads the entropy without
    the final norm (lines 756-764), retraces batch row 0 against the first image's features only
    (line 353), and the shipped Qwen scripts never enable its adapter: ``apply_memvr_qwen``
    (``memvr.py`` lines 481-493) leaves ``vision_retracing_method`` at ``"default"``
    (``modeling_qwen.py`` line 335), and only ``"adapt"`` installs it (lines 794-800).

    Differences from the official code (batch size 1 there):

    - entropy, trigger and the means :math:`\overline{|V|}, \overline{|f|}, \overline{|a|}` are per
      row, the latter two over the row's real (non-padding) positions: a left-padded batch gives
      what each prompt gives alone. The official entropy sums over the rows of the batch (line
      215 slices the batch, not the top 10), its means run over the whole batch, so its batches
      (and its beam search, whose beams are rows) differ from its single prompts;
    - the memory is every image token of the row (all images of a prompt, LLaVA-NeXT's newline
      features, Qwen2-VL's merged patches, InstructBLIP's query outputs); the official code keeps
      the last image it embedded (line 458);
    - the means :math:`\overline{|V|}, \overline{|W|}, \overline{|f|}, \overline{|a|}` are taken
      in float32 and their ratios rounded to the model's dtype (the official ones are in the
      model's dtype);
    - the decision is data, not control flow: every window layer's adapter output is computed and
      selected per row with ``torch.where`` (no host synchronisation, compiled decoding keeps one
      graph); a NaN entropy (a top-10 probability of 0 makes ``p log p`` NaN) never triggers, as
      the official comparison ``entropy > threshold`` does not;
    - in a forward of OPERA's look-ahead candidates the entropy is read at the last query only.

    Rows without an image (a contrast branch without the image) are left alone, and so are rows whose
    image features are all zero (a blank contrast image, in Qwen2-VL) or whose read of the memory is
    all zero, where the official code divides by zero; a contrast branch with its own image (VCD's
    noised image) retraces its own image features. With VISTA or another method that hooks the same
    MLP outputs, the hooks run in the order the methods are attached.

    Args:
        model: a supported vision-language model (LLaMA- or Qwen2-style MLP with ``up_proj`` and
            ``down_proj``).
        inputs: the processor's output passed to ``generate``.
        retracing_ratio: :math:`r`, the weight of the retraced memory; 0 leaves the model unchanged.
        entropy_threshold: normalised top-10 entropy (in [0, 1]) above which a layer triggers; 1
            never triggers.
        layers: the layers :math:`l` whose output is checked (the adapter goes into :math:`l+1`);
            default layers 6..15 of 32 scaled to the model's depth.
        activation: ``None`` (official LLaVA code, linear read) or ``"silu"`` (Qwen-VL code).
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "retracing_ratio": Real(0, 1),
        "entropy_threshold": Real(0, 1),
        "layers": Optional(Layers()),
        "activation": Optional(Choice("silu")),
    }

    needs_weights = False
    observes_layer_inputs = True

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        retracing_ratio: float = 0.12,
        entropy_threshold: float = 0.75,
        layers: Sequence[int] | None = None,
        activation: str | None = None,
    ):
        check_hyperparameters(self, locals())
        super().__init__(model, inputs)
        depth = self.adapter.num_layers
        if depth < 2:
            raise UnsupportedModelError(
                "MemVR retraces in the layer after the one it checks: needs 2+ layers"
            )
        # Official window: starting_layer 5 < l < ending_layer 16, i.e. layers 6..15 of 32.
        window = check_layers("MemVR", layers, depth) if layers is not None else layer_range(6, 16, depth)
        last = [i for i in window if i >= depth - 1]
        if last:
            raise MethodSpecError(
                f"memvr: layers {last} have no next layer to retrace in; use layers in 0..{depth - 2}"
            )
        if int(self.adapter.lm_head.weight.shape[0]) < TOP_K:
            raise UnsupportedModelError(f"MemVR reads the top {TOP_K} logits; the vocabulary is smaller")
        self.window = window
        #: Layer whose MLP retraces -> the layer checked before it.
        self.targets = {i + 1: i for i in window}
        self.layers = sorted({0, *self.targets})
        self.retracing_ratio, self.entropy_threshold, self.activation = (
            retracing_ratio,
            entropy_threshold,
            activation,
        )
        # The official ratio is set on layers 0..30 of 32 (memvr.py lines 478-479).
        ratio_layers = min(scale_index(31, depth), depth)
        self._ratios = {t: (retracing_ratio if t < ratio_layers else 0.0) for t in self.targets}
        self._weight_means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for target in self.targets:
            mlp = self.adapter.layers[target].mlp
            if not (hasattr(mlp, "up_proj") and hasattr(mlp, "down_proj")):
                raise UnsupportedModelError(
                    f"MemVR needs an MLP with up_proj and down_proj; layer {target} has {type(mlp).__name__}"
                )
            with torch.no_grad():  # mean |W| over the whole matrix (memvr.py lines 248-249)
                self._weight_means[target] = (
                    mlp.up_proj.weight.float().abs().mean(),
                    mlp.down_proj.weight.float().abs().mean(),
                )
        self._handles: list[Any] = []

    def __enter__(self) -> MemVR:
        super().__enter__()
        try:
            for target in self.targets:
                mlp = self.adapter.layers[target].mlp
                self._handles.append(mlp.register_forward_hook(self._retrace_hook(target)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().__exit__(*exc)

    # -- memory and trigger: the residual stream entering layers 0 and l + 1 ----------------------
    def observe_layer_input(self, layer_idx: int, hidden: torch.Tensor, context: ForwardContext) -> None:
        if not context.sequence.has_image:  # a contrast branch without the image
            return
        key = self.store_key
        if layer_idx == 0 and context.is_prefill:
            self._store_memory(hidden, context)
        checked = self.targets.get(layer_idx)
        if checked is None:
            return
        entropy = self.entropy(hidden[:, -1])
        fired = context.once((key, "fired"), lambda: torch.zeros_like(entropy, dtype=torch.bool))
        # NaN > threshold is False: a NaN entropy never triggers (memvr.py line 240).
        fire = (entropy > self.entropy_threshold) & ~fired
        fired.logical_or_(fire)  # one retrace per forward (visual_retracing_event, line 243)
        context.once((key, "fire", layer_idx), lambda: fire)

    def _store_memory(self, hidden: torch.Tensor, context: ForwardContext) -> None:
        """The prompt's input embeddings at image positions ``(rows, T, d)`` (zeros elsewhere: they add
        nothing to :math:`(x W_1^\\top) W_2^\\top`) and each row's mean |V| over its image tokens."""
        image = context.image_keys(hidden.shape[1]).to(hidden.device)  # rows as run (beams included)
        memory = hidden * image[..., None].to(hidden.dtype)
        count = image.sum(dim=-1).float() * hidden.shape[-1]
        mean_abs = memory.float().abs().sum(dim=(1, 2)) / count.clamp_min(1.0)
        # A row without image tokens, or whose image features are all zero (a blank contrast image in
        # some models), has nothing to retrace (the official code would divide by zero).
        has_memory = mean_abs > 0
        mean_abs = torch.where(has_memory, mean_abs, 1.0)
        context.sequence.store[self.store_key] = (memory, mean_abs, has_memory)

    @torch.no_grad()
    def entropy(self, last: torch.Tensor) -> torch.Tensor:
        """``(rows,)`` entropy of the softmax over the top-10 logits of ``last`` ``(rows, d)``, the
        hidden state after a layer at the last position, divided by ln 10 (memvr.py lines 206-215)."""
        logits = self.adapter.lm_head(self.adapter.final_norm(last)).float()
        top = torch.topk(logits, TOP_K, dim=-1).values
        probs = torch.softmax(top, dim=-1)
        return (-probs * torch.log(probs)).sum(dim=-1) / math.log(TOP_K)

    # -- retracing: the MLP output of layer l + 1 --------------------------------------------------
    def _retrace_hook(self, target: int):
        attention = self.adapter.attention_modules[target]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            context = current_context(attention)
            if context.parts is None:
                return self.retrace(target, args[0], output, context)
            pieces = [
                self.retrace(
                    target, args[0][start : start + part.rows], output[start : start + part.rows], part
                )
                for start, _, part in context.parts
            ]
            return torch.cat(pieces)

        return hook

    def retrace(
        self, target: int, x: torch.Tensor, ffn: torch.Tensor, context: ForwardContext
    ) -> torch.Tensor:
        """Layer ``target``'s MLP output ``ffn`` ``(rows, T, d)`` for MLP input ``x``, retraced in the
        rows whose checked layer triggered (memvr.py lines 86-90, 248-249)."""
        stored = context.sequence.store.get(self.store_key) if context.sequence.has_image else None
        fire = None if stored is None else context.once((self.store_key, "fire", target), lambda: None)
        if fire is None:
            return ffn
        memory, mean_memory, has_memory = (context.per_row(t) for t in stored)
        up_mean, down_mean = (m.to(mean_memory.device) for m in self._weight_means[target])
        dtype = ffn.dtype
        w1 = memory * (up_mean / mean_memory).to(dtype)[:, None, None]  # W1 = s1 V      (line 248)
        w2 = memory * (down_mean / mean_memory).to(dtype)[:, None, None]  # W2^T = s2 V  (line 249)
        scores = torch.matmul(x, w1.transpose(1, 2))  # x W1^T: (rows, T, N)
        if self.activation == "silu":
            scores = F.silu(scores)  # modeling_qwen.py line 353
        adapter = torch.matmul(scores, w2)  # (x W1^T) W2^T (line 88)
        valid = self._real_positions(context, ffn.shape[1], ffn.device)
        mean_adapter = _mean_abs(adapter, valid)
        # An all-zero read (x orthogonal to the memory) adds nothing (the official code: 0 / 0).
        ratio = torch.where(mean_adapter > 0, _mean_abs(ffn, valid) / mean_adapter, 0.0).to(dtype)
        r = self._ratios[target]
        mixed = ffn * (1 - r) + (ratio[:, None, None] * adapter) * r  # lines 89-90
        return torch.where((fire & has_memory)[:, None, None], mixed, ffn)

    @staticmethod
    def _real_positions(context: ForwardContext, queries: int, device: torch.device) -> torch.Tensor | None:
        """``(rows, queries)`` positions of this forward that are real tokens, ``None`` if all are (a
        decoding step's new token always is)."""
        if queries == 1 or context.valid_keys is None:
            return None
        return context.valid_keys[:, context.past : context.past + queries].to(device)


def _mean_abs(tensor: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(rows,)`` float32 mean of ``|tensor|`` ``(rows, T, d)`` over each row's ``valid`` positions."""
    magnitude = tensor.float().abs()
    if valid is None:
        return magnitude.mean(dim=(1, 2))
    total = (magnitude * valid[..., None]).sum(dim=(1, 2))
    return total / (valid.sum(dim=-1).float() * tensor.shape[-1]).clamp_min(1.0)

"""MemVR against the official algorithm, written out from 1zhou-Wang/MemVR at de2e3cf (``memvr.py``).

Nothing here computes an expectation through veridical. The oracle (:class:`OfficialMemVR`) runs the
official LLaVA loop on the plain transformers model, batch of one prompt, with plain torch hooks:

- memory: the language model's input embeddings at the image positions of the prompt (``memvr.py``
  lines 456-458, prompt only: lines 282-283);
- after each decoder layer ``l``: ``lm_head(norm(h_l))[:, -1].float()``, top 10, softmax, entropy
  ``sum(-p log p) / ln 10`` as a Python float (lines 206-216);
- the first ``l`` with ``entropy > threshold``, ``5 < l < 16`` and no retrace yet in this forward
  sets layer ``l+1``'s adapter (lines 240-249), used once and reset (lines 226-233);
- the adapter (lines 86-90): ``W1 = mean|W_up| / mean|V| * V``, ``W2 = mean|W_down| / mean|V| * V^T``,
  ``a = (x W1^T) W2^T``, ``(1 - r) f + r * mean|f| / mean|a| * a``; ``r`` is set on layers 0..30
  only (lines 478-479).

The oracle's own decisions are checked against the entropies recomputed from its run's
``output_hidden_states``; every rule is seen to trigger (a forward that retraces, one that does
not, one where a later layer would fire too, different trigger layers at prefill and decoding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from test_oracle_pai_vhr import build_llava
from torch._dynamo.utils import counters
from transformers import CompileConfig

import veridical
from veridical.errors import MethodSpecError, UnsupportedModelError
from veridical.heads.memvr import MemVR
from veridical.tiny import tiny_inputs, tiny_model

DEPTH = 32
NEW_TOKENS = 3
#: ``apply_memvr_llama(starting_layer=5, ending_layer=16, entropy_threshold=0.75,
#: retracing_ratio=0.12)`` (eval/llava_model_vqa_loader_chair.py lines 114-119; mme.sh).
START, END, RATIO = 5, 16, 0.12


class OfficialMemVR:
    """``memvr.py``'s LLaVA loop as hooks on the plain model, for one prompt (batch of one)."""

    def __init__(self, model, image_positions, threshold, ratio=RATIO, start=START, end=END, silu=False):
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.image_positions = image_positions
        self.threshold, self.ratio, self.start, self.end, self.silu = threshold, ratio, start, end, silu
        self.visual_token = None
        #: Per forward: the layer ``l`` that triggered (or None) and every layer's entropy.
        self.fired: list[int | None] = []
        self.entropies: list[list[float]] = []
        self.handles = []

    def __enter__(self):
        self.handles.append(self.lm.register_forward_pre_hook(self._begin, with_kwargs=True))
        for i, layer in enumerate(self.lm.layers):
            self.handles.append(layer.register_forward_hook(self._after_layer(i)))
            self.handles.append(layer.mlp.register_forward_hook(self._mlp(i)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _begin(self, module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        if embeds.shape[1] > 1:  # the prompt: memvr.py line 458 keeps its image features
            self.visual_token = embeds[0, self.image_positions]
        self.event = False  # visual_retracing_event (line 165)
        self.next_layer = None  # the layer whose adpt_sign is 1
        self.fired.append(None)
        self.entropies.append([])

    def _after_layer(self, layer):
        def hook(module, args, output):
            logits = self.lm_head(self.lm.norm(output))[:, -1, :].float()  # lines 206-209
            top, _ = torch.topk(logits, 10)  # line 213
            p = F.softmax(top, dim=-1)
            entropy = torch.sum((-p[:10] * torch.log(p[:10])) / np.log(10)).item()  # lines 215-216
            self.entropies[-1].append(entropy)
            if self.next_layer == layer:  # reset after layer l+1 ran (lines 226-233)
                self.next_layer = None
            if entropy > self.threshold and not self.event and self.start < layer < self.end:  # line 240
                self.event = True
                self.next_layer = layer + 1
                self.fired[-1] = layer

        return hook

    def _mlp(self, layer):
        def hook(module, args, output):
            if self.next_layer != layer:
                return None
            x, v = args[0], self.visual_token
            w1 = torch.zeros_like(v) + torch.mean(torch.abs(module.up_proj.weight)) / torch.mean(v.abs()) * v
            w2 = (
                torch.zeros_like(v.T)
                + torch.mean(torch.abs(module.down_proj.weight)) / torch.mean(v.abs()) * v.T
            )
            inner = torch.matmul(x, w1.T)
            if self.silu:  # modeling_qwen.py line 353
                inner = F.silu(inner)
            adapter = torch.matmul(inner, w2.T)  # line 88
            scaled = (torch.mean(torch.abs(output)) / torch.mean(torch.abs(adapter))) * adapter  # line 89
            ratio = self.ratio if layer < 31 else 0.0  # lines 478-479: range(31)
            return output * (1 - ratio) + scaled * ratio  # line 90

        return hook


def greedy(model, inputs, methods=None, **extra):
    kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **extra,
    )
    with torch.no_grad():
        if methods is None:
            return model.generate(**inputs, **kwargs)
        return veridical.generate(model, inputs, methods, **kwargs)


def alone(inputs):
    """Each prompt of the left-padded batch on its own: padding removed, its own image."""
    samples = []
    for row in range(inputs["input_ids"].shape[0]):
        keep = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row : row + 1, keep]
        pixels = inputs["pixel_values"][row : row + 1]
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels})
    return samples


def official_run(model, sample, threshold, **settings):
    image = (sample["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    with OfficialMemVR(model, image, threshold, **settings) as oracle:
        out = greedy(model, sample, output_hidden_states=True)
    return oracle, out


@pytest.fixture(scope="module")
def llava():
    """32 LLaMA layers (the official window applies literally), sdpa attention as veridical's kernel
    runs it, and a sharper ``lm_head`` so that middle layers' top-10 entropies spread over [0.5, 1]
    (a random head's are all near 1)."""
    model, inputs = build_llava(seed=3, heads=4, kv_heads=2)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model.lm_head.weight *= 24.0
    return model, inputs


@pytest.fixture(scope="module")
def vanilla(llava):
    """The unmodified model on the batch, with its hidden states."""
    model, inputs = llava
    return greedy(model, inputs, output_hidden_states=True)


def official_entropies(model, hidden_states):
    """Per layer ``l`` (all but the last), the normalised top-10 entropy of ``lm_head(norm(h_l))`` at
    the last position (memvr.py lines 206-215), from one step of ``output_hidden_states``
    (``hidden_states[l + 1]`` is layer ``l``'s output for every layer but the last).
    Returns ``(rows, layers)``: each row on its own, as the official code sees a batch of one."""
    lm = model.model.language_model
    entropies = []
    with torch.no_grad():
        for layer in range(DEPTH - 1):
            logits = model.lm_head(lm.norm(hidden_states[layer + 1]))[:, -1].float()
            p = torch.softmax(torch.topk(logits, 10).values, dim=-1)
            entropies.append(((-p * torch.log(p)).sum(-1) / np.log(10)).numpy())
    return np.stack(entropies, axis=1)


def check_decisions(model, oracle, out, threshold):
    """The oracle's trigger is the first layer ``5 < l < 16`` above the threshold in each forward,
    read from its own run's hidden states, none of them within float noise of the threshold.
    Returns, per forward, how many window layers are above the threshold."""
    above_counts = []
    for step, states in enumerate(out.hidden_states):
        (entropies,) = official_entropies(model, states)
        np.testing.assert_allclose(entropies, oracle.entropies[step][: DEPTH - 1], atol=1e-6)
        window = entropies[START + 1 : END]
        assert np.abs(window - threshold).min() > 1e-3  # eager/sdpa noise (1e-6) cannot flip one
        above = [START + 1 + i for i in np.flatnonzero(window > threshold)]
        assert oracle.fired[step] == (above[0] if above else None)
        above_counts.append(len(above))
    return above_counts


@pytest.mark.parametrize(
    ("threshold", "silu"),
    [(0.8, False), (0.8, True)],
    ids=["linear", "silu"],
)
def test_memvr_equals_the_official_loop(llava, vanilla, threshold, silu):
    """A left-padded batch of two prompts under MemVR gives, at the prompt's forward and the next two
    tokens, the logits of the official loop run on each prompt alone."""
    model, inputs = llava
    method = {"name": "memvr", "entropy_threshold": threshold}
    if silu:
        method["activation"] = "silu"
    got = greedy(model, inputs, [method])
    assert (inputs["attention_mask"] == 0).any()  # left padding is exercised
    fired, above, layer5 = [], [], []
    for row, sample in enumerate(alone(inputs)):
        oracle, want = official_run(model, sample, threshold, silu=silu)
        above += check_decisions(model, oracle, want, threshold)
        fired += oracle.fired
        layer5 += [e[START] > threshold + 1e-3 for e in oracle.entropies]
        assert torch.equal(got.sequences[row, -NEW_TOKENS:], want.sequences[0, -NEW_TOKENS:])
        for step in range(NEW_TOKENS):
            torch.testing.assert_close(
                got.logits[step][row],
                want.logits[step][0],
                atol=2e-5,
                rtol=1e-5,
                msg=f"row {row} step {step}",
            )
    moved = max((a - b).abs().max() for a, b in zip(got.logits, vanilla.logits, strict=True))
    assert moved > 1e-3  # the retrace changes the logits (else the comparison says nothing)
    if threshold == 0.8 and not silu:
        # Seen here: prefill and decoding forwards that trigger in layers 6 and 7, a forward with no
        # trigger, forwards where later layers are above the threshold too (only the first retraces),
        # and layer 5 above the threshold but outside the window (5 < l is strict).
        assert {6, 7, None} <= set(fired), fired
        assert max(above) >= 2
        assert any(skipped and layer == 6 for skipped, layer in zip(layer5, fired, strict=True))


def test_no_trigger_and_zero_ratio_leave_the_model_unchanged(llava, vanilla):
    """Threshold 0.92: no layer of the window 6..15 exceeds it in any forward of the unmodified model
    (so the official loop never retraces and the model stays unmodified), while layer 5, outside the
    window (``5 < l``, line 240), does: every output is the unmodified model's, bit for bit.
    ``retracing_ratio=0`` retraces everywhere (threshold 0) with weight 0: unchanged too."""
    model, inputs = llava
    for states in vanilla.hidden_states:
        entropies = official_entropies(model, states)
        assert (entropies[:, START + 1 : END] < 0.92 - 1e-3).all()
    assert (official_entropies(model, vanilla.hidden_states[-1])[:, START] > 0.92 + 1e-3).any()
    for method in (
        {"name": "memvr", "entropy_threshold": 0.92},
        {"name": "memvr", "retracing_ratio": 0.0, "entropy_threshold": 0.0},
    ):
        got = greedy(model, inputs, [method])
        for a, b in zip(got.logits, vanilla.logits, strict=True):
            assert torch.equal(a, b), method


def test_retracing_into_the_last_layer_uses_ratio_zero(llava, vanilla):
    """``apply_memvr_llama`` sets the ratio on layers 0..30 only (memvr.py lines 478-479): a trigger at
    layer 30 (threshold 0: every forward) retraces into layer 31 with weight 0 and changes nothing; at
    layer 29 it retraces into layer 30 and does change the logits."""
    model, inputs = llava
    last = greedy(model, inputs, [{"name": "memvr", "entropy_threshold": 0.0, "layers": [30]}])
    for a, b in zip(last.logits, vanilla.logits, strict=True):
        assert torch.equal(a, b)
    before = greedy(model, inputs, [{"name": "memvr", "entropy_threshold": 0.0, "layers": [29]}])
    assert max((a - b).abs().max() for a, b in zip(before.logits, vanilla.logits, strict=True)) > 1e-4


def test_default_window_is_the_official_one(llava):
    """Layers 6..15 are checked (``5 < l < 16``, memvr.py line 240) and 7..16 retrace in a 32-layer
    model; a 4-layer model checks layer 1 and retraces in layer 2."""
    model, inputs = llava
    method = MemVR(model, inputs)
    assert method.window == list(range(6, 16))
    assert sorted(method.targets) == list(range(7, 17))
    tiny, processor = tiny_model("llava")
    assert MemVR(tiny, tiny_inputs("llava", processor, ["what is this"])).window == [1]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"retracing_ratio": 1.5}, "retracing_ratio must be a finite number in \\[0, 1\\]"),
        ({"retracing_ratio": float("nan")}, "retracing_ratio"),
        ({"entropy_threshold": -0.1}, "entropy_threshold must be a finite number in \\[0, 1\\]"),
        ({"activation": "relu"}, "activation must be one of silu or None"),
        ({"layers": [31]}, "layers \\[31\\] have no next layer"),
        ({"layers": [32]}, "layers \\[32\\] are not in 0..31"),
        ({"layers": "5,16"}, "layers must be"),
    ],
)
def test_bad_settings_fail_with_one_line(llava, settings, match):
    model, inputs = llava
    with pytest.raises(MethodSpecError, match=match) as error:
        MemVR(model, inputs, **settings)
    assert "\n" not in str(error.value)


def test_one_layer_model_is_refused():
    model, inputs = build_llava(seed=0, heads=4, kv_heads=2, depth=1)
    with pytest.raises(UnsupportedModelError, match="needs 2\\+ layers"):
        MemVR(model, inputs)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "instructblip"])
def test_other_families_retrace(family):
    """Every family's memory (LLaVA-NeXT's packed features, Qwen2-VL's merged patches, InstructBLIP's
    query outputs) is retraced when forced (threshold 0)."""
    model, processor = tiny_model(family)
    inputs = tiny_inputs(family, processor, ["what is this", "describe the image in detail please"])
    plain = greedy(model, inputs, [])
    forced = greedy(model, inputs, [{"name": "memvr", "entropy_threshold": 0.0}])
    assert max((a - b).abs().max() for a, b in zip(forced.logits, plain.logits, strict=True)) > 1e-4


def test_stacks_with_a_head_method_and_a_decoder():
    """With ``retracing_ratio=0`` MemVR stacked with PAI, or with VCD's blank-image contrast, gives what
    PAI or VCD give alone, bit for bit; forced to retrace (threshold 0) it moves them. Qwen2-VL maps
    the blank image to all-zero features: that branch has nothing to retrace (the official formula
    would divide by zero and make the contrast NaN)."""
    model, processor = tiny_model("qwen2_vl")
    inputs = tiny_inputs("qwen2_vl", processor, ["what is this", "describe the image in detail please"])
    neutral = {"name": "memvr", "entropy_threshold": 0.0, "retracing_ratio": 0.0}
    forced = {"name": "memvr", "entropy_threshold": 0.0}
    for other in ("pai", {"name": "vcd", "contrast": "blank"}):
        alone_ = greedy(model, inputs, [other])
        stacked = greedy(model, inputs, [neutral, other])
        for a, b in zip(stacked.logits, alone_.logits, strict=True):
            assert torch.equal(a, b), other
        moved = greedy(model, inputs, [forced, other])
        assert all(torch.isfinite(s).any(-1).all() for s in moved.logits)
        assert max((a - b).abs().max() for a, b in zip(moved.logits, alone_.logits, strict=True)) > 1e-4


def test_compiled_static_cache_decoding_matches_eager_in_one_graph():
    """As tests/test_compile_heads.py: transformers' compiled decoding step (static cache, dynamo's
    ``eager`` backend, ``fullgraph=True``) gives eager decoding's scores, in one graph with no break,
    reused by a second batch of the same shape. Layers 0..2 are checked with a threshold that
    triggers in some rows and steps and not others, in different layers: the decision is data."""
    model, processor = tiny_model("llava")
    with torch.no_grad():
        model.lm_head.weight *= 8.0  # entropies spread around 0.95 (see the oracle class above)
    batches = [
        tiny_inputs("llava", processor, ["what is this", "describe the image in detail please"], seed=s)
        for s in (0, 1)
    ]
    method = {"name": "memvr", "entropy_threshold": 0.95, "layers": [0, 1, 2]}
    kwargs = dict(
        max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
    )

    def run(inputs, compiled):
        extra = {}
        if compiled:
            config = CompileConfig(fullgraph=True, backend="eager", mode=None)
            config._compile_all_devices = True
            extra = dict(cache_implementation="static", compile_config=config)
        with torch.no_grad():
            return veridical.generate(model, inputs, [method], **kwargs, **extra)

    eager = [run(inputs, False) for inputs in batches]
    torch._dynamo.reset()
    counters.clear()
    graphs, compiled = [], []
    for inputs in batches:
        compiled.append(run(inputs, True))
        graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs == [1, 1], graphs
    for want, got in zip(eager, compiled, strict=True):
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(want.scores, got.scores, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

"""Contrast branches batched into the main forward give what a separate branch forward gives."""

from contextlib import ExitStack

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import veridical
from veridical import get_adapter
from veridical.attention import SEGMENTS
from veridical.contrastive import ContrastiveDecoder
from veridical.decoders import M3ID, VCD, AvisC
from veridical.registry import build_method, parse_method_spec
from veridical.tiny import tiny_inputs

RUN = dict(
    max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
)
DECODERS = [(VCD, {"seed": 0}), (M3ID, {"alpha": 0.9}), (AvisC, {})]


def batch_of_two(tiny_models, family):
    model, processor = tiny_models(family)
    return model, tiny_inputs(family, processor, ["describe this image in detail please", "what is it ?"])


def assert_same_generation(fused, separate):
    assert torch.equal(fused.sequences, separate.sequences)
    for a, b in zip(fused.scores, separate.scores, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


class CountForwards:
    """Forwards of the text decoder, counted by a torch hook."""

    def __init__(self, model):
        self.calls = 0
        self.handle = get_adapter(model).text_model.register_forward_pre_hook(self.count)

    def count(self, *_):
        self.calls += 1


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize(("decoder", "settings"), DECODERS, ids=lambda v: getattr(v, "__name__", ""))
def test_fused_branch_equals_a_separate_branch(tiny_models, family, decoder, settings, beams):
    model, inputs = batch_of_two(tiny_models, family)
    counter = CountForwards(model)
    try:
        processor = decoder(model, inputs, **settings)
        separate = model.generate(**inputs, logits_processor=[processor], num_beams=beams, **RUN)
        separate_forwards, counter.calls = counter.calls, 0
        fused_decoder = decoder(model, inputs, **settings)
        with fused_decoder:
            fused = model.generate(**inputs, logits_processor=[fused_decoder], num_beams=beams, **RUN)
    finally:
        counter.handle.remove()
    assert fused_decoder._branch.fused and not processor._branch.fused
    # The branch's prompt runs on its own, every later token in the main forward: one forward saved
    # per generated token after the first.
    assert separate_forwards - counter.calls == RUN["max_new_tokens"] - 1
    assert_same_generation(fused, separate)


def test_branch_without_image_is_padded_into_the_main_cache(tiny_models):
    model, inputs = batch_of_two(tiny_models, "llava")
    decoder = M3ID(model, inputs, alpha=0.9)
    with decoder:
        out = model.generate(**inputs, logits_processor=[decoder], **RUN)
    # The image-free prompt is shorter than the main one by the image tokens: padded on the left.
    assert decoder._branch.pad == int(get_adapter(model).image_mask(inputs["input_ids"]).sum(1).max())
    separate = model.generate(**inputs, logits_processor=[M3ID(model, inputs, alpha=0.9)], **RUN)
    assert_same_generation(out, separate)


STACKS = ["pai+m3id:alpha=0.9", "act+m3id:alpha=0.9", "vista+vcd:seed=0", "vcd:seed=0+m3id"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
@pytest.mark.parametrize("stack", STACKS)
def test_fused_stacks_equal_separate_branches(tiny_models, family, stack):
    """Head methods edit each branch in its own key columns; several branches share one forward."""
    model, inputs = batch_of_two(tiny_models, family)
    specs = [parse_method_spec(part) for part in stack.split("+")]
    fused = veridical.generate(model, inputs, specs, num_beams=2, **RUN)
    processors = LogitsProcessorList()
    with ExitStack() as heads:
        for method in (build_method(spec, model, inputs) for spec in specs):
            if isinstance(method, LogitsProcessor):
                processors.append(method)  # a bare processor: its branch runs its own forward
                continue
            heads.enter_context(method)
            if getattr(method, "logits_processor", None) is not None:
                processors.append(method.logits_processor)
        separate = model.generate(**inputs, logits_processor=processors, num_beams=2, **RUN)
    assert_same_generation(fused, separate)


def test_generate_sees_only_its_rows_and_gets_its_cache_back(tiny_models):
    model, inputs = batch_of_two(tiny_models, "llava")
    decoder = VCD(model, inputs, seed=0)
    module = get_adapter(model).decode_module()
    with decoder:
        assert "forward" in vars(module)  # the fusion wraps the decode module's forward
        out = model.generate(
            **inputs,
            logits_processor=[decoder],
            num_beams=2,
            output_hidden_states=True,
            **RUN,
        )
    rows = 2 * inputs["input_ids"].shape[0]
    assert all(h.shape[0] == rows for step in out.hidden_states[1:] for h in step)
    cache = out.past_key_values
    assert all(layer.keys.shape[0] == rows for layer in cache.layers)
    assert not hasattr(cache, SEGMENTS) and "reorder_cache" not in vars(cache)
    assert "forward" not in vars(module)  # its own forward is back
    assert decoder.fusion is None


def test_fusion_is_removed_when_generation_raises(tiny_models):
    model, inputs = batch_of_two(tiny_models, "llava")

    class Boom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > inputs["input_ids"].shape[1] + 1:
                raise KeyboardInterrupt
            return scores

    module = get_adapter(model).decode_module()
    with pytest.raises(KeyboardInterrupt):
        veridical.generate(model, inputs, ["vcd"], logits_processor=[Boom()], max_new_tokens=5)
    assert "forward" not in vars(module)
    vanilla = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert vanilla.shape[0] == inputs["input_ids"].shape[0]


class _LongerContrast(ContrastiveDecoder):
    """A contrast prompt three text tokens longer than the main one."""

    def contrast_inputs(self):
        ids, mask = self.inputs["input_ids"], self.inputs["attention_mask"]
        out = dict(self.inputs)
        out["input_ids"] = torch.cat([ids[:, -1:].expand(-1, 3), ids], dim=1)
        out["attention_mask"] = torch.cat([torch.ones_like(mask[:, :3]), mask], dim=1)
        return out

    def combine(self, log_probs, contrast_log_probs):
        return 2 * log_probs - contrast_log_probs


def test_branch_that_cannot_join_runs_its_own_forward(tiny_models):
    model, inputs = batch_of_two(tiny_models, "llava")
    decoder = _LongerContrast(model, inputs)
    with decoder:
        fused = model.generate(**inputs, logits_processor=[decoder], **RUN)
    assert not decoder._branch.fused
    separate = model.generate(**inputs, logits_processor=[_LongerContrast(model, inputs)], **RUN)
    assert_same_generation(fused, separate)

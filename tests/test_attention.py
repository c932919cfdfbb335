import copy

import pytest
import torch

from veridical import get_adapter
from veridical.attention import ATTENTION_NAME, AttentionHook, intercept_attention


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_close_on_tokens(actual, expected, inputs):
    """Compare logits at real tokens; padding rows differ between eager and sdpa kernels."""
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)


class Recording(AttentionHook):
    def __init__(self, layers=None):
        self.layers = layers
        self.seen: list[tuple[int, torch.Tensor]] = []

    def edit_weights(self, module, weights, context):
        self.seen.append((module.layer_idx, weights.clone()))
        return weights


class ScaleWeights(AttentionHook):
    def __init__(self, layer: int, factor: float):
        self.layers, self.factor = {layer}, factor

    def edit_weights(self, module, weights, context):
        return weights * self.factor


class ZeroHeadOutput(AttentionHook):
    needs_weights = False

    def __init__(self, layer: int, head: int):
        self.layers, self.head = {layer}, head

    def edit_outputs(self, module, outputs, context):
        outputs = outputs.clone()
        outputs[:, :, self.head] = 0
        return outputs


def test_noop_hooks_match_eager_attention(model_and_inputs):
    model, _, inputs = model_and_inputs
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with intercept_attention(model, AttentionHook()):
        hooked = logits(model, inputs)
    assert_close_on_tokens(hooked, logits(eager, inputs), inputs)


def test_recorded_probabilities_equal_eager_output_attentions(model_and_inputs):
    model, _, inputs = model_and_inputs
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    reference = (getattr(out, "language_model_outputs", None) or out).attentions
    hook = Recording(layers={1, 3})
    with intercept_attention(model, hook):
        logits(model, inputs)
    assert [layer for layer, _ in hook.seen] == [1, 3], "only the requested layers run eager attention"
    for layer, weights in hook.seen:
        torch.testing.assert_close(weights, reference[layer].float(), atol=1e-6, rtol=1e-5)


def test_rewritten_probabilities_change_the_layer_output(model_and_inputs):
    # Doubling every probability of layer 1 doubles its attention output, i.e. o_proj's input;
    # o_proj has no bias, so this equals doubling o_proj's weight in an untouched copy.
    model, _, inputs = model_and_inputs
    reference = copy.deepcopy(model)
    with torch.no_grad():
        get_adapter(reference).attention_modules[1].o_proj.weight.mul_(2)
    with intercept_attention(model, ScaleWeights(layer=1, factor=2.0)):
        hooked = logits(model, inputs)
    assert_close_on_tokens(hooked, logits(reference, inputs), inputs)
    assert not torch.allclose(hooked, logits(model, inputs), atol=1e-3)


def test_head_output_scaling_equals_zeroing_its_o_proj_columns(model_and_inputs):
    model, _, inputs = model_and_inputs
    adapter = get_adapter(model)
    reference = copy.deepcopy(model)
    d = adapter.head_dim
    with torch.no_grad():
        get_adapter(reference).attention_modules[2].o_proj.weight[:, 3 * d : 4 * d] = 0
    with intercept_attention(model, ZeroHeadOutput(layer=2, head=3)):
        hooked = logits(model, inputs)
    assert_close_on_tokens(hooked, logits(reference, inputs), inputs)


def test_only_the_text_decoder_is_switched(model_and_inputs):
    model, _, _ = model_and_inputs
    before = {k: getattr(model.config, k)._attn_implementation for k in model.config.sub_configs}
    with intercept_attention(model, AttentionHook()):
        during = {k: getattr(model.config, k)._attn_implementation for k in model.config.sub_configs}
    after = {k: getattr(model.config, k)._attn_implementation for k in model.config.sub_configs}
    assert during["text_config"] == ATTENTION_NAME
    assert {k: v for k, v in during.items() if k != "text_config"} == {
        k: v for k, v in before.items() if k != "text_config"
    }
    assert after == before


def test_outputs_are_bit_identical_after_exit_also_after_an_error(model_and_inputs):
    model, _, inputs = model_and_inputs
    untouched = logits(model, inputs)
    with intercept_attention(model, ScaleWeights(layer=0, factor=0.5)):
        pass
    assert torch.equal(logits(model, inputs), untouched)
    with pytest.raises(RuntimeError, match="boom"):
        with intercept_attention(model, ScaleWeights(layer=0, factor=0.5)):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, inputs), untouched)
    assert not any(hasattr(m, "_veridical_hooks") for m in model.modules())


def test_nested_interceptions_compose_and_unwind(model_and_inputs):
    model, _, inputs = model_and_inputs
    untouched = logits(model, inputs)
    outer, inner = ScaleWeights(layer=1, factor=2.0), ScaleWeights(layer=1, factor=0.5)
    with intercept_attention(model, outer):
        only_outer = logits(model, inputs)
        with intercept_attention(model, inner):
            both = logits(model, inputs)  # 2 * 0.5: back to the plain probabilities
        assert torch.equal(logits(model, inputs), only_outer)
    assert_close_on_tokens(both, untouched, inputs)
    assert torch.equal(logits(model, inputs), untouched)


def test_hooks_of_one_model_do_not_reach_another(tiny_models):
    model_a, processor = tiny_models("llava")
    model_b = copy.deepcopy(model_a)
    from veridical.tiny import tiny_inputs

    inputs = tiny_inputs("llava", processor, ["what is this ?"])
    untouched = logits(model_b, inputs)
    with intercept_attention(model_a, ScaleWeights(layer=0, factor=3.0)):
        assert torch.equal(logits(model_b, inputs), untouched)
        assert not torch.allclose(logits(model_a, inputs), untouched)


def test_hook_layers_out_of_range_are_rejected(tiny_models):
    model, _ = tiny_models("llava")
    with pytest.raises(ValueError, match="layers"):
        with intercept_attention(model, ScaleWeights(layer=99, factor=1.0)):
            pass
    assert model.config.text_config._attn_implementation != ATTENTION_NAME


class RecordContext(AttentionHook):
    layers = [0]

    def __init__(self):
        self.seen = []

    def edit_weights(self, module, weights, context):
        keys = weights.shape[-1]
        self.seen.append((context.past, context.rows, context.image_keys(keys).sum(-1).tolist(), keys))
        return weights


def test_context_tracks_image_positions_per_sequence(model_and_inputs):
    """Main rows see their image tokens at every step; an image-free contrast branch sees none."""
    import veridical

    model, _, inputs = model_and_inputs
    counts = get_adapter(model).image_mask(inputs["input_ids"]).sum(-1).tolist()
    prompt_len = inputs["input_ids"].shape[1]
    hook = RecordContext()
    with intercept_attention(model, hook):
        veridical.generate(
            model,
            inputs,
            methods=[{"name": "vcd", "contrast": "no_image"}],
            max_new_tokens=3,
            num_beams=2,
            do_sample=False,
        )
    beams = [c for c in counts for _ in range(2)]
    main = [s for s in hook.seen if s[2] == beams]
    branch = [s for s in hook.seen if not any(s[2])]
    assert [s[0] for s in main] == [0, prompt_len, prompt_len + 1]
    assert [s[3] for s in main] == [prompt_len, prompt_len + 1, prompt_len + 2]
    assert len(branch) == 3 and branch[0][0] == 0 and branch[1][0] > 0
    assert len(main) + len(branch) == len(hook.seen)


def test_all_torch_hooks_removed_after_interception(model_and_inputs):
    model, _, inputs = model_and_inputs
    adapter = get_adapter(model)
    before = (len(adapter.text_model._forward_pre_hooks), len(adapter.embed_tokens._forward_pre_hooks))
    with pytest.raises(RuntimeError):
        with intercept_attention(model, RecordContext()):
            logits(model, inputs)
            raise RuntimeError("boom")
    after = (len(adapter.text_model._forward_pre_hooks), len(adapter.embed_tokens._forward_pre_hooks))
    assert before == after
    assert not hasattr(adapter.attention_modules[0], "_veridical_hooks")

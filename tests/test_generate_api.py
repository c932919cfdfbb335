import pytest
import torch
from transformers import LogitsProcessor

import veridical
from veridical.attention import AttentionHook, intercept_attention
from veridical.decoders import VCD
from veridical.errors import MethodSpecError
from veridical.registry import register_method

GREEDY = dict(max_new_tokens=5, do_sample=False)


class CountCalls(LogitsProcessor):
    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores


class _HalveLayer0(AttentionHook):
    layers = {0}

    def edit_weights(self, module, weights, context):
        return weights * 0.5


@register_method("test_halve_layer0")
class HalveLayer0:
    """A minimal head method for these tests: a context manager around an attention hook."""

    def __init__(self, model, inputs, fail_on_enter: bool = False):
        self.model, self.fail_on_enter = model, fail_on_enter

    def __enter__(self):
        if self.fail_on_enter:
            raise RuntimeError("method failed")
        self._ctx = intercept_attention(self.model, _HalveLayer0())
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@pytest.fixture
def llava(tiny_models):
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    return model, tiny_inputs("llava", processor, ["describe this image in detail please", "what is this ?"])


def test_no_methods_is_exactly_model_generate(llava):
    model, inputs = llava
    out = veridical.generate(
        model, inputs, methods=[], output_scores=True, return_dict_in_generate=True, **GREEDY
    )
    ref = model.generate(**inputs, output_scores=True, return_dict_in_generate=True, **GREEDY)
    assert type(out) is type(ref)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores, strict=True))


def test_name_dict_and_instance_specs_agree_with_a_plain_logits_processor(llava):
    model, inputs = llava
    reference = model.generate(**inputs, logits_processor=[VCD(model, inputs, alpha=2.0, seed=3)], **GREEDY)
    by_dict = veridical.generate(model, inputs, methods=[{"name": "vcd", "alpha": 2.0, "seed": 3}], **GREEDY)
    by_instance = veridical.generate(model, inputs, methods=[VCD(model, inputs, alpha=2.0, seed=3)], **GREEDY)
    assert torch.equal(by_dict, reference) and torch.equal(by_instance, reference)
    torch.manual_seed(0)
    by_name = veridical.generate(model, inputs, methods=["vcd"], **GREEDY)
    torch.manual_seed(0)
    assert torch.equal(by_name, model.generate(**inputs, logits_processor=[VCD(model, inputs)], **GREEDY))


def test_user_logits_processors_are_kept(llava):
    model, inputs = llava
    counter = CountCalls()
    veridical.generate(model, inputs, methods=["vcd"], logits_processor=[counter], **GREEDY)
    assert counter.calls == 5


def test_list_methods_has_the_registered_names():
    names = veridical.list_methods()
    assert "vcd" in names and names == sorted(names)


def test_unknown_method_lists_the_valid_ones(llava):
    model, inputs = llava
    with pytest.raises(MethodSpecError) as err:
        veridical.generate(model, inputs, methods=["vdc"], **GREEDY)
    assert "'vdc'" in str(err.value) and "vcd" in str(err.value)


def test_unknown_hyperparameter_lists_the_valid_ones(llava):
    model, inputs = llava
    with pytest.raises(MethodSpecError) as err:
        veridical.generate(model, inputs, methods=[{"name": "vcd", "alhpa": 1}], **GREEDY)
    message = str(err.value)
    assert "alhpa" in message and "alpha=1.0" in message and "beta=0.1" in message


def test_malformed_specs_are_rejected(llava):
    model, inputs = llava
    with pytest.raises(MethodSpecError, match="name"):
        veridical.generate(model, inputs, methods=[{"alpha": 1}], **GREEDY)
    with pytest.raises(MethodSpecError, match="not a method"):
        veridical.generate(model, inputs, methods=[42], **GREEDY)


def test_head_methods_compose_with_decoders_and_are_removed_afterwards(llava):
    model, inputs = llava
    vanilla = model.generate(**inputs, **GREEDY)
    stacked = veridical.generate(
        model, inputs, methods=["test_halve_layer0", {"name": "vcd", "seed": 0}], **GREEDY
    )
    with intercept_attention(model, _HalveLayer0()):
        expected = model.generate(**inputs, logits_processor=[VCD(model, inputs, seed=0)], **GREEDY)
    assert torch.equal(stacked, expected)
    assert torch.equal(model.generate(**inputs, **GREEDY), vanilla)


def test_head_methods_are_removed_when_generation_fails(llava):
    model, inputs = llava
    vanilla = model.generate(**inputs, **GREEDY)
    with pytest.raises(ValueError):
        veridical.generate(model, inputs, methods=["test_halve_layer0"], max_new_tokens=-3)
    with pytest.raises(RuntimeError, match="method failed"):
        veridical.generate(
            model,
            inputs,
            methods=["test_halve_layer0", "vcd", {"name": "test_halve_layer0", "fail_on_enter": True}],
            **GREEDY,
        )
    assert model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(model.generate(**inputs, **GREEDY), vanilla)


def test_command_line_specs_keep_lists_and_name_bad_values():
    from veridical.errors import MethodSpecError
    from veridical.registry import parse_method_spec

    spec = parse_method_spec("var:sink_dims=[0,1],tau=1.5")
    assert spec == {"name": "var", "sink_dims": [0, 1], "tau": 1.5}
    assert parse_method_spec("act:heads={1: [0, 2]}") == {"name": "act", "heads": {1: [0, 2]}}
    # VISTA's official layer strings carry commas inside quotes.
    assert parse_method_spec('vista:layers="2,6,8,12",lam=0.1') == {
        "name": "vista",
        "layers": "2,6,8,12",
        "lam": 0.1,
    }
    assert parse_method_spec("vista:logits_layers='25,30'") == {"name": "vista", "logits_layers": "25,30"}
    with pytest.raises(MethodSpecError, match="sink_dims"):
        parse_method_spec("var:sink_dims=[0,1")

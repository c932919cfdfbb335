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


# -- input and method-list errors (one line each, before any forward) ---------------------------------


def test_a_string_or_dict_instead_of_a_list_says_to_pass_a_list(llava):
    model, inputs = llava
    with pytest.raises(MethodSpecError) as err:
        veridical.generate(model, inputs, methods="vcd", **GREEDY)
    assert str(err.value) == "methods must be a list of methods, got the str 'vcd': pass methods=['vcd']"
    with pytest.raises(MethodSpecError, match=r"pass methods=\[\{'name': 'vcd', 'alpha': 2\}\]"):
        veridical.generate(model, inputs, methods={"name": "vcd", "alpha": 2}, **GREEDY)
    with pytest.raises(MethodSpecError, match=r"got one VCD: pass methods=\[method\]"):
        veridical.generate(model, inputs, methods=VCD(model, inputs), **GREEDY)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "abc"])
def test_non_finite_hyperparameters_are_refused_not_run(llava, value):
    """alpha=nan used to generate empty outputs (a "perfect" CHAIR score)."""
    model, inputs = llava
    with pytest.raises(MethodSpecError, match=f"^vcd: alpha must be a finite number >= 0, got {value!r}$"):
        veridical.generate(model, inputs, methods=["var", {"name": "vcd", "alpha": value}], **GREEDY)


def _image_keys(inputs) -> set[str]:
    text = {"input_ids", "attention_mask", "mm_token_type_ids", "qformer_input_ids", "qformer_attention_mask"}
    return set(inputs) - text


@pytest.fixture(params=["llava", "llava_next", "qwen2_vl", "instructblip"])
def any_family(request, tiny_models):
    model, processor = tiny_models(request.param)
    return request.param, model, processor


@pytest.mark.parametrize("methods", [[], ["vcd"]])
def test_an_empty_batch_is_an_input_error(any_family, methods):
    from veridical.errors import InputError
    from veridical.tiny import tiny_inputs

    family, model, processor = any_family
    inputs = tiny_inputs(family, processor, ["what is this ?"])
    empty = {k: v[:0] for k, v in inputs.items()}
    with pytest.raises(InputError, match="^inputs hold no prompt"):
        veridical.generate(model, empty, methods=methods, **GREEDY)


@pytest.mark.parametrize("methods", [[], ["vcd"], ["var"]])
def test_right_padding_is_refused_with_the_fix(any_family, methods):
    """transformers only warns and generates after the padding (a wrong answer)."""
    from veridical.errors import InputError
    from veridical.tiny import tiny_inputs

    family, model, processor = any_family
    processor.tokenizer.padding_side = "right"
    try:
        inputs = tiny_inputs(family, processor, ["describe this image in detail please", "what ?"])
    finally:
        processor.tokenizer.padding_side = "left"
    assert inputs["attention_mask"][1, -1] == 0, "the second row must be right-padded"
    with pytest.raises(InputError) as err:
        veridical.generate(model, inputs, methods=methods, **GREEDY)
    message = str(err.value)
    assert message.startswith("row(s) [1] of the batch are right-padded") and "\n" not in message
    assert 'processor.tokenizer.padding_side = "left"' in message


def _mismatched(family, processor):
    """Inputs whose text holds two image placeholders with one image, and one placeholder with two."""
    from veridical.adapters import ADAPTERS
    from veridical.tiny import random_images

    tag = ADAPTERS[family].image_placeholder
    texts = [f"USER: {tag} describe ASSISTANT:", f"USER: {tag} what ? ASSISTANT:"]
    two = processor(images=random_images(2), text=texts, return_tensors="pt", padding=True)
    one = processor(images=random_images(1), text=texts[:1], return_tensors="pt", padding=True)
    more = {**two, **{k: one[k] for k in _image_keys(one)}}
    fewer = {**one, **{k: two[k] for k in _image_keys(two)}}
    return more, fewer


@pytest.mark.parametrize("methods", [[], ["vcd"]])
def test_placeholders_and_images_that_do_not_match_name_both_counts(any_family, methods):
    """Today: transformers' "Image features and image tokens do not match" (LLaVA), StopIteration
    (Qwen2-VL), a tensor-size RuntimeError (InstructBLIP)."""
    from veridical.errors import InputError

    family, model, processor = any_family
    more, fewer = _mismatched(family, processor)
    with pytest.raises(
        InputError, match=r"^input_ids hold 2 image placeholder run\(s\) .* carry 1 image\(s\)"
    ):
        veridical.generate(model, more, methods=methods, **GREEDY)
    with pytest.raises(
        InputError, match=r"^input_ids hold 1 image placeholder run\(s\) .* carry 2 image\(s\)"
    ):
        veridical.generate(model, fewer, methods=methods, **GREEDY)


def test_adjacent_placeholders_with_their_images_still_generate(tiny_models):
    """Two ``<image>`` side by side form one run of image tokens; the count of tokens, not of runs,
    decides."""
    from veridical.tiny import random_images

    model, processor = tiny_models("llava")
    inputs = processor(
        images=random_images(2), text=["USER: <image><image> compare ASSISTANT:"], return_tensors="pt"
    )
    out = veridical.generate(model, inputs, methods=["vcd"], max_new_tokens=1, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 1


def test_a_row_of_only_padding_is_an_input_error(llava):
    from veridical.errors import InputError

    model, inputs = llava
    broken = dict(inputs)
    broken["attention_mask"] = inputs["attention_mask"].clone()
    broken["attention_mask"][1] = 0
    with pytest.raises(InputError, match=r"^row\(s\) \[1\] of the batch hold no token"):
        veridical.generate(model, broken, methods=[], **GREEDY)

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from veridical import SUPPORTED_FAMILIES, get_adapter
from veridical.errors import InputError, UnsupportedModelError
from veridical.tiny import FAMILIES, full_size_llava, random_images


def test_every_family_is_supported():
    assert set(SUPPORTED_FAMILIES) == set(FAMILIES)


def test_unsupported_model_names_the_supported_families():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(model)
    assert "'llama'" in str(err.value)
    for family in FAMILIES:
        assert family in str(err.value)


def _image_feature_counts(model, inputs) -> list[int]:
    """Image feature vectors per row as the model itself produces them (independent of the adapter)."""
    family = model.config.model_type
    batch = inputs["input_ids"].shape[0]
    if family == "instructblip":
        return [model.config.num_query_tokens] * batch
    if family in ("qwen2_vl", "qwen2_5_vl"):
        merge = model.config.vision_config.spatial_merge_size
        return [int(thw.prod()) // merge**2 for thw in inputs["image_grid_thw"]]
    with torch.no_grad():
        kwargs = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], **kwargs).pooler_output
    return [int(f.shape[0]) for f in feats] if isinstance(feats, (list, tuple)) else [feats.shape[1]] * batch


def test_image_spans_follow_left_padding(model_and_inputs):
    model, _, inputs = model_and_inputs
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs["input_ids"])
    counts = _image_feature_counts(model, inputs)
    mask = inputs["attention_mask"]
    assert mask[1].sum() < mask[0].sum(), "the second prompt is shorter, so it is left-padded"
    for row, (row_spans, count) in enumerate(zip(spans, counts, strict=True)):
        assert len(row_spans) == 1
        start, end = row_spans[0]
        assert end - start == count
        assert mask[row, start:end].all()
        ids = inputs["input_ids"][row]
        assert (ids[start:end] == adapter.image_token_id).all()
    # LLaVA-NeXT's token count depends on the image's aspect ratio: the two images differ.
    if model.config.model_type == "llava_next":
        assert counts[0] != counts[1]


def test_image_spans_with_two_images_in_one_prompt(tiny_models):
    model, processor = tiny_models("llava")
    inputs = processor(
        images=random_images(3),
        text=["USER: <image> and <image> ?", "USER: <image> ?"],
        return_tensors="pt",
        padding=True,
    )
    spans = get_adapter(model).image_spans(inputs["input_ids"])
    assert [len(s) for s in spans] == [2, 1]
    (a0, a1), (b0, b1) = spans[0]
    assert a1 - a0 == b1 - b0 == 25 and b0 == a1 + 1  # one "and" between the images


def test_decoder_structure_matches_config(model_and_inputs):
    model, _, _ = model_and_inputs
    adapter = get_adapter(model)
    text = model.config.text_config
    assert adapter.num_layers == len(adapter.layers) == text.num_hidden_layers
    assert adapter.num_heads == text.num_attention_heads
    assert adapter.num_kv_heads == text.num_key_value_heads < adapter.num_heads  # GQA in the tiny models
    attn = adapter.attention_modules[0]
    assert attn.o_proj.in_features == adapter.num_heads * adapter.head_dim
    assert adapter.lm_head.out_features == text.vocab_size
    assert adapter.final_norm.weight.shape[0] == text.hidden_size


def test_inputs_without_image_token_are_rejected(tiny_models, family):
    model, processor = tiny_models(family)
    text = processor.tokenizer(["what is this ?", "USER: what ?"], return_tensors="pt", padding=True)
    pixels = torch.zeros(2, 3, 30, 30)
    with pytest.raises(InputError, match="no image token"):
        get_adapter(model).validate_inputs({**text, "pixel_values": pixels})


def test_inputs_without_pixels_are_rejected(model_and_inputs):
    model, _, inputs = model_and_inputs
    bad = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(InputError, match="pixel_values"):
        get_adapter(model).validate_inputs(bad)


def test_fewer_images_than_placeholders_are_rejected(model_and_inputs):
    model, _, inputs = model_and_inputs
    bad = dict(inputs)
    if "image_grid_thw" in inputs:  # Qwen: one image's grid for two placeholders
        bad["image_grid_thw"] = inputs["image_grid_thw"][:1]
        bad["pixel_values"] = inputs["pixel_values"][: int(inputs["image_grid_thw"][0].prod())]
    else:
        bad["pixel_values"] = inputs["pixel_values"][:1]
    with pytest.raises(InputError, match="2 image placeholder run"):
        get_adapter(model).validate_inputs(bad)
    if "image_grid_thw" in inputs:
        with pytest.raises(InputError, match="patches"):
            get_adapter(model).validate_inputs({**inputs, "pixel_values": inputs["pixel_values"][:3]})


def test_full_size_llava_has_the_shapes_of_llava_1_5_7b():
    """The benchmark's real-size model: built on the meta device (no memory), checked against the
    released model's size and image token count."""
    model, processor = full_size_llava(device="meta")
    adapter = get_adapter(model)
    assert (adapter.num_layers, adapter.num_heads, adapter.text_config.hidden_size) == (32, 32, 4096)
    # LLaMA-2-7B (6.74 B) + CLIP ViT-L/14 (0.30 B) + projector: 7.06 B parameters.
    assert 7.0e9 < sum(p.numel() for p in model.parameters()) < 7.1e9
    inputs = processor(
        images=random_images(1, sizes=((480, 640),)), text=["USER: <image>\nwhat is this ? ASSISTANT:"]
    )
    assert int((torch.as_tensor(inputs["input_ids"]) == model.config.image_token_id).sum()) == 576
    assert adapter.image_mask(torch.as_tensor(inputs["input_ids"])).sum() == 576

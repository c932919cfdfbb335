"""VAF (ClearSight) against an oracle built from transformers' own eager computations.

Every decoder layer's output at every prompt position and generated token is re-run by hand from
transformers' own modules (``test_oracle_pai_vhr.rerun_layer``) with the official edit written out
from ustc-hyin/ClearSight at 5466c94: in layers 9..14 (``visaug/inference/infer_pope.py`` lines 52-58),
the raw scores ``q k^T / sqrt(d)`` of the query rows after the image are multiplied, before the mask
is added, by ``enh_para`` on the image columns and ``sup_para`` on the columns before the image
(``visaug/inference/AttnAdapter.py`` lines 68-78: rows ``SYS_LEN + IMG_LEN:`` at the prompt's forward,
the new row at a decoding step; columns ``SYS_LEN:SYS_LEN + IMG_LEN`` and ``:SYS_LEN``). The columns
come from the prompt's own image-token ids and attention mask, not from veridical. The model has 32
layers, so the official indices apply literally, with scores of order one (queries and keys scaled).
"""

from __future__ import annotations

import pytest
import torch
from test_oracle_pai_vhr import NEW_TOKENS, build_llava, check_every_layer_and_step, run

import veridical
from veridical.errors import MethodSpecError
from veridical.heads import VAF
from veridical.tiny import tiny_inputs

#: ``if i > 8 and i < 15`` (infer_pope.py line 54).
VAF_LAYERS = range(9, 15)
ENHANCE, SUPPRESS = 1.15, 0.95  # infer_pope.sh lines 7-8


@pytest.fixture(scope="module")
def llava():
    return build_llava(seed=8, heads=4, kv_heads=2)


def official_scale(model, inputs, enhance: float, suppress: float) -> torch.Tensor:
    """``(B, 1, T, T)`` factor of the raw scores over the whole sequence (prompt + generated tokens)."""
    image = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    rows, width = image.shape
    length = width + NEW_TOKENS - 1
    scale = torch.ones(rows, 1, length, length)
    for row in range(rows):
        columns = image[row].nonzero().flatten()
        first, last = int(columns[0]), int(columns[-1])
        system = real[row].clone()
        system[first:] = False  # the real tokens before the image (LLaVA's SYS_LEN columns)
        for query in range(last + 1, length):  # rows after the image: the prompt's text, then each new token
            scale[row, 0, query, :width][image[row]] = enhance
            scale[row, 0, query, :width][system] = suppress
    return scale


def test_vaf_every_layer_and_step_equals_the_official_edit(llava):
    model, inputs = llava
    image = inputs["input_ids"] == model.config.image_token_id
    # Both rules are exercised: each row has real tokens before its image and text after it, and the
    # rows are padded differently (the columns differ per row).
    assert (inputs["attention_mask"].sum(-1) != inputs["attention_mask"].shape[1]).any()
    assert all(int(row.nonzero()[0]) > 0 for row in image)
    out = run(model, inputs, VAF(model, inputs))
    scale = official_scale(model, inputs, ENHANCE, SUPPRESS)
    check_every_layer_and_step(
        model, inputs, out, scale_of=lambda layer: scale if layer in VAF_LAYERS else None
    )


def test_vaf_changes_the_scores_and_neutral_settings_are_vanilla(llava):
    model, inputs = llava
    kwargs = dict(
        max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        vanilla = veridical.generate(model, inputs, [], **kwargs)
        neutral = veridical.generate(
            model, inputs, [{"name": "vaf", "enhance": 1.0, "suppress": 1.0}], **kwargs
        )
        edited = veridical.generate(model, inputs, ["vaf"], **kwargs)
    assert torch.equal(neutral.sequences, vanilla.sequences)
    for a, b in zip(neutral.logits, vanilla.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (edited.logits[0] - vanilla.logits[0]).abs().max() > 1e-3


def test_vaf_batch_equals_each_prompt_alone(llava, last_logits):
    model, inputs = llava
    with VAF(model, inputs):
        batch = last_logits(model, inputs)
    for row in range(inputs["input_ids"].shape[0]):
        real = inputs["attention_mask"][row].bool()
        alone = {k: v[row : row + 1] for k, v in inputs.items()}
        alone["input_ids"], alone["attention_mask"] = (
            alone["input_ids"][:, real],
            alone["attention_mask"][:, real],
        )
        with VAF(model, alone):
            torch.testing.assert_close(last_logits(model, alone)[0], batch[row], atol=2e-5, rtol=1e-4)


def test_instructblip_has_no_system_columns(tiny_models, last_logits):
    """InstructBLIP's query tokens come first (transformers' processor puts them before BOS), so no
    column precedes the image and ``suppress`` changes nothing, while ``enhance`` does."""
    model, processor = tiny_models("instructblip")
    inputs = tiny_inputs("instructblip", processor, ["what is this", "describe the image in detail please"])
    layers = [1, 2]  # the tiny model's 4 layers scale 9..14 to layer 1 only; two layers edit more
    with torch.no_grad():
        plain = last_logits(model, inputs)
        with VAF(model, inputs, enhance=1.0, suppress=1.0, layers=layers):
            torch.testing.assert_close(last_logits(model, inputs), plain, atol=1e-6, rtol=0)
        with VAF(model, inputs, enhance=1.0, suppress=0.5, layers=layers):
            torch.testing.assert_close(last_logits(model, inputs), plain, atol=1e-6, rtol=0)
        with VAF(model, inputs, enhance=3.0, suppress=1.0, layers=layers):
            assert (last_logits(model, inputs) - plain).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_vaf_edits_other_families(tiny_models, last_logits, family):
    model, processor = tiny_models(family)
    inputs = tiny_inputs(family, processor, ["what is this", "describe the image in detail please"])
    with torch.no_grad():
        plain = last_logits(model, inputs)
        with VAF(model, inputs, enhance=1.0, suppress=0.2, layers=[0, 1, 2, 3]):
            suppressed = last_logits(model, inputs)
        with VAF(model, inputs, enhance=3.0, suppress=1.0, layers=[0, 1, 2, 3]):
            enhanced = last_logits(model, inputs)
    assert (suppressed - plain).abs().max() > 1e-4
    assert (enhanced - plain).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "vaf", "enhance": -1.0}, "enhance"),
        ({"name": "vaf", "suppress": float("nan")}, "suppress"),
        ({"name": "vaf", "layers": [40]}, "not in 0..31"),
    ],
)
def test_vaf_refuses_bad_settings(llava, spec, message):
    model, inputs = llava
    with pytest.raises(MethodSpecError, match=message):
        veridical.generate(model, inputs, [spec], max_new_tokens=1)

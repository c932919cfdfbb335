import math

import pytest
import torch

from veridical import get_adapter
from veridical.contrast import add_diffusion_noise, contrast_inputs, diffusion_alpha_bar
from veridical.errors import MethodSpecError


def test_noise_step_500_mixes_as_vcd_documents():
    abar = diffusion_alpha_bar(500)
    assert math.sqrt(abar) == pytest.approx(0.863, abs=1e-3)
    assert math.sqrt(1 - abar) == pytest.approx(0.505, abs=1e-3)
    assert diffusion_alpha_bar(999) < diffusion_alpha_bar(500) < diffusion_alpha_bar(0) < 1


@pytest.mark.parametrize("step", [-1, 1000])
def test_noise_step_out_of_range(step):
    with pytest.raises(MethodSpecError, match="noise_step"):
        diffusion_alpha_bar(step)


def test_noise_is_seeded_and_has_the_schedules_moments():
    x = torch.full((4, 3, 64, 64), 2.0)
    a = add_diffusion_noise(x, 500, torch.Generator().manual_seed(1))
    b = add_diffusion_noise(x, 500, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.mean().item() == pytest.approx(2.0 * 0.863, abs=0.01)
    assert a.std().item() == pytest.approx(0.505, abs=0.01)


def test_blank_contrast_is_the_normalised_mean_image(model_and_inputs):
    model, _, inputs = model_and_inputs
    out = contrast_inputs(get_adapter(model), inputs, "blank")
    assert torch.count_nonzero(out["pixel_values"]) == 0
    assert torch.equal(out["input_ids"], inputs["input_ids"])


def test_noise_contrast_keeps_prompt_and_changes_pixels(model_and_inputs, family):
    model, _, inputs = model_and_inputs
    out = contrast_inputs(get_adapter(model), inputs, "noise", seed=0)
    assert out["pixel_values"].shape == inputs["pixel_values"].shape
    assert not torch.allclose(out["pixel_values"], inputs["pixel_values"])
    assert torch.equal(out["input_ids"], inputs["input_ids"])
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # The two temporal copies of a still image must stay identical after noising.
        cfg = model.config.vision_config
        p, t = cfg.patch_size, cfg.temporal_patch_size
        grid = out["pixel_values"].view(out["pixel_values"].shape[0], -1, t, p, p)
        assert torch.equal(grid[:, :, 0], grid[:, :, 1])


def test_no_image_contrast_drops_image_tokens_and_repads(model_and_inputs, questions):
    model, processor, inputs = model_and_inputs
    out = contrast_inputs(get_adapter(model), inputs, "no_image")
    assert "pixel_values" not in out and "image_grid_thw" not in out
    for row, question in enumerate(questions):
        kept = out["input_ids"][row][out["attention_mask"][row].bool()]
        expected = processor.tokenizer(f"USER: {question} ASSISTANT:")["input_ids"]
        assert kept.tolist() == expected
        mask = out["attention_mask"][row]
        assert torch.equal(mask, mask.sort().values), "padding must stay on the left"

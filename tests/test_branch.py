"""The contrast branch's cached, step-by-step logits equal plain full forwards of the same sequences."""

import pytest
import torch
from transformers import LogitsProcessor

from veridical import get_adapter
from veridical.branch import Branch
from veridical.contrast import contrast_inputs


class Recorder(LogitsProcessor):
    def __init__(self, branch: Branch):
        self.branch = branch
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids, scores):
        self.steps.append((input_ids.clone(), self.branch.next_logits(input_ids)))
        return scores


def with_generated(branch_inputs: dict, generated: torch.Tensor) -> dict:
    """The branch prompt (one row per prompt) followed by ``generated`` tokens."""
    inputs = dict(branch_inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], generated], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(generated)], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated)], 1)
    return inputs


@pytest.mark.parametrize("kind", ["noise", "no_image"])
@pytest.mark.parametrize(
    "search", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beam"]
)
def test_branch_logits_equal_full_forwards(model_and_inputs, last_logits, kind, search):
    model, _, inputs = model_and_inputs
    adapter = get_adapter(model)
    branch_inputs = contrast_inputs(adapter, inputs, kind, seed=0)
    recorder = Recorder(Branch(adapter, branch_inputs, inputs["input_ids"]))
    # A random model may emit the image token, which a full forward would take for an image.
    model.generate(
        **inputs,
        logits_processor=[recorder],
        max_new_tokens=5,
        do_sample=False,
        suppress_tokens=[adapter.image_token_id],
        **search,
    )
    prompt_len = inputs["input_ids"].shape[1]
    batch = inputs["input_ids"].shape[0]
    assert len(recorder.steps) == 5
    reordered = False
    for step, (ids, logits) in enumerate(recorder.steps):
        expansion = ids.shape[0] // batch
        assert expansion == (3 if search else 1)
        for j in range(expansion):
            rows = torch.arange(j, ids.shape[0], expansion)
            expected = last_logits(model, with_generated(branch_inputs, ids[rows, prompt_len:]))
            torch.testing.assert_close(
                logits[rows], expected, atol=2e-4, rtol=1e-4, msg=f"step {step}, beam {j}"
            )
        if step and search and not torch.equal(ids[:, :-1], recorder.steps[step - 1][0]):
            reordered = True
    if search:
        assert reordered, "beam search never reordered rows: the test did not exercise reordering"


def test_branch_rejects_other_inputs(model_and_inputs):
    model, _, inputs = model_and_inputs
    adapter = get_adapter(model)
    branch = Branch(adapter, contrast_inputs(adapter, inputs, "blank"), inputs["input_ids"])
    other = inputs["input_ids"].flip(0)
    with pytest.raises(ValueError, match="other input_ids"):
        branch.next_logits(other)

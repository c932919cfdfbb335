import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import veridical
from veridical import get_adapter
from veridical.contrast import contrast_inputs
from veridical.decoders import VCD
from veridical.errors import InputError, MethodSpecError, UnsupportedModelError

GREEDY = dict(max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("kind", ["noise", "blank", "no_image"])
def test_first_step_scores_equal_the_formula_from_two_plain_forwards(model_and_inputs, last_logits, kind):
    model, _, inputs = model_and_inputs
    alpha, beta = 1.5, 0.9  # random logits are flat: a high beta makes the cutoff bite
    vcd = VCD(model, inputs, alpha=alpha, beta=beta, contrast=kind, seed=7)
    out = model.generate(
        **inputs, logits_processor=[vcd], output_scores=True, return_dict_in_generate=True, **GREEDY
    )
    l_v = last_logits(model, inputs)
    l_distorted = last_logits(model, contrast_inputs(get_adapter(model), inputs, kind, seed=7))
    expected = (1 + alpha) * l_v - alpha * l_distorted
    expected[l_v < math.log(beta) + l_v.max(dim=-1, keepdim=True).values] = -math.inf
    got = out.scores[0]
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), "the plausibility cutoff differs"
    assert torch.isinf(expected).any(dim=-1).all(), "the cutoff removed nothing: weak test input"
    # VCD returns the log-softmax of the official logits (a per-row shift).
    torch.testing.assert_close(got, torch.log_softmax(expected, dim=-1), atol=1e-4, rtol=1e-4)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]], expected.argmax(dim=-1))


def test_alpha_zero_gives_vanillas_tokens(model_and_inputs):
    model, _, inputs = model_and_inputs
    vanilla = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    with_vcd = model.generate(
        **inputs, max_new_tokens=8, do_sample=False, logits_processor=[VCD(model, inputs, alpha=0.0)]
    )
    assert torch.equal(with_vcd, vanilla)


def test_vcd_changes_the_distribution(model_and_inputs):
    model, _, inputs = model_and_inputs
    kwargs = dict(output_scores=True, return_dict_in_generate=True, max_new_tokens=1, do_sample=False)
    vanilla = model.generate(**inputs, **kwargs).scores[0]
    vcd = model.generate(**inputs, logits_processor=[VCD(model, inputs, contrast="blank")], **kwargs).scores[
        0
    ]
    keep = torch.isfinite(vcd)
    assert not torch.allclose(torch.log_softmax(vanilla, -1)[keep], vcd[keep], atol=1e-3)


@pytest.mark.parametrize(
    "mode",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=0),
        dict(num_beams=3, do_sample=False),
        dict(num_beams=2, num_return_sequences=2, do_sample=False),
    ],
    ids=["greedy", "sampling", "beam", "beam-multi"],
)
def test_vcd_runs_in_every_search_mode_with_batch_2(model_and_inputs, mode):
    model, _, inputs = model_and_inputs

    def run():
        torch.manual_seed(0)
        return veridical.generate(
            model, inputs, methods=[{"name": "vcd", "seed": 0}], max_new_tokens=5, **mode
        )

    first, second = run(), run()
    rows = 2 * mode.get("num_return_sequences", 1)
    assert first.shape[0] == rows
    assert inputs["input_ids"].shape[1] < first.shape[1] <= inputs["input_ids"].shape[1] + 5
    assert torch.equal(first, second), "a seeded run must reproduce"


def test_scores_stay_nan_free_when_other_processors_insert_minus_inf(model_and_inputs):
    model, _, inputs = model_and_inputs
    eos = model.generation_config.eos_token_id
    for mode in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        out = model.generate(
            **inputs,
            logits_processor=[VCD(model, inputs)],
            min_new_tokens=3,
            max_new_tokens=4,
            suppress_tokens=[5, 6],
            output_scores=True,
            return_dict_in_generate=True,
            **mode,
        )
        for step, scores in enumerate(out.scores):
            assert not torch.isnan(scores).any()
            assert torch.isinf(scores[:, [5, 6]]).all()
            if step < 3:
                assert torch.isinf(scores[:, eos]).all()


def test_a_fully_masked_row_passes_through():
    from veridical.decoders.vcd import VCD as Cls

    scores = torch.full((1, 5), -math.inf)
    vcd = Cls.__new__(Cls)
    vcd.alpha, vcd.beta = 1.0, 0.1
    combined = vcd.combine(torch.log_softmax(torch.zeros(1, 5), -1), torch.zeros(1, 5))
    assert torch.isfinite(combined).all()
    assert torch.isnan(torch.log_softmax(scores, -1)).all()  # what the guard in __call__ avoids


def test_errors_name_the_problem(tiny_models, model_and_inputs):
    model, processor, inputs = model_and_inputs
    with pytest.raises(MethodSpecError, match="alpha"):
        VCD(model, inputs, alpha=-1)
    with pytest.raises(MethodSpecError, match="beta"):
        VCD(model, inputs, beta=2)
    with pytest.raises(MethodSpecError, match="contrast"):
        VCD(model, inputs, contrast="rotate")
    with pytest.raises(MethodSpecError, match="noise_step"):
        VCD(model, inputs, noise_step=1000)
    text_only = processor.tokenizer(["what is this ?"], return_tensors="pt")
    with pytest.raises(InputError, match="image"):
        VCD(model, {**text_only, "pixel_values": inputs["pixel_values"]})


def test_unsupported_model_is_rejected():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(UnsupportedModelError, match="llava"):
        VCD(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)})


def test_an_instance_serves_one_generate_call(model_and_inputs):
    model, _, inputs = model_and_inputs
    vcd = VCD(model, inputs)
    model.generate(**inputs, logits_processor=[vcd], **GREEDY)
    with pytest.raises(InputError, match="new"):
        model.generate(**inputs, logits_processor=[vcd], **GREEDY)

"""Two-branch decoders under transformers' static-cache compiled decoding (issue 15).

With ``cache_implementation="static"`` and a ``CompileConfig`` that allows the CPU, ``generate()``
runs the prefill eagerly and every later step through ``torch.compile`` of the model's ``__call__``
(transformers ``generation/utils.py``, ``_valid_auto_compile_criteria`` and ``get_compiled_call``).
The expected tokens and scores come from the same method decoded eagerly on transformers' default
dynamic cache; dynamo's own counters say how many graphs were captured and whether any broke.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import CompileConfig, LogitsProcessor

import veridical
from veridical.decoders import M3ID, VCD
from veridical.tiny import tiny_inputs

RUN = dict(
    max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
)
QUESTIONS = ["describe this image in detail please", "what is it ?"]


def static_compiled() -> dict:
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # generate() compiles on CPU only when told to
    return dict(cache_implementation="static", compile_config=config)


@pytest.fixture(scope="module")
def llava(tiny_models):
    model, processor = tiny_models("llava")
    return model, processor, tiny_inputs("llava", processor, QUESTIONS)


def assert_same(compiled, eager):
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores, strict=True):
        # -inf where the plausibility cutoff removed a token, in both; float32 rounding elsewhere.
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def compile_counts() -> tuple[int, dict]:
    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def test_static_cache_branch_rows_equal_a_separate_branch_forward(llava):
    """Eager decoding on a static cache: M3ID's image-free branch is shorter than the main prompt, so
    its rows join the static cache left-padded and with positions offset from the main rows'."""
    model, _, inputs = llava
    decoder = M3ID(model, inputs, alpha=0.9)
    with decoder:
        fused = model.generate(**inputs, logits_processor=[decoder], **RUN, cache_implementation="static")
    assert decoder._branch.fused and decoder._branch.pad > 0
    assert fused.cache.layers[0].keys.shape[0] == inputs["input_ids"].shape[0]
    # A bare processor (no ``with``): the branch runs its own forward on its own dynamic cache.
    separate = model.generate(
        **inputs, logits_processor=[M3ID(model, inputs, alpha=0.9)], **RUN, cache_implementation="static"
    )
    assert_same(fused, separate)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "instructblip", "llava_next"])
def test_static_cache_branch_rows_in_other_families(tiny_models, family):
    """The same on M-RoPE positions (Qwen2-VL: a dict of masks, text positions as a fourth row), query
    tokens (InstructBLIP) and image tiles (LLaVA-NeXT)."""
    model, processor = tiny_models(family)
    inputs = tiny_inputs(family, processor, QUESTIONS)
    decoder = M3ID(model, inputs, alpha=0.9)
    with decoder:
        fused = model.generate(**inputs, logits_processor=[decoder], **RUN, cache_implementation="static")
    assert decoder._branch.fused
    separate = model.generate(
        **inputs, logits_processor=[M3ID(model, inputs, alpha=0.9)], **RUN, cache_implementation="static"
    )
    assert_same(fused, separate)


def test_vcd_branch_joins_the_static_cache_and_compiles_to_one_graph(llava):
    model, _, inputs = llava
    eager = veridical.generate(model, inputs, [{"name": "vcd", "contrast": "blank"}], **RUN)
    fresh_dynamo()
    decoder = VCD(model, inputs, contrast="blank")
    with torch._dynamo.config.patch(error_on_recompile=True), decoder:
        compiled = model.generate(**inputs, logits_processor=[decoder], **RUN, **static_compiled())
    graphs, breaks = compile_counts()
    # One graph for all decode steps (error_on_recompile raises on a second), none broken.
    assert (graphs, breaks) == (1, {})
    # The branch ran inside the main forward, its rows in the same static cache...
    assert decoder._branch.fused and decoder._branch.cache is None
    # ... and generate()'s cache holds its own two rows again afterwards, the model its own forward.
    assert compiled.cache.layers[0].keys.shape[0] == inputs["input_ids"].shape[0]
    assert "forward" not in vars(model)
    assert_same(compiled, eager)


def test_second_batch_of_the_same_shape_reuses_the_graph(llava):
    model, processor, inputs = llava
    other = tiny_inputs("llava", processor, QUESTIONS, seed=1)  # other images, same shapes
    assert other["input_ids"].shape == inputs["input_ids"].shape
    spec = [{"name": "vcd", "contrast": "blank"}]
    fresh_dynamo()
    veridical.generate(model, inputs, spec, **RUN, compile=True)  # the API's switch for the same
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = veridical.generate(model, other, spec, **RUN, compile=True)
    assert compile_counts() == (1, {})
    assert_same(compiled, veridical.generate(model, other, spec, **RUN))


@pytest.mark.slow
@pytest.mark.parametrize(
    "stack",
    [
        [{"name": "m3id"}],
        [{"name": "avisc"}],
        # PAI's head edits run on the branch rows too; its contrast is VCD's branch.
        [{"name": "pai"}, {"name": "vcd", "contrast": "blank"}],
    ],
    ids=["m3id", "avisc", "pai+vcd"],
)
def test_two_branch_methods_compile_to_one_graph(llava, stack):
    model, _, inputs = llava
    eager = veridical.generate(model, inputs, stack, **RUN)
    fresh_dynamo()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = veridical.generate(model, inputs, stack, **RUN, **static_compiled())
    assert compile_counts() == (1, {})
    assert_same(compiled, eager)


class _Boom(LogitsProcessor):
    def __call__(self, input_ids, scores):
        raise KeyboardInterrupt


def test_model_gets_its_own_forward_back_when_generation_raises(llava):
    """The fusion wraps the model's forward (one graph per compiled step, not three); an interrupted
    generate() must leave the model as it was."""
    model, _, inputs = llava
    with pytest.raises(KeyboardInterrupt):
        veridical.generate(
            model,
            inputs,
            ["m3id"],
            logits_processor=[_Boom()],
            max_new_tokens=3,
            cache_implementation="static",
        )
    assert "forward" not in vars(model)
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2


def test_beam_search_reorders_the_branch_rows_of_a_static_cache(llava):
    """Beam search on a static cache: the branch's beam rows sit below the main ones in one cache and
    must follow every reorder of the main beams (in place, the buffers a compiled step would hold).
    transformers' beam search itself runs eagerly (``_beam_search`` calls ``self(...)``, never the
    compiled call: generation/utils.py), so the expectation is the dynamic-cache beam search."""
    model, _, inputs = llava
    spec = [{"name": "vcd", "contrast": "blank"}]
    beams = {**RUN, "num_beams": 3}
    decoder = VCD(model, inputs, contrast="blank")
    with decoder:
        static = model.generate(**inputs, logits_processor=[decoder], **beams, cache_implementation="static")
    assert decoder._branch.fused
    assert_same(static, veridical.generate(model, inputs, spec, **beams))


def test_sampling_draws_the_eager_tokens_from_the_compiled_step(llava):
    """Sampling after the fused two-branch step: the same seed draws the same tokens as eager decoding
    (VCD's noise is drawn once, at prefill, on the host)."""
    model, _, inputs = llava
    sample = {**RUN, "do_sample": True, "top_k": 0}
    spec = [{"name": "vcd", "noise_step": 500}]
    torch.manual_seed(3)
    eager = veridical.generate(model, inputs, spec, **sample)
    fresh_dynamo()
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)  # the capture, without a C++ build
    config._compile_all_devices = True
    torch.manual_seed(3)
    compiled = veridical.generate(
        model, inputs, spec, **sample, cache_implementation="static", compile_config=config
    )
    assert compile_counts() == (1, {})
    assert_same(compiled, eager)

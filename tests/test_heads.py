"""Head methods: neutral settings, edits checked against plain re-computations, every family, errors."""

import copy
import warnings

import numpy as np
import pytest
import torch

import veridical
from veridical import get_adapter
from veridical.attention import AttentionHook, intercept_attention
from veridical.errors import InputError, MethodSpecError, UnsupportedModelError
from veridical.heads import ACT, PAI, PAINT, VAR, VHR, calibrate_act_heads, load_heads, save_heads
from veridical.heads.sinks import clear_sink_dims, detect_sink_dims
from veridical.heads.vhr import default_vhr_layers

#: Every head method at settings that must not change the model.
NEUTRAL = {
    "pai": {"name": "pai", "alpha": 0.0},
    "var": {"name": "var", "p": 1.0, "tau": 1.0, "sink_dims": [0, 1]},
    "vhr": {"name": "vhr", "alpha": 1.0},
    "act": {"name": "act", "scale": 1.0},
}
#: The same methods at working settings (VAR with a threshold that finds sinks in a random model).
ACTIVE = {
    "pai": "pai",
    "var": None,  # see var_spec
    "vhr": "vhr",
    "act": {"name": "act", "threshold": 0.02},
    "paint": "paint",
}


class LayerInput(AttentionHook):
    observes_layer_inputs, needs_weights = True, False

    def __init__(self, layer):
        self.layers = [layer]

    def observe_layer_input(self, layer_idx, hidden, context):
        self.hidden = hidden.float()


def layer_input(model, inputs, layer) -> torch.Tensor:
    """The residual stream entering decoder layer ``layer`` at prefill."""
    recorder = LayerInput(layer)
    with intercept_attention(model, recorder):
        prefill(model, inputs)
    return recorder.hidden


def var_spec(model, inputs) -> dict:
    """VAR with a threshold that makes about half of the image tokens sinks (random models have no
    massive activations)."""
    hidden = layer_input(model, inputs, 0)
    normed = (hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()[..., [0, 1]].amax(-1)
    image = get_adapter(model).image_mask(inputs["input_ids"])
    return {"name": "var", "tau": float(normed[image].median()), "sink_dims": [0, 1]}


def applies(method: str, family: str) -> bool:
    return method != "paint" or family == "llava"


def first_steps(model, inputs, methods, steps=2, field="logits", **kwargs):
    """Tokens and per-step raw logits (``field="scores"``: after the logits processors)."""
    out = veridical.generate(
        model,
        inputs,
        methods=methods,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        output_scores=True,
        **kwargs,
    )
    return out.sequences, torch.stack(getattr(out, field), dim=1).float()


def assert_neutral(model, inputs, spec):
    tokens, logits = first_steps(model, inputs, [])
    neutral_tokens, neutral_logits = first_steps(model, inputs, [spec])
    assert torch.equal(tokens, neutral_tokens)
    torch.testing.assert_close(neutral_logits, logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(NEUTRAL))
def test_neutral_settings_reproduce_vanilla(model_and_inputs, method):
    model, _, inputs = model_and_inputs
    assert_neutral(model, inputs, NEUTRAL[method])


def test_paint_neutral_settings_reproduce_vanilla(llava):
    assert_neutral(*llava, {"name": "paint", "local_alpha": 0.0, "summary_alpha": 0.0})


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_every_family_greedy_beam_and_with_vcd(model_and_inputs, family, method):
    """Each method changes the first-step logits, and runs under beam search and stacked with VCD."""
    model, _, inputs = model_and_inputs
    spec = ACTIVE[method] or var_spec(model, inputs)
    if not applies(method, family):
        with pytest.raises(UnsupportedModelError, match="llava"):
            veridical.generate(model, inputs, methods=[spec], max_new_tokens=1)
        return
    _, vanilla = first_steps(model, inputs, [], steps=1)
    _, changed = first_steps(model, inputs, [spec], steps=1)
    assert (changed - vanilla).abs().max() > 1e-4
    implementation = get_adapter(model).text_config._attn_implementation
    for extra in ([], ["vcd"]):
        out = veridical.generate(
            model, inputs, methods=[spec, *extra], max_new_tokens=3, num_beams=2, do_sample=False
        )
        assert out.shape[0] == 2 and out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert get_adapter(model).text_config._attn_implementation == implementation


# -- each edit against a plain re-computation -------------------------------------------------------


class Capture(AttentionHook):
    """Keeps what one layer's attention looked like at this point of the hook chain."""

    def __init__(self, layer: int, kind: str):
        self.layers, self.kind, self.seen = [layer], kind, []
        self.needs_weights = kind != "outputs"

    def edit_logits(self, module, logits, context):
        if self.kind == "logits":
            self.seen.append(logits.detach().clone())
        return logits

    def edit_weights(self, module, weights, context):
        if self.kind == "weights":
            self.seen.append(weights.detach().clone())
        return weights

    def edit_outputs(self, module, outputs, context):
        if self.kind == "outputs":
            self.seen.append(outputs.detach().clone())
        return outputs


def prefill(model, inputs):
    adapter = get_adapter(model)
    position_ids = adapter.prefill_position_ids(inputs)
    with torch.no_grad():
        return adapter.prefill_module(inputs)(**inputs, position_ids=position_ids, output_hidden_states=True)


def around(model, inputs, method, layer, before_kind, after_kind="weights"):
    """Run one prefill with ``method`` attached; return what ``layer`` saw before and after it."""
    before, after = Capture(layer, before_kind), Capture(layer, after_kind)
    with intercept_attention(model, before), method, intercept_attention(model, after):
        prefill(model, inputs)
    return before.seen[0], after.seen[0]


@pytest.fixture
def llava(tiny_models, questions):
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    return model, tiny_inputs("llava", processor, questions)


def var_rule(before, sinks, image, p, rho, summ, first_query):
    """VAR's edit written out row by row: ``sinks``/``image`` are per-row lists of key columns."""
    expected, changed = before.clone(), 0
    for b in range(before.shape[0]):
        img = image[b]
        image_sinks = [j for j in img if j in sinks[b]]
        receivers = [j for j in img if j not in sinks[b]]
        if not image_sinks:
            continue
        for h in range(before.shape[1]):
            for q in range(before.shape[2]):
                if q + (before.shape[-1] - before.shape[2]) < first_query[b]:
                    continue
                row = before[b, h, q].double()
                mass = row[img].sum()
                share = row[image_sinks].sum() / (mass + 1e-6 * len(img))
                if share > rho or mass < summ:
                    continue
                new = row.clone()
                budget = (1 - p) * row[sinks[b]].sum()
                new[sinks[b]] *= p
                new[receivers] += budget * row[receivers] / row[receivers].sum()
                expected[b, h, q] = new.float()
                changed += 1
    return expected, changed


def test_var_redistribution_equals_the_rule(llava):
    model, inputs = llava
    adapter = get_adapter(model)
    image = adapter.image_mask(inputs["input_ids"])
    valid = inputs["attention_mask"].bool()
    hidden = prefill(model, inputs).hidden_states[0].float()  # residual stream entering layer 0
    torch.testing.assert_close(hidden, layer_input(model, inputs, 0))
    normed = (hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()[..., [0, 1]].amax(-1)
    # A threshold just below every row's largest image value: each row has an image sink.
    tau = float(min(normed[b][image[b]].max() for b in range(2))) - 1e-4
    sinks = [[j for j in range(image.shape[1]) if normed[b, j] > tau and valid[b, j]] for b in range(2)]
    columns = [image[b].nonzero().flatten().tolist() for b in range(2)]
    after_image = [max(c) + 1 for c in columns]

    method = VAR(model, inputs, p=0.6, rho=0.5, summ=0.2, tau=tau, sink_dims=[0, 1], layers=[0])
    before, after = Capture(0, "weights"), Capture(0, "weights")
    with intercept_attention(model, before), method, intercept_attention(model, after):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    # Prefill: only rows after the image are eligible.
    expected, changed = var_rule(before.seen[0], sinks, columns, 0.6, 0.5, 0.2, after_image)
    assert changed > 10
    torch.testing.assert_close(after.seen[0], expected, atol=1e-6, rtol=1e-5)
    row_sums = after.seen[0].sum(-1)[valid[:, None, :].expand(-1, after.seen[0].shape[1], -1)]
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=1e-5, rtol=0)
    # The generated token: the prefill sinks still apply, the new column is never one.
    expected, changed = var_rule(before.seen[1], sinks, columns, 0.6, 0.5, 0.2, [0, 0])
    assert changed > 0
    torch.testing.assert_close(after.seen[1], expected, atol=1e-6, rtol=1e-5)


def test_pai_boost_equals_the_rule(llava):
    model, inputs = llava
    image = get_adapter(model).image_mask(inputs["input_ids"])
    logits, after = around(model, inputs, PAI(model, inputs, alpha=0.5, layers=[1]), 1, "logits")
    boosted = logits.clone()
    last = boosted[:, :, -1, :]
    boosted[:, :, -1, :] = torch.where(image[:, None, :], last + 0.5 * last.abs(), last)
    torch.testing.assert_close(after, torch.softmax(boosted.float(), dim=-1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(after[:, :, -1], torch.softmax(logits.float(), -1)[:, :, -1])
    torch.testing.assert_close(after[:, :, :-1], torch.softmax(logits.float(), -1)[:, :, :-1])


def test_paint_token_choice_and_boost_equal_the_rule(llava):
    model, inputs = llava
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    first, second_last = attentions[0][:, :, 0, 1:].sum(1).numpy(), attentions[-2][:, :, 0, 1:].sum(1).numpy()
    expected_weights = []
    for local_scores, summary_scores in zip(first, second_last, strict=True):
        q1, q3 = np.percentile(summary_scores, [25, 75])
        summary = set(np.flatnonzero(summary_scores > q3 + 1.5 * (q3 - q1)).tolist())
        local = set(np.argsort(-local_scores)[: int(len(local_scores) * 0.25)].tolist()) - summary
        expected_weights.append(
            [0.7 if j in local else 0.3 if j in summary else 0.0 for j in range(len(local_scores))]
        )
    method = PAINT(model, inputs, layers=[2])
    for got, want in zip(method.token_weights, expected_weights, strict=True):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-7)
    logits, after = around(model, inputs, method, 2, "logits")
    image = get_adapter(model).image_mask(inputs["input_ids"])
    boost = torch.zeros(image.shape)
    for b in range(2):
        boost[b, image[b]] = torch.tensor(expected_weights[b])
    boosted = logits.clone()
    last = boosted[:, :, -1, :]
    boosted[:, :, -1, :] = last + boost[:, None, :] * last.abs()
    torch.testing.assert_close(after, torch.softmax(boosted.float(), dim=-1), atol=1e-6, rtol=1e-5)


def test_paint_head_modulation_scales_the_boost_per_head(llava):
    model, inputs = llava
    plain, modulated = (
        PAINT(model, inputs, layers=[2]),
        PAINT(model, inputs, layers=[2], head_modulation=True),
    )
    with modulated:
        factors = modulated.head_factors[:, 2]
    assert factors.shape == (2, get_adapter(model).num_heads)
    torch.testing.assert_close(factors.mean(-1), torch.ones(2))
    logits, plain_after = around(model, inputs, plain, 2, "logits")
    _, modulated_after = around(model, inputs, modulated, 2, "logits")
    image = get_adapter(model).image_mask(inputs["input_ids"])
    boost = torch.zeros(image.shape)
    for b in range(2):
        boost[b, image[b]] = plain.token_weights[b]
    boosted = logits.clone()
    last = boosted[:, :, -1, :]
    boosted[:, :, -1, :] = last + boost[:, None, :] * factors[:, :, None] * last.abs()
    torch.testing.assert_close(modulated_after, torch.softmax(boosted.float(), -1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(modulated_after, plain_after)


class ScaleHeads(AttentionHook):
    needs_weights = False

    def __init__(self, layer, scales):
        self.layers, self.scales = [layer], scales

    def edit_outputs(self, module, outputs, context):
        return outputs * context.per_prompt(self.scales)[:, None, :, None]


def last_head_outputs(model, inputs, layer, *hooks):
    capture = Capture(layer, "outputs")
    with intercept_attention(model, *hooks, capture):
        prefill(model, inputs)
    return capture.seen[0][:, -1].float()


def expected_vhr_scales(with_image, without_image, alpha):
    vhd = (with_image - without_image).norm(dim=-1).numpy()
    norm = without_image.norm(dim=-1).numpy()
    out = np.ones_like(vhd)
    for b in range(vhd.shape[0]):
        outlier = (vhd[b] > vhd[b].mean() + vhd[b].std()) & (norm[b] > norm[b].mean() + norm[b].std())
        score = np.where(outlier, 0.0, vhd[b])
        out[b] = np.where(score > np.median(score), alpha, 1.0)
    return torch.tensor(out)


def test_vhr_heads_chosen_layer_by_layer_from_separate_forwards(llava):
    model, inputs = llava
    adapter = get_adapter(model)
    text_only = adapter.without_image(inputs)
    method = VHR(model, inputs, alpha=2.0)
    assert method.layers == default_vhr_layers("llava", 4) == [0, 2, 3]
    method.prepare()
    scales0 = expected_vhr_scales(
        last_head_outputs(model, inputs, 0), last_head_outputs(model, text_only, 0), 2.0
    )
    torch.testing.assert_close(method.head_scales[:, 0], scales0)
    assert (scales0 == 2).any()
    # Layer 2 is chosen with layer 0 already reinforced (layer 1 is not a VHR layer).
    reinforced = ScaleHeads(0, scales0)
    scales2 = expected_vhr_scales(
        last_head_outputs(model, inputs, 2, reinforced),
        last_head_outputs(model, text_only, 2, reinforced),
        2.0,
    )
    torch.testing.assert_close(method.head_scales[:, 2], scales2)
    torch.testing.assert_close(method.head_scales[:, 1], torch.ones(2, adapter.num_heads))
    before, after = around(model, inputs, method, 2, "outputs", "outputs")
    torch.testing.assert_close(after, before * scales2[:, None, :, None])


def test_vhr_saved_head_scales_are_reused(llava, tmp_path):
    model, inputs = llava
    method = VHR(model, inputs)
    method.save(tmp_path / "vhr.pt")
    reused = VHR(model, inputs, head_scales=tmp_path / "vhr.pt")
    torch.testing.assert_close(reused.head_scales, method.head_scales)
    fresh = veridical.generate(model, inputs, methods=[VHR(model, inputs)], max_new_tokens=4, do_sample=False)
    again = veridical.generate(model, inputs, methods=[reused], max_new_tokens=4, do_sample=False)
    assert torch.equal(fresh, again)
    with pytest.raises(InputError, match="head_scales"):
        VHR(model, inputs, head_scales=torch.ones(3, 4, 4))


def test_act_calibration_equals_the_rule(llava):
    model, inputs = llava
    valid = inputs["attention_mask"].bool()
    heads, threshold, scale = [0, 2], 0.08, 0.4
    before, after = around(
        model, inputs, ACT(model, inputs, scale=scale, threshold=threshold, heads={1: heads}), 1, "weights"
    )
    expected = before.clone().double()
    sinks_found = 0
    for b in range(2):
        real = valid[b].nonzero().flatten().tolist()
        for h in heads:
            w = before[b, h].double()
            detected = []
            for j in real:
                rows = [i for i in real if i >= j]
                if w[rows, j].mean() > threshold:
                    detected.append(j)
            # The first detected column is dropped (GATECH-EIC/ACT llama_modelling_aug.py L28), not the
            # first real token (this test used to drop that one: the bug fixed in issue 13).
            sinks = detected[1:]
            sinks_found += len(sinks)
            others = [j for j in range(w.shape[1]) if j not in sinks]
            for i in real:
                row = w[i]
                freed = (1 - scale) * row[sinks].sum()
                new = row.clone()
                new[sinks] *= scale
                new[others] += freed * row[others] / row[others].sum()
                expected[b, h, i] = new
    assert sinks_found > 0
    real_rows = valid[:, None, :, None].expand_as(after)
    torch.testing.assert_close(after[real_rows], expected.float()[real_rows], atol=1e-6, rtol=1e-5)
    untouched = [h for h in range(before.shape[1]) if h not in heads]
    torch.testing.assert_close(after[:, untouched], before[:, untouched])


def test_act_sinks_stay_fixed_after_prefill(llava):
    """At a generated token the sink columns found on the prompt are calibrated for the new query."""
    model, inputs = llava
    method = ACT(model, inputs, threshold=0.08, heads={1: [0]})
    before, after = Capture(1, "weights"), Capture(1, "weights")
    with intercept_attention(model, before), method, intercept_attention(model, after):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    step_before, step_after = before.seen[1][:, 0, -1], after.seen[1][:, 0, -1]
    assert not torch.allclose(step_before, step_after)
    torch.testing.assert_close(step_after.sum(-1), torch.ones(2))


def test_act_head_calibration_keeps_exactly_the_heads_that_help(llava, tiny_models, tmp_path):
    model, inputs = llava
    from veridical.tiny import tiny_inputs

    single = tiny_inputs("llava", tiny_models("llava")[1], ["what is this ?"])
    samples = [(single, torch.tensor([5])), (single, torch.tensor([7, 9]))]
    chosen = calibrate_act_heads(model, samples, layers=[1, 2], threshold=0.08, progress=False)

    def score(heads, scale=0.4):
        total = 0.0
        for prompt, target in samples:
            full = {
                **prompt,
                "input_ids": torch.cat([prompt["input_ids"], target[None]], 1),
                "attention_mask": torch.ones(1, prompt["input_ids"].shape[1] + len(target), dtype=torch.long),
            }
            with ACT(model, full, scale=scale, threshold=0.08, heads=heads), torch.no_grad():
                logits = model(**full).logits[0, -len(target) - 1 : -1].float()
            total += float(torch.log_softmax(logits, -1)[torch.arange(len(target)), target].mean())
        return total / len(samples)

    for layer in (1, 2):
        # Each head against its layer unedited through the same kernel (scale 1), so no-op heads tie.
        baseline = score({layer: [0, 1, 2, 3]}, scale=1.0)
        for head in range(4):
            assert (head in chosen.get(layer, [])) == (score({layer: [head]}) > baseline)
    save_heads(chosen, tmp_path / "act.json", model="tiny llava")
    assert load_heads(tmp_path / "act.json") == {k: v for k, v in chosen.items() if v}
    assert ACT(model, inputs, heads=tmp_path / "act.json").heads == {k: v for k, v in chosen.items() if v}


# -- sink dimensions -----------------------------------------------------------------------------------


def test_layer_rules_scale_the_official_choices():
    from veridical.heads.base import layer_range

    assert layer_range(2, 32, 32) == list(range(2, 32))  # PAI, VAR
    assert layer_range(2, 31, 32) == list(range(2, 31))  # ACT
    assert layer_range(2, 32, 2) == [0, 1] and layer_range(2, 32, 40) == list(range(2, 40))
    assert default_vhr_layers("llava", 32) == [1, *range(18, 32)]
    assert default_vhr_layers("instructblip", 32) == list(range(14, 32))
    assert default_vhr_layers("qwen2_vl", 28) == [1, *range(16, 28)]


def test_var_paper_variant_skips_the_last_layer(llava):
    model, inputs = llava
    assert VAR(model, inputs, sink_dims=[0]).layers == [0, 1, 2, 3]
    assert VAR(model, inputs, sink_dims=[0], skip_last_layer=True).layers == [0, 1, 2]


def test_sink_dimensions_detected_from_massive_activations(tiny_models, questions):
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    model = copy.deepcopy(model)
    inputs = tiny_inputs("llava", processor, questions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert detect_sink_dims(model, inputs, layers=[1, 2, 3]) == ()
    assert "no massive-activation" in str(caught[0].message)
    clear_sink_dims(model)
    # Plant a massive activation: dimension 7 of the first token's embedding.
    first_token = int(inputs["input_ids"][0, -1])
    with torch.no_grad():
        model.get_input_embeddings().weight[first_token, 7] = 500.0
    # A normalised value is at most sqrt(64) = 8 here, so the ratio to the median (~2.5) stays small.
    assert detect_sink_dims(model, inputs, layers=[0, 1, 2, 3], min_ratio=2.5) == (7,)
    method = VAR(model, inputs, sink_ratio=2.5)  # no published dimensions for this model: auto, cached
    assert method.sink_dims == [7]


# -- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "var", "p": 1.5}, "p must be"),
        ({"name": "var", "sink_dims": "some"}, "sink_dims"),
        ({"name": "var", "sink_dims": [999]}, "outside"),
        ({"name": "pai", "alpha": -1}, "alpha"),
        ({"name": "pai", "gamma": 0.5}, "gamma"),
        ({"name": "pai", "boost_prefill": "yes"}, "boost_prefill"),
        ({"name": "pai", "layers": [9]}, "layers"),
        ({"name": "vhr", "alpha": -2}, "alpha"),
        ({"name": "act", "scale": 2}, "scale"),
        ({"name": "act", "heads": {9: [0]}}, "outside"),
        ({"name": "paint", "local_ratio": 0}, "local_ratio"),
        ({"name": "var", "colour": 1}, "unknown hyper-parameter"),
    ],
)
def test_bad_hyperparameters_are_named(llava, spec, message):
    model, inputs = llava
    with pytest.raises(MethodSpecError, match=message):
        veridical.generate(model, inputs, methods=[spec], max_new_tokens=1)


def test_act_head_file_errors_name_the_file(llava, tmp_path):
    model, inputs = llava
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        ACT(model, inputs, heads=path)


def test_methods_are_removed_after_an_error(llava):
    model, inputs = llava
    adapter = get_adapter(model)
    implementation = adapter.text_config._attn_implementation
    with pytest.raises(KeyboardInterrupt):
        with VAR(model, inputs, tau=1.0, sink_dims=[0]), PAI(model, inputs):
            raise KeyboardInterrupt
    assert adapter.text_config._attn_implementation == implementation
    assert not any(hasattr(m, "_veridical_hooks") for m in adapter.attention_modules)
    assert not adapter.text_model._forward_pre_hooks


def test_pai_text_only_contrast_is_vcd_against_the_image_free_prompt(llava, last_logits):
    model, inputs = llava
    method = PAI(model, inputs, alpha=0.0, gamma=1.1)
    _, logits = first_steps(model, inputs, [method], steps=1, field="scores")
    adapter = get_adapter(model)
    main = torch.log_softmax(last_logits(model, inputs), -1)
    text = torch.log_softmax(last_logits(model, adapter.without_image(inputs)), -1)
    expected = 1.1 * main - 0.1 * text
    expected = expected.masked_fill(main < main.amax(-1, keepdim=True) + np.log(0.1), float("-inf"))
    expected[:, model.generation_config.eos_token_id] = float("-inf")  # min_new_tokens bans it
    assert torch.equal(logits[:, 0].argmax(-1), expected.argmax(-1))
    got = torch.log_softmax(logits[:, 0], -1)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite], torch.log_softmax(expected, -1)[finite], atol=1e-4, rtol=1e-4)


ALL_METHODS = [
    "vcd",
    "m3id",
    "avisc",
    "vista",
    "pai",
    "paint",
    "vhr",
    "act",
    {"name": "var", "tau": 0.5, "sink_dims": [0]},
]


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m if isinstance(m, str) else m["name"])
def test_every_method_is_numerically_safe_in_bfloat16(tiny_models, questions, method):
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    low = copy.deepcopy(model).to(torch.bfloat16)
    inputs = tiny_inputs("llava", processor, questions)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    out = veridical.generate(
        low,
        inputs,
        methods=[method],
        max_new_tokens=3,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    scores = torch.stack(out.scores)
    assert not torch.isnan(scores).any() and torch.isfinite(scores).any(dim=-1).all()


def test_opera_is_numerically_safe_in_bfloat16(tiny_models, questions):
    """The look-ahead mask, attention rows and column scores stay finite in a half-precision model."""
    from veridical.decoders.opera import OPERA
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    low = copy.deepcopy(model).to(torch.bfloat16)
    inputs = tiny_inputs("llava", processor, questions)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    opera = OPERA(low, inputs, threshold=2, rollback_start=1)
    out = veridical.generate(low, inputs, methods=[opera], num_beams=3, max_new_tokens=12, do_sample=False)
    assert out.shape[0] == len(questions)
    for scores in opera.step_scores:
        stacked = torch.stack(scores)
        assert not torch.isnan(stacked).any() and torch.isfinite(stacked).any(dim=-1).all()


def test_methods_are_removed_when_generation_is_interrupted(llava):
    from transformers import LogitsProcessor

    class Interrupt(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise KeyboardInterrupt

    model, inputs = llava
    adapter = get_adapter(model)
    implementation = adapter.text_config._attn_implementation
    with pytest.raises(KeyboardInterrupt):
        veridical.generate(
            model, inputs, methods=["vhr", "vista", "pai"], logits_processor=[Interrupt()], max_new_tokens=2
        )
    assert adapter.text_config._attn_implementation == implementation
    assert not any(hasattr(m, "_veridical_hooks") for m in adapter.attention_modules)
    assert not adapter.text_model._forward_pre_hooks
    assert not any(layer.mlp._forward_hooks for layer in adapter.layers)


def test_two_models_with_different_methods_do_not_interfere(tiny_models, questions):
    from veridical.tiny import tiny_inputs

    llava, llava_processor = tiny_models("llava")
    qwen, qwen_processor = tiny_models("qwen2_vl")
    llava_inputs = tiny_inputs("llava", llava_processor, questions)
    qwen_inputs = tiny_inputs("qwen2_vl", qwen_processor, questions)
    settings = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)

    def logits(model, inputs, methods=()):
        return torch.stack(veridical.generate(model, inputs, methods=list(methods), **settings).logits)

    vanilla_llava = logits(llava, llava_inputs)
    alone_llava, alone_qwen = logits(llava, llava_inputs, ["pai"]), logits(qwen, qwen_inputs, ["vhr"])
    with PAI(llava, llava_inputs), VHR(qwen, qwen_inputs):
        both_qwen = torch.stack(qwen.generate(**qwen_inputs, **settings).logits)
        both_llava = torch.stack(llava.generate(**llava_inputs, **settings).logits)
    torch.testing.assert_close(both_llava, alone_llava, atol=0, rtol=0)
    torch.testing.assert_close(both_qwen, alone_qwen, atol=0, rtol=0)
    assert (alone_llava - vanilla_llava).abs().max() > 1e-4  # PAI acts on this model
    torch.testing.assert_close(logits(llava, llava_inputs), vanilla_llava, atol=0, rtol=0)  # and is gone


# -- what a method decides at prefill and every decoding step reads (issue 15) ----------------------


def _decode(model, inputs, methods, steps):
    out = veridical.generate(
        model,
        inputs,
        methods=methods,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("name", ["act", "var", "vista"])
def test_prefill_tensors_are_rebuilt_for_each_generate_call(tiny_models, questions, monkeypatch, name):
    """ACT's and VAR's sink columns and VISTA's steering vectors are built per call and held for its
    decoding steps. Calls with other images and the prompts in the other order (the same shapes, so a
    stale tensor would fit silently; each row's padding, so its columns, moves) must each decode what
    they decode with nothing held: ACT and VAR rebuilding their columns in every layer and step (as
    they did before they held them), VISTA steering with the public formula from this call's vectors
    at every layer and step."""
    import veridical.heads.act
    import veridical.heads.var
    from veridical.attention import prompt_rows
    from veridical.heads.vista import VISTA, steer
    from veridical.tiny import tiny_inputs

    def steer_from_vectors(method, source):
        def hook(module, args, output):
            return steer(output, prompt_rows(method.vectors[:, source], output.shape[0]), method.lam)

        return hook

    model, processor = tiny_models("llava")
    first = tiny_inputs("llava", processor, questions, seed=0)
    second = tiny_inputs("llava", processor, questions[::-1], seed=1)
    assert first["input_ids"].shape == second["input_ids"].shape
    spec = {"act": ACTIVE["act"], "var": var_spec(model, first), "vista": "vista"}[name]
    with monkeypatch.context() as patch:
        for module in (veridical.heads.act, veridical.heads.var):
            patch.setattr(module, "prefill_columns", lambda store, key, build, rows, keys: build(keys))
        patch.setattr(VISTA, "_steer_hook", steer_from_vectors)
        want = [_decode(model, inputs, [spec], 4) for inputs in (first, second)]
    got = [_decode(model, inputs, [spec], 4) for inputs in (first, second, first)]
    for (want_tokens, want_scores), (tokens, scores) in zip(want + want[:1], got, strict=True):
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(scores, want_scores, atol=0, rtol=0)
    # The two batches decode differently under the method, so reusing the first one's tensors shows.
    assert (want[0][1] - want[1][1]).nan_to_num(0.0, 0.0, 0.0).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["act", "var"])
def test_prefill_columns_grow_with_decoding(llava, monkeypatch, name):
    """The sink and image columns are held with spare columns for the keys decoding adds, and rebuilt
    when the steps outgrow them: rebuilding at every step (no spare column, what every step did
    before), every third step, or never must decode the same bits."""
    import veridical.heads.base as base

    model, inputs = llava
    spec = {"act": ACTIVE["act"], "var": var_spec(model, inputs)}[name]
    runs = []
    for spare in (0, 2, 64):
        monkeypatch.setattr(base, "SPARE_COLUMNS", spare)
        runs.append(_decode(model, inputs, [spec], 7))
    for tokens, scores in runs[1:]:
        assert torch.equal(tokens, runs[0][0])
        torch.testing.assert_close(scores, runs[0][1], atol=0, rtol=0)
    # The method acts (-inf - -inf, where min_new_tokens bans EOS on both sides, counts as no change).
    assert (runs[0][1] - _decode(model, inputs, [], 7)[1]).nan_to_num(0.0, 0.0, 0.0).abs().max() > 1e-3

"""M3ID and AvisC: first steps against hand formulas from plain forwards, neutral settings, every family."""

import copy
import math

import pytest
import torch

import veridical
from veridical import get_adapter
from veridical.decoders import M3ID, OPERA, AvisC
from veridical.decoders.opera import column_scores, keep_candidate, tree_mask
from veridical.errors import MethodSpecError
from veridical.heads import VISTA

GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)


def extended(inputs, tokens):
    """``inputs`` with ``tokens`` (one per row) appended, as the next plain forward sees them."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, None]], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, None])], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(tokens[:, None])], 1
        )
    return out


def m3id_by_hand(l_c, l_u, t, alpha, lam):
    gamma = math.exp(-lam * t)
    unsure = l_c.max(dim=-1, keepdim=True).values < math.log(alpha)
    return torch.where(unsure, l_c + (1 - gamma) / gamma * (l_c - l_u), l_c)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_m3id_two_steps_equal_the_formula(tiny_models, family, last_logits):
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models(family)
    inputs = tiny_inputs(family, processor, ["describe this image in detail please", "what is this ?"])
    alpha, lam = 0.9, 0.5  # random models are unsure everywhere: alpha 0.9 keeps the gate open
    out = veridical.generate(
        model, inputs, methods=[M3ID(model, inputs, alpha=alpha, lam=lam)], max_new_tokens=2, **GREEDY
    )
    text_only = get_adapter(model).without_image(inputs)
    first = out.sequences[:, inputs["input_ids"].shape[1]]
    steps = [(inputs, text_only), (extended(inputs, first), extended(text_only, first))]
    for t, (with_image, without_image) in enumerate(steps, start=1):
        l_c = torch.log_softmax(last_logits(model, with_image), -1)
        l_u = torch.log_softmax(last_logits(model, without_image), -1)
        expected = torch.log_softmax(m3id_by_hand(l_c, l_u, t, alpha, lam), -1)
        torch.testing.assert_close(out.scores[t - 1], expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(expected, l_c, atol=1e-3)


def test_m3id_gate_leaves_confident_rows_alone(model_and_inputs, last_logits):
    model, _, inputs = model_and_inputs
    out = veridical.generate(
        model, inputs, methods=[{"name": "m3id", "alpha": 1e-6}], max_new_tokens=1, **GREEDY
    )
    torch.testing.assert_close(
        out.scores[0], torch.log_softmax(last_logits(model, inputs), -1), atol=1e-4, rtol=1e-4
    )


def test_m3id_avisc_variant_has_no_gate_and_a_cutoff(llava, last_logits):
    model, inputs = llava
    out = veridical.generate(
        model, inputs, methods=[{"name": "m3id", "variant": "avisc", "beta": 0.9}], max_new_tokens=1, **GREEDY
    )
    l_c = torch.log_softmax(last_logits(model, inputs), -1)
    l_u = torch.log_softmax(last_logits(model, get_adapter(model).without_image(inputs)), -1)
    gamma = math.exp(-0.02)
    expected = l_c + (1 - gamma) / gamma * (l_c - l_u)
    expected[l_c < math.log(0.9) + l_c.max(-1, keepdim=True).values] = -math.inf
    assert torch.isinf(expected).any()
    assert torch.equal(torch.isinf(out.scores[0]), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(
        out.scores[0][finite], torch.log_softmax(expected, -1)[finite], atol=1e-4, rtol=1e-4
    )


@pytest.fixture
def llava(tiny_models, questions):
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    return model, tiny_inputs("llava", processor, questions)


def test_avisc_first_step_equals_the_rule_from_plain_forwards(llava, last_logits):
    model, inputs = llava
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = eager(**inputs, position_ids=positions, output_attentions=True, output_hidden_states=True)
    image = get_adapter(model).image_mask(inputs["input_ids"])
    embeddings = plain.hidden_states[0].clone()
    blind_counts = []
    for b in range(2):
        cols = image[b].nonzero().flatten()
        per_layer = torch.stack([a[b].mean(0)[-1, cols] for a in plain.attentions])  # (layers, image tokens)
        share = per_layer.sum(-1) / per_layer.sum()
        order = share.argsort(descending=True)
        running, chosen = 0.0, []
        for layer in order.tolist():  # layers until the running share reaches 0.5, the last one included
            chosen.append(layer)
            running += float(share[layer])
            if running >= 0.5:
                break
        tokens = per_layer[chosen].mean(0)
        blind = tokens >= tokens.mean() + tokens.std()
        blind_counts.append(int(blind.sum()))
        embeddings[b, cols[~blind]] = 0
    assert all(0 < n < int(image[0].sum()) for n in blind_counts)
    with torch.no_grad():
        blind_logits = model(inputs_embeds=embeddings, attention_mask=mask, position_ids=positions).logits[
            :, -1
        ]
    l_v = last_logits(model, inputs)
    expected = 2 * l_v - blind_logits.float()
    expected[l_v < math.log(0.1) + l_v.max(-1, keepdim=True).values] = -math.inf
    method = AvisC(model, inputs)
    out = veridical.generate(model, inputs, methods=[method], max_new_tokens=1, **GREEDY)
    assert method.blind.sum(-1).tolist() == blind_counts
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(out.scores[0]), finite)
    torch.testing.assert_close(
        out.scores[0][finite], torch.log_softmax(expected, -1)[finite], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "m3id", "lam": 0.0},
        {"name": "m3id", "alpha": 0.0},
        {"name": "avisc", "alpha": 0.0, "beta": 0.0},
    ],
)
def test_neutral_settings_reproduce_vanilla(model_and_inputs, spec):
    model, _, inputs = model_and_inputs
    vanilla = veridical.generate(model, inputs, max_new_tokens=3, **GREEDY)
    neutral = veridical.generate(model, inputs, methods=[spec], max_new_tokens=3, **GREEDY)
    assert torch.equal(neutral.sequences, vanilla.sequences)
    for got, want in zip(neutral.scores, vanilla.scores, strict=True):
        torch.testing.assert_close(got, torch.log_softmax(want, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["m3id", {"name": "m3id", "variant": "avisc"}, "avisc", "vista"])
def test_every_family_every_search_and_with_a_head_method(model_and_inputs, spec):
    model, _, inputs = model_and_inputs
    prompt = inputs["input_ids"].shape[1]
    for kwargs in (dict(do_sample=False), dict(do_sample=True, top_k=0), dict(num_beams=2, do_sample=False)):
        for heads in ([], ["pai"]):
            torch.manual_seed(0)
            out = veridical.generate(model, inputs, methods=[spec, *heads], max_new_tokens=3, **kwargs)
            assert out.shape == (2, prompt + 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "m3id", "alpha": 2}, "alpha"),
        ({"name": "m3id", "lam": -1}, "lam"),
        ({"name": "m3id", "variant": "x"}, "variant"),
        ({"name": "avisc", "gamma": 0}, "gamma"),
        ({"name": "avisc", "beta": 3}, "beta"),
        ({"name": "vista", "lam": -1}, "lam"),
        ({"name": "vista", "logits_layers": [4]}, "logits_layers"),
        ({"name": "vista", "layers": "3,3"}, "layers"),
        ({"name": "opera", "num_candidates": 0}, "num_candidates"),
        ({"name": "opera", "preset": "slow"}, "preset"),
        ({"name": "opera", "image_columns": "query"}, "image_columns"),
    ],
)
def test_bad_hyperparameters_are_named(llava, spec, message):
    model, inputs = llava
    with pytest.raises(MethodSpecError, match=message):
        veridical.generate(model, inputs, methods=[spec], max_new_tokens=1)


# -- VISTA ---------------------------------------------------------------------------------------------


def hidden_states(model, inputs):
    mask = inputs["attention_mask"]
    with torch.no_grad():
        return model(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)


def test_vista_steering_vectors_are_image_minus_no_image_layer_outputs(llava):
    """Raw layer outputs (the official hooks read every decoder layer, the last one before the final
    norm: steering_vector.py lines 80-88 at dc62252), plus the single-pair PCA's +1 at [0, 0].

    Until issue 13 this read transformers' hidden_states[1:], whose last entry is after the final norm.
    """
    model, inputs = llava
    method = VISTA(model, inputs)
    method.prepare()
    layers = get_adapter(model).layers

    def raw_outputs(batch):
        seen = {}
        handles = [
            layer.register_forward_hook(
                lambda m, a, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple) else o)
            )
            for i, layer in enumerate(layers)
        ]
        try:
            hidden_states(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack([seen[i][:, -1] for i in range(len(layers))], 1)

    text_only = get_adapter(model).without_image(inputs)
    expected = (raw_outputs(inputs) - raw_outputs(text_only)).float()
    expected[:, 0, 0] += 1
    torch.testing.assert_close(method.vectors, expected, atol=1e-5, rtol=1e-5)


def test_vista_steers_every_mlp_output_by_the_formula(llava):
    model, inputs = llava
    method = VISTA(model, inputs, lam=0.4, logits_alpha=0.0)
    method.prepare()  # the steering vectors' own forward stays out of the record
    mlp = get_adapter(model).layers[1].mlp
    seen = {}

    def record(key):
        def hook(module, args, output):
            seen[key] = output.detach().clone()

        return hook

    first = mlp.register_forward_hook(record("before"))
    try:
        with method:
            last = mlp.register_forward_hook(record("after"))
            try:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            finally:
                last.remove()
    finally:
        first.remove()
    x, v = seen["before"].double(), method.vectors[:, 1].double()[:, None, :]
    cos = (x * -v).sum(-1) / (x.norm(dim=-1) * v.norm(dim=-1))
    push = 0.4 * (1 + cos.clamp(min=0))[..., None] * v / v.norm(dim=-1, keepdim=True)
    direction = x / x.norm(dim=-1, keepdim=True) + push
    expected = direction / direction.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(seen["after"].double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen["after"], seen["before"], atol=1e-3)


def early_logits(model, inputs, window):
    states = hidden_states(model, inputs).hidden_states
    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        return torch.stack([lm_head(states[i][:, -1]) for i in window]).mean(0).float()


def test_vista_logits_augmentation_equals_the_formula(llava, last_logits):
    model, inputs = llava
    method = VISTA(model, inputs, lam=0.0)
    assert method.augmentation.window == [2]  # outputs 25..30 of 32 on 4 layers: hidden_states[3]
    out = veridical.generate(model, inputs, methods=[method], max_new_tokens=1, **GREEDY)
    final = torch.log_softmax(last_logits(model, inputs), -1)
    expected = torch.log_softmax(0.7 * final + 0.3 * early_logits(model, inputs, [3]), -1)
    torch.testing.assert_close(out.scores[0], expected, atol=1e-4, rtol=1e-4)


def test_vista_augmentation_reads_the_main_forward_not_a_contrast_branch(llava):
    model, inputs = llava
    vcd = {"name": "vcd", "contrast": "no_image"}
    alone = veridical.generate(model, inputs, methods=[vcd], max_new_tokens=1, **GREEDY).scores[0]
    stacked = veridical.generate(
        model, inputs, methods=[vcd, {"name": "vista", "lam": 0.0}], max_new_tokens=1, **GREEDY
    ).scores[0]
    expected = torch.log_softmax(0.7 * alone + 0.3 * early_logits(model, inputs, [3]), -1)
    finite = torch.isfinite(alone)
    torch.testing.assert_close(stacked[finite], expected[finite], atol=1e-4, rtol=1e-4)


def test_eval_uses_vistas_yes_no_strength_on_pope_unless_set():
    from veridical.evals.runner import benchmark_methods

    assert benchmark_methods("pope", ["vista", "vcd"]) == [{"name": "vista", "lam": 0.01}, "vcd"]
    assert benchmark_methods("pope", [{"name": "vista", "lam": 0.2}]) == [{"name": "vista", "lam": 0.2}]
    assert benchmark_methods("chair", ["vista"]) == ["vista"]


# -- OPERA -----------------------------------------------------------------------------------------------

BEAMS = dict(num_beams=3, max_new_tokens=6, do_sample=False)


def test_opera_without_penalty_or_rollback_is_plain_beam_search(model_and_inputs):
    model, _, inputs = model_and_inputs
    vocab = model.get_output_embeddings().weight.shape[0]
    neutral = OPERA(
        model, inputs, penalty_weight=0.0, num_candidates=vocab, threshold=10**6, image_reward_tokens=0
    )
    # generate()'s own processors (min_new_tokens, repetition penalty) apply inside the loop as well.
    settings = dict(BEAMS, min_new_tokens=6, repetition_penalty=1.3)
    ours = veridical.generate(model, inputs, methods=[neutral], **settings)
    assert torch.equal(ours, model.generate(**inputs, **settings))
    assert not neutral.rollbacks


@pytest.mark.filterwarnings("ignore:no massive-activation")
@pytest.mark.parametrize(
    "head", [{"name": "pai", "alpha": 50.0}, "act", {"name": "var", "sink_dims": [0, 1], "tau": 1.5}]
)
def test_opera_without_penalty_equals_beam_search_with_a_head_method(tiny_models, head):
    """The head method edits OPERA's look-ahead forwards (whose logits become the next step's) too."""
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    inputs = tiny_inputs("llava", processor, ["describe this image in detail please", "what is this ?"])
    vocab = model.get_output_embeddings().weight.shape[0]
    neutral = OPERA(
        model, inputs, penalty_weight=0.0, num_candidates=vocab, threshold=10**6, image_reward_tokens=0
    )
    settings = dict(BEAMS, min_new_tokens=6)
    ours = veridical.generate(model, inputs, methods=[neutral, head], **settings)
    beam = veridical.generate(
        model, inputs, methods=[head], output_scores=True, return_dict_in_generate=True, **settings
    )
    vanilla = model.generate(**inputs, output_scores=True, return_dict_in_generate=True, **settings)
    assert torch.equal(ours, beam.sequences)
    beams = BEAMS["num_beams"]
    for step in range(1, BEAMS["max_new_tokens"]):  # from the second token on: look-ahead logits
        for b in range(2):
            rows = slice(b * beams, (b + 1) * beams)
            torch.testing.assert_close(
                neutral.step_scores[b][step], beam.scores[step][rows], atol=1e-4, rtol=1e-4
            )
    assert not torch.allclose(beam.scores[1], vanilla.scores[1], atol=1e-3)


def test_opera_column_scores_are_products_down_each_column():
    local = torch.tril(torch.rand(2, 5, 5) * 3)
    got = column_scores(local)
    for b in range(2):
        for j in range(5):
            want = 1e-7 * math.prod(float(local[b, i, j]) for i in range(j, 5))
            assert math.isclose(float(got[b, j]), want, rel_tol=1e-5)


def test_opera_look_ahead_mask_shows_each_candidate_its_cache_and_itself():
    # Two sequences: one row padded by one column, two rows unpadded; three cached columns, two candidates.
    mask = tree_mask(pads=[1, 0], rows=[1, 2], length=3, width=2, dtype=torch.float32)
    assert mask.shape == (3, 1, 2, 5)
    visible = mask[:, 0] == 0
    first = [[False, True, True, True, False], [False, True, True, False, True]]
    other = [[True, True, True, True, False], [True, True, True, False, True]]
    assert visible.tolist() == [first, other, other]
    assert (mask[~(mask == 0)] == torch.finfo(torch.float32).min).all()


def test_opera_keeps_the_chosen_candidate_column_of_each_new_row():
    from transformers import DynamicCache

    cache = DynamicCache()
    keys = torch.arange(2 * 1 * 4 * 1, dtype=torch.float32).view(2, 1, 4, 1)  # 2 cached + 2 candidates
    cache.update(keys, -keys, 0)
    keep_candidate(cache, rows=torch.tensor([1, 1]), length=2, chosen=torch.tensor([1, 0]))
    got = cache.layers[0].keys[:, 0, :, 0]
    assert got.tolist() == [[4.0, 5.0, 7.0], [4.0, 5.0, 6.0]]
    assert torch.equal(cache.layers[0].values, -cache.layers[0].keys)
    assert keys[1, 0, :, 0].tolist() == [4.0, 5.0, 6.0, 7.0]  # the stacked source is not written over


def test_opera_first_step_rewards_image_attention_of_each_candidate(llava):
    model, inputs = llava
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    method = OPERA(model, inputs, num_candidates=3)
    veridical.generate(model, inputs, methods=[method], num_beams=2, max_new_tokens=2, do_sample=False)
    adapter = get_adapter(model)
    for b, sample in enumerate(adapter.split_inputs(inputs)):
        with torch.no_grad():
            logits = model(**sample).logits[0, -1].float()
        values, tokens = logits.topk(3)
        expected = torch.full_like(logits, -999.0)
        image = adapter.image_mask(sample["input_ids"])[0]
        for value, token in zip(values, tokens, strict=True):
            longer = extended(sample, token[None])
            with torch.no_grad():
                attention = eager(**longer, output_attentions=True).attentions[-1][0, :, -1].amax(0)
            attention = attention / attention.sum()
            expected[token] = value + attention[: len(image)][image].sum()  # penalty = -image attention
        got = method.step_scores[b][0]
        torch.testing.assert_close(got[0], torch.log_softmax(expected, -1), atol=1e-4, rtol=1e-4)


def test_opera_rollback_when_forced_restores_state_per_prompt(model_and_inputs):
    """threshold 0 and rollback_start 0 make retrospection fire; each prompt rolls back on its own."""
    model, _, inputs = model_and_inputs
    settings = dict(threshold=0, rollback_start=0, image_reward_tokens=0, max_rollbacks=2)
    method = OPERA(model, inputs, **settings)
    batch = veridical.generate(
        model, inputs, methods=[method], num_beams=3, max_new_tokens=8, do_sample=False
    )
    prompt = inputs["input_ids"].shape[1]
    adapter = get_adapter(model)
    for b, sample in enumerate(adapter.split_inputs(inputs)):
        alone = OPERA(model, sample, **settings)
        out = veridical.generate(
            model, sample, methods=[alone], num_beams=3, max_new_tokens=8, do_sample=False
        )
        generated = out[0, sample["input_ids"].shape[1] :]
        assert torch.equal(batch[b, prompt : prompt + len(generated)], generated)
        assert [r[1:] for r in method.rollbacks if r[0] == b] == [r[1:] for r in alone.rollbacks]
    if model.config.model_type != "llava_next":  # its long prompt gives no repeated argmax column here
        assert method.rollbacks
    for _, step, target, resumed in method.rollbacks:
        assert 0 <= resumed < step and resumed == min(target, step - 1)
    per_position: dict = {}
    for prompt_index, _, target, _ in method.rollbacks:
        per_position[(prompt_index, target)] = per_position.get((prompt_index, target), 0) + 1
    assert max(per_position.values(), default=0) <= 2


def test_opera_beam_steps_of_several_prompts_match_each_prompt_alone(llava):
    """Prompts at the same step take one batched beam-search step; prompts out of step (after a
    rollback) take theirs apart; both give what each prompt's step alone gives."""
    from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList

    from veridical.decoders.opera import _Advance, _advance, _BeamState

    model, _ = llava
    eos = torch.tensor([2])
    criteria = StoppingCriteriaList([MaxLengthCriteria(6)])
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)

    def step_scores():
        return torch.log_softmax(torch.randn(3, vocab, generator=generator) * 3, dim=-1)

    def copied(state):
        twin = copy.copy(state)
        for name in (*_BeamState.TENSORS, "hits"):
            setattr(twin, name, getattr(state, name).clone())
        return twin

    short, long = (
        _BeamState(model, model.generation_config, torch.ones(1, n, dtype=torch.long), 3, 6, eos)
        for n in (4, 9)
    )
    _advance({0: _Advance(short, step_scores(), criteria)})  # short is one token ahead
    for _ in range(3):  # out of step, then (after long catches up) in step
        scores = {0: step_scores(), 1: step_scores()}
        alone = {0: copied(short), 1: copied(long)}
        expected = {i: _advance({i: _Advance(alone[i], scores[i], criteria)})[i] for i in (0, 1)}
        if long.generated < short.generated:
            expected = {1: expected[1]}
            got = _advance({1: _Advance(long, scores[1], criteria)})
            alone[0] = short
        else:
            got = _advance({0: _Advance(short, scores[0], criteria), 1: _Advance(long, scores[1], criteria)})
        for i, (parents, tokens) in expected.items():
            assert torch.equal(got[i][0], parents) and torch.equal(got[i][1], tokens)
        for name in _BeamState.TENSORS:
            assert torch.equal(getattr(short, name), getattr(alone[0], name))
            assert torch.equal(getattr(long, name), getattr(alone[1], name))
    assert short.generated == long.generated == 3


@pytest.mark.filterwarnings("ignore:no massive-activation")
def test_opera_fast_preset_and_head_methods(llava):
    model, inputs = llava
    fast = OPERA(model, inputs, preset="fast")
    assert (fast.threshold, fast.num_candidates) == (25, 1)
    out = veridical.generate(model, inputs, methods=["opera", "vhr"], **BEAMS)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    with pytest.raises(MethodSpecError, match="own generation loop"):
        veridical.generate(model, inputs, methods=["opera", "opera"], **BEAMS)
    with pytest.raises(MethodSpecError, match="VCD"):
        veridical.generate(model, inputs, methods=["opera", "vcd"], **BEAMS)
    for head in ("paint", "var", "act", "pai", {"name": "vista", "logits_alpha": 0.0}):
        out = veridical.generate(model, inputs, methods=["opera", head], **BEAMS)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    with pytest.raises(MethodSpecError, match="logits_alpha=0"):
        veridical.generate(model, inputs, methods=["opera", "vista"], **BEAMS)
    with pytest.raises(MethodSpecError, match="do_sample"):
        veridical.generate(model, inputs, methods=["opera"], num_beams=2, do_sample=True)

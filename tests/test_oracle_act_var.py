"""Oracles for ACT and VAR: expected values from transformers' own eager attention and plain forwards.

Every expectation here is computed by transformers' LLaMA ``eager_attention_forward`` whose
probabilities are edited by the official rules, written out below index by index from the official
code, never through veridical:

- ACT: GATECH-EIC/ACT at a267af7, ``models/llama_modelling_aug.py`` ``atten_process_eval`` L16-39.
- VAR: seilk/VisAttnSink at 98e62d6, ``src/logic/logic.py`` (``DimProspector.run_logic`` L99-110,
  ``HeadFork.run_logic`` L115-145, ``VARProcessor.attn_redist`` L163-212), run from
  ``src/model/llava.py`` L139-148 (every attention call) and L313-316 (sinks at prefill only).

The reference runs each prompt alone and unpadded, as the official code does; the methods run both
prompts as one left-padded batch through ``generate()``, and every real position's hidden state at
prefill and every step's logits and hidden state must agree. Generated tokens (which the official
code never calibrates for ACT) follow the methods' documented rule: sinks found on the prompt, kept.

The model is a LLaVA whose LLaMA decoder is 512 wide, so VAR's default ``tau = 20`` can fire (an
RMS-normalised value is at most sqrt(512) = 22.6), with massive activations planted in its weights:
two image patches (by position) and the word "there" (negative, so the absolute value matters) carry
massive values in two residual dimensions, the padding token in a third; two heads attend to those
tokens (a query bias and a key weight on the slowest rotary pair), so ACT detects hidden sinks that
are not the first token, and in some heads does not detect the first token at all.
"""

from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama
from transformers import LlavaConfig, LlavaForConditionalGeneration

from veridical import get_adapter
from veridical.attention import ForwardContext, SequenceState
from veridical.heads import ACT, VAR, detect_sink_dims
from veridical.heads.sinks import clear_sink_dims, known_sink_dims
from veridical.tiny import random_images

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 5, 4, 2, 128
#: Residual dimensions carrying the planted massive values of image sinks, of "there", of padding.
D_IMAGE, D_TEXT, D_PAD = 100, 300, 400
#: Image patches (row-major, of 25) made sinks through their CLIP position embeddings.
SINK_PATCHES = (3, 17)
#: (layer, head, residual dims): heads that attend to the tokens massive in those dims.
ATTRACTING = ((3, 0, (D_IMAGE, D_TEXT)), (1, 2, (D_IMAGE,)))
TEXTS = (
    "USER: there <image> describe this image in detail please ASSISTANT:",  # "there" before the image
    "USER: <image> what is there ? ASSISTANT:",  # after it; this prompt is left-padded in the batch
)
STEPS = 3  # the prefill's token and two decoded ones
#: VAR runs in the official code's layers: ``range(num_hidden_layers)[2:]`` (logic.py L50-52).
VAR_LAYERS = list(range(2, LAYERS))
ATOL, RTOL = 2e-5, 1e-5  # the method and the reference differ by at most 2e-6 here


def build_world(processor) -> LlavaForConditionalGeneration:
    """A random LLaVA (CLIP 2 layers, LLaMA 5 x 512, 4 heads on 2 KV heads) with planted sinks."""
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=30,
            patch_size=6,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=HIDDEN,
            intermediate_size=512,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            attention_bias=True,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    unit, hidden_unit = 5, 7  # a CLIP dimension and a projector unit
    with torch.no_grad():
        # Image sinks: a large CLIP position embedding makes these patches open one projector unit,
        # which writes a massive value into D_IMAGE; every other patch leaves it shut (GELU of < -10).
        for patch in SINK_PATCHES:
            model.model.vision_tower.embeddings.position_embedding.weight[1 + patch, unit] = 20.0
        projector = model.model.multi_modal_projector
        projector.linear_1.weight[hidden_unit] = 0.0
        projector.linear_1.weight[hidden_unit, unit] = 10.0
        projector.linear_1.bias[hidden_unit] = -45.0
        projector.linear_2.weight[D_IMAGE] = 0.0
        projector.linear_2.weight[D_IMAGE, hidden_unit] = 10.0
        projector.linear_2.bias[D_IMAGE] = 0.0
        embeddings = model.get_input_embeddings().weight
        embeddings[tok.convert_tokens_to_ids("there"), D_TEXT] = -100.0
        embeddings[tok.pad_token_id, D_PAD] = 100.0
        # Attracting heads: a query bias and a key weight on the last dimension of each head, whose
        # rotary frequency is ~1e-4 rad per position, so the score barely depends on distance.
        layers = model.model.language_model.layers
        for layer, head, dims in ATTRACTING:
            attention = layers[layer].self_attn
            attention.q_proj.bias[head * HEAD_DIM + HEAD_DIM - 1] = 4.0
            kv_head = head // (HEADS // KV_HEADS)
            for dim in dims:
                sign = -1.0 if dim == D_TEXT else 1.0
                attention.k_proj.weight[kv_head * HEAD_DIM + HEAD_DIM - 1, dim] = 0.5 * sign
    return model


@pytest.fixture(scope="module")
def world(tiny_models):
    processor = tiny_models("llava")[1]
    model = build_world(processor)
    images = random_images(len(TEXTS))
    batch = processor(images=images, text=list(TEXTS), return_tensors="pt", padding=True)
    single = [
        processor(images=[image], text=[text], return_tensors="pt")
        for image, text in zip(images, TEXTS, strict=True)
    ]
    assert not batch["attention_mask"][1].all()  # the second prompt is padded
    vanilla = generated(model, batch, None)
    yield SimpleNamespace(model=model, batch=batch, single=single, vanilla=vanilla)
    clear_sink_dims(model)


# -- the reference: transformers' eager attention, edited by the official rules ---------------------------


@contextmanager
def official_attention(edit):
    """transformers' eager LLaMA attention, its probabilities passed through ``edit(layer, weights)``."""
    eager = modeling_llama.eager_attention_forward

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        _, weights = eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        weights = edit(module.layer_idx, weights)
        values = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        return torch.matmul(weights, values).transpose(1, 2).contiguous(), weights

    modeling_llama.eager_attention_forward = attention
    try:
        yield
    finally:
        modeling_llama.eager_attention_forward = eager


def official_act_detected(attention, threshold):
    """Columns of a square prefill map ``(tokens, tokens)`` that L27 of llama_modelling_aug.py detects."""
    tokens = attention.shape[0]
    # Each column's sum over the rows, over the number of rows that can see it (T - j).
    mean = attention.sum(dim=0) / torch.arange(tokens, 0, -1)
    return [j for j in range(tokens) if mean[j] > threshold]


def official_act_row_edit(attention, sinks, scale, prefill):
    """``atten_process_eval``'s edit of one head's map ``(queries, keys)`` (llama_modelling_aug.py L29-35)."""
    original = attention.clone()
    budget = (1 - scale) * original[:, sinks].sum(dim=1, keepdim=True)  # L30
    edited = original.clone()
    edited[:, sinks] = edited[:, sinks] * scale  # L31
    rest = original.clone()
    # L32 zeroes the sink columns of rows 1: of the square prefill map; a generated token's row
    # (veridical's extension) has its sink columns zeroed the same way.
    rest[1 if prefill else 0 :, sinks] = 0
    edited = edited + budget * rest / rest.sum(dim=1, keepdim=True)  # L33-34
    if prefill:
        edited[0, 0] = 1  # L35
    return edited


class OfficialACT:
    """ACT on one unpadded prompt as ``atten_process_eval`` computes it (llama_modelling_aug.py L16-39)."""

    def __init__(self, heads, scale=0.4, threshold=0.1):
        self.heads, self.scale, self.threshold = heads, scale, threshold
        self.detected, self.sinks = {}, {}

    def edit(self, layer, weights):
        if layer not in self.heads:
            return weights
        weights = weights.clone()
        for head in self.heads[layer]:
            attention = weights[0, head].float()  # L23: batch row 0, one head
            prefill = attention.shape[0] == attention.shape[1]
            if prefill:
                detected = official_act_detected(attention, self.threshold)
                self.detected[layer, head] = detected
                self.sinks[layer, head] = detected[1:]  # L28: the first detected column is dropped
            sinks = self.sinks[layer, head]
            weights[0, head] = official_act_row_edit(attention, sinks, self.scale, prefill)
        return weights


def official_sinks(hidden, dims, tau):
    """``DimProspector.run_logic`` (logic.py L99-110) on one prompt's residual stream ``(tokens, hidden)``."""
    hidden = hidden.float()
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)  # L99-102
    value = normed.abs()[:, list(dims)].amax(dim=-1)  # L106-108
    return [j for j in range(len(value)) if value[j] > tau]  # L109


def official_var_row_edit(row, vis, text, image, p):
    """``VARProcessor.attn_redist``'s edit of one selected (head, query) row (logic.py L186-211)."""
    start, end = image
    row = row.clone()
    original = row.clone()
    row[text] *= p  # L196
    row[vis] *= p  # L197
    budget = (1 - p) * (original[vis].sum() + original[text].sum())  # L200-201
    rest = original.clone()
    rest[vis] = 0  # L204
    row[start:end] += budget * rest[start:end] / rest[start:end].sum()  # L207, L210
    return row


class OfficialVAR:
    """VAR on one unpadded prompt as the official code computes it (logic.py, llava.py L139-148, L313-316)."""

    def __init__(self, image, dims, p=0.6, rho=0.5, summ=0.2, tau=20.0, layers=VAR_LAYERS):
        self.image, self.dims, self.layers = image, list(dims), layers
        self.p, self.rho, self.summ, self.tau = p, rho, summ, tau
        self.sinks, self.log = {}, []
        self.prefill = True

    def observe(self, layer, hidden):
        """Sinks of ``layer`` from the residual stream entering it, at prefill only (llava.py L314)."""
        if self.prefill and layer in self.layers:
            self.sinks[layer] = official_sinks(hidden[0], self.dims, self.tau)

    def edit(self, layer, weights):
        if layer not in self.layers:
            return weights
        start, length = self.image
        end = start + length
        sinks = self.sinks[layer]
        vis = [j for j in sinks if start <= j < end]  # L123, L189
        text = [j for j in sinks if j not in vis]  # L190
        if not vis:  # L125, L140-141: no image sink, no head is forked
            return weights
        weights = weights.clone()
        prefill = weights.shape[2] == weights.shape[3]
        image = weights[0, :, :, start:end].float()
        portion = image[..., [j - start for j in vis]].sum(-1) / (image + 1e-6).sum(-1)  # L129
        summation = image.sum(-1)  # L130
        small_share, enough_mass = portion <= self.rho, summation >= self.summ  # L133-136
        for head, query in torch.ones_like(portion, dtype=torch.bool).nonzero().tolist():
            eligible = not prefill or query >= end  # L179: at prefill only rows after the image
            chosen = bool(small_share[head, query] and enough_mass[head, query])  # L138
            self.log.append(
                (prefill, eligible, bool(small_share[head, query]), bool(enough_mass[head, query]))
            )
            if chosen and eligible:
                row = weights[0, head, query].float()
                weights[0, head, query] = official_var_row_edit(row, vis, text, (start, end), self.p)
        return weights


def reference(model, inputs, tokens, official):
    """Prefill and one forward per token of ``tokens``, every layer's attention edited by ``official``.

    Returns per step (prefill first) the hidden states of every layer and the last position's logits.
    """
    layers = model.model.language_model.layers

    def recorder(index):
        def hook(module, args, kwargs):
            if hasattr(official, "observe"):
                official.observe(index, args[0] if args else kwargs["hidden_states"])

        return hook

    handles = [
        layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    steps = []
    try:
        with official_attention(official.edit), torch.no_grad():
            out = model(**inputs, output_hidden_states=True, use_cache=True)
            steps.append((out.hidden_states, out.logits[0, -1]))
            official.prefill = False
            for token in tokens:
                out = model(
                    input_ids=token.view(1, 1), cache=out.cache, output_hidden_states=True, use_cache=True
                )
                steps.append((out.hidden_states, out.logits[0, -1]))
    finally:
        for handle in handles:
            handle.remove()
    return steps


def generated(model, batch, method):
    """``STEPS`` greedy tokens of the left-padded batch with ``method`` attached (``None``: vanilla)."""
    with method if method is not None else nullcontext(), torch.no_grad():
        return model.generate(
            **batch,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            output_hidden_states=True,
        )


def image_span(inputs, model) -> tuple[int, int]:
    ids = inputs["input_ids"][0]
    positions = (ids == model.config.image_token_id).nonzero().flatten()
    return int(positions[0]), len(positions)


def assert_matches_reference(world, out, refs):
    """Every real position's hidden states at prefill, and every step's logits and hidden states."""
    mask = world.batch["attention_mask"].bool()
    for b, ref in enumerate(refs):
        for layer, want in enumerate(ref[0][0]):
            got = out.hidden_states[0][layer][b][mask[b]]
            torch.testing.assert_close(
                got,
                want[0],
                atol=ATOL,
                rtol=RTOL,
                msg=lambda m, b=b, layer=layer: f"prompt {b} layer {layer}: {m}",
            )
        for step in range(STEPS):
            torch.testing.assert_close(
                out.logits[step][b],
                ref[step][1],
                atol=ATOL,
                rtol=RTOL,
                msg=lambda m, b=b, s=step: f"{b} {s}: {m}",
            )
            if step:
                for layer, want in enumerate(ref[step][0]):
                    torch.testing.assert_close(
                        out.hidden_states[step][layer][b, -1], want[0, -1], atol=ATOL, rtol=RTOL
                    )


def assert_changes_outputs(world, out):
    """The method moves every checked quantity far more than the tolerance (so the checks can fail)."""
    mask = world.batch["attention_mask"].bool()
    vanilla = world.vanilla
    last_hidden = [(out.hidden_states[0][-1][b] - vanilla.hidden_states[0][-1][b])[mask[b]] for b in range(2)]
    assert min(float(d.abs().max()) for d in last_hidden) > 100 * ATOL
    for step in range(STEPS):
        assert float((out.logits[step] - vanilla.logits[step]).abs().amax(-1).min()) > 100 * ATOL


def new_tokens(out, b):
    """The tokens the method generated for prompt ``b`` (the reference decodes the same ones)."""
    return out.sequences[b, -STEPS:][: STEPS - 1]


# -- ACT -------------------------------------------------------------------------------------------------

#: Layer 1 with every head (the method's all-heads path), layer 3 with three of four; layers 0, 2 and 4
#: and head 3 of layer 3 must stay as they are (the reference leaves them alone).
ACT_HEADS = {1: [0, 1, 2, 3], 3: [0, 1, 2]}


@pytest.mark.parametrize(("scale", "threshold"), [(0.4, 0.1), (0.75, 0.06)])
def test_act_equals_the_official_calibration_at_prefill_and_every_step(world, scale, threshold):
    model = world.model
    out = generated(
        model, world.batch, ACT(model, world.batch, scale=scale, threshold=threshold, heads=ACT_HEADS)
    )
    refs, officials = [], []
    for b, inputs in enumerate(world.single):
        official = OfficialACT(ACT_HEADS, scale, threshold)
        refs.append(reference(model, inputs, new_tokens(out, b), official))
        officials.append(official)
    # Every rule fired: heads whose first detected column is the first token (dropped), heads whose
    # first detected column is a hidden sink (dropped, the start token not being a sink there), and
    # columns calibrated in both kinds of head.
    detected = [d for official in officials for d in official.detected.values()]
    assert any(d and d[0] == 0 and len(d) > 1 for d in detected)
    assert any(d and d[0] != 0 and len(d) > 1 for d in detected)
    assert_matches_reference(world, out, refs)
    assert_changes_outputs(world, out)


# -- VAR -------------------------------------------------------------------------------------------------


def var_run(world, official_kwargs, **method_kwargs):
    model = world.model
    method = VAR(model, world.batch, layers=VAR_LAYERS, **method_kwargs)
    out = generated(model, world.batch, method)
    refs, officials = [], []
    for b, inputs in enumerate(world.single):
        official = OfficialVAR(image_span(inputs, model), **official_kwargs)
        refs.append(reference(model, inputs, new_tokens(out, b), official))
        officials.append(official)
    return method, out, refs, officials


def test_var_equals_the_official_redistribution_with_its_defaults(world):
    """Default hyper-parameters (tau = 20 included), sink dimensions found by the automatic detection."""
    method, out, refs, officials = var_run(world, {"dims": (D_IMAGE, D_TEXT)})
    assert sorted(method.sink_dims) == [D_IMAGE, D_TEXT]
    for official, text in zip(officials, TEXTS, strict=True):
        image_start, image_len = official.image
        there = text.split().index("there") + (
            image_len - 1 if text.index("there") > text.index("<image>") else 0
        )
        for layer in VAR_LAYERS:
            assert official.sinks[layer] == sorted([image_start + p for p in SINK_PATCHES] + [there])
        # Rows edited at prefill and at a decode step, rows rejected, rows before the image that would
        # have been edited after it.
        assert (True, True, True, True) in official.log and (False, True, True, True) in official.log
        assert (True, False, True, True) in official.log
        assert any(entry[1] and not (entry[2] and entry[3]) for entry in official.log)
    assert_matches_reference(world, out, refs)
    assert_changes_outputs(world, out)


def test_var_equals_the_official_redistribution_with_other_settings(world):
    """Other p, rho, summ and tau, with rho and summ where each alone rejects rows the other accepts."""
    rho, summ = (
        0.085,
        0.8,
    )  # between the values this model's rows take (sink share 0.04-0.12, image mass 0.6-1)
    method, out, refs, officials = var_run(
        world,
        {"dims": (D_TEXT, D_IMAGE), "p": 0.25, "rho": rho, "summ": summ, "tau": 12.0},
        p=0.25,
        rho=rho,
        summ=summ,
        tau=12.0,
        sink_dims=[D_TEXT, D_IMAGE],
    )
    # Among the rows eligible for an edit, each condition alone rejects some that the other accepts.
    eligible = {entry[2:] for official in officials for entry in official.log if entry[1]}
    assert {(True, True), (True, False), (False, True)} <= eligible
    assert_matches_reference(world, out, refs)
    assert_changes_outputs(world, out)


def test_act_calibration_never_keeps_a_head_it_does_not_change(world):
    """A head left without sinks once its first detected column is dropped ties with its layer's
    unedited score and must not be kept (the search keeps heads that improve the score)."""
    from veridical.heads import calibrate_act_heads

    model, prompt = world.model, world.single[0]
    target = torch.tensor([5])
    chosen = calibrate_act_heads(model, [(prompt, target)], layers=[1, 3], progress=False)
    full = {
        **prompt,
        "input_ids": torch.cat([prompt["input_ids"], target[None]], 1),
        "attention_mask": torch.ones(1, prompt["input_ids"].shape[1] + 1, dtype=torch.long),
    }
    with torch.no_grad():
        attentions = model(**full, output_attentions=True).attentions  # transformers' eager maps
    idle = [
        (layer, head)
        for layer in (1, 3)
        for head in range(HEADS)
        if not official_act_detected(attentions[layer][0, head].float(), 0.1)[1:]
    ]
    assert idle
    assert not [(layer, head) for layer, head in idle if head in chosen.get(layer, [])]


# -- exact boundaries, on hand-made attention maps ----------------------------------------------------------
#
# Dyadic weights make every sum exact, so each rule's comparison can be met with equality.


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """A tiny LLaVA to build the methods on (the maps below are handed to them directly)."""
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    return SimpleNamespace(model=model, batch=tiny_inputs("llava", processor, ["what is this ?"]))


def prefill_context(image_mask):
    return ForwardContext(
        sequence=SequenceState(image_mask=image_mask), past=0, rows=image_mask.shape[0], valid_keys=None
    )


def test_act_boundaries_on_an_exact_map(tiny):
    """``> threshold`` is strict, the first detected column is dropped even when it is not the start
    token, and a row whose whole mass sits on sinks is left alone (the official code's NaN)."""
    method = ACT(tiny.model, tiny.batch, scale=0.25, threshold=0.25, heads={2: [0, 1]})
    module = SimpleNamespace(layer_idx=2)
    head0 = [[1, 0, 0, 0], [0, 1, 0, 0], [1 / 4, 1 / 2, 1 / 4, 0], [1 / 4, 1 / 4, 1 / 4, 1 / 4]]
    head1 = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1 / 2, 1 / 2, 0], [0, 1 / 4, 1 / 4, 1 / 2]]
    weights = torch.tensor([[head0, head1, head0, head1]])
    # Column means: head 0: 3/8, 7/12, 1/4, 1/4 (the last two exactly at the threshold: not sinks);
    # head 1: 1/4 (the start token: not a sink), 7/12, 3/8, 1/2 (column 1 is the first detected).
    assert official_act_detected(weights[0, 0], 0.25) == [0, 1]
    assert official_act_detected(weights[0, 1], 0.25) == [1, 2, 3]
    sinks = {0: [1], 1: [2, 3]}
    context = prefill_context(torch.zeros(1, 4, dtype=torch.bool))
    got = method.edit_weights(module, weights.clone(), context)
    expected = weights.clone()
    for head in (0, 1):
        expected[0, head] = official_act_row_edit(weights[0, head], sinks[head], 0.25, prefill=True)
    assert expected[0, 0, 1].isnan().all()  # L33 divides by zero: all of row 1's mass is on the sink
    expected[0, 0, 1] = weights[0, 0, 1]  # veridical leaves such a row alone (documented)
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)
    # A generated token: the prefill's sinks, the new column (4) never one.
    step = torch.tensor([[[[1 / 8, 1 / 2, 1 / 8, 1 / 8, 1 / 8]], [[1 / 8, 1 / 8, 1 / 4, 1 / 4, 1 / 4]]] * 2])
    decode = ForwardContext(sequence=context.sequence, past=4, rows=1, valid_keys=None)
    got = method.edit_weights(module, step.clone(), decode)
    expected = step.clone()
    for head in (0, 1):
        expected[0, head] = official_act_row_edit(step[0, head], sinks[head], 0.25, prefill=False)
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)


#: Eight tokens: text, four image tokens (1-4), three text tokens. Rows of the batch: 0 has an image
#: sink (2) and text sinks (0, and 7 at ``tau`` = 6.97); 1 only a text sink (6); 2 every image token.
IMAGE = torch.tensor([[False, True, True, True, True, False, False, False]] * 3)
SINKS = [[0, 2, 7], [6], [1, 2, 3, 4]]


def hidden_with_sinks():
    """``(3, 8, 64)`` residual streams: ones, with massive values (negative in dimension 1) on the sinks.

    Tokens 3 and 7 of row 0 are small (1e-3, so the 1e-6 in the RMS weighs ~10% of the mean square)
    with -20e-3 and -21e-3 in dimension 1: normalised 6.97 and 7.05, their values with a smaller
    epsilon (7.38 / 7.44 at 1e-7) above both, with a larger one (4.8 / 5.0 at 1e-5) below both.
    """
    hidden = torch.ones(3, 8, 64)
    hidden[0, 0, 1] = -50.0  # normalised 7.9
    hidden[0, 2, 0] = 50.0
    hidden[0, 3] = 1e-3
    hidden[0, 3, 1] = -20e-3
    hidden[0, 7] = 1e-3
    hidden[0, 7, 1] = -21e-3
    hidden[1, 6, 0] = 50.0
    hidden[2, 1:5, 0] = 50.0
    return hidden


def official_value(token, dim):
    """A token's RMS-normalised value (logic.py L99-102: float32, mean square plus 1e-6, no weight)."""
    return float((token * torch.rsqrt(token.pow(2).mean(-1, keepdim=True) + 1e-6))[dim].abs())


def uniform_map(queries=8):
    return torch.full((3, HEADS, queries, 8), 1 / 8)


def expected_var(weights, selected, p, sinks=SINKS):
    """The official edit (logic.py L186-211) on the (row, head, query) triples listed as selected."""
    expected = weights.clone()
    for b, head, query in selected:
        vis = [j for j in sinks[b] if IMAGE[b, j]]
        text = [j for j in sinks[b] if not IMAGE[b, j]]
        expected[b, head, query] = official_var_row_edit(
            weights[b, head, query].double(), vis, text, (1, 5), p
        )
    return expected


def var_on_map(tiny, hidden, weights, **kwargs):
    method = VAR(tiny.model, tiny.batch, layers=[2], sink_dims=[0, 1], **kwargs)
    context = prefill_context(IMAGE)
    method.observe_layer_input(2, hidden, context)
    return method.edit_weights(SimpleNamespace(layer_idx=2), weights.clone(), context)


def test_var_boundaries_on_an_exact_map(tiny):
    """``> tau`` strict, ``<= rho`` and ``>= summ`` inclusive, rows from the first after the image,
    and only rows whose prompt has an image sink."""
    # tau: token 3's normalised value itself, computed by the official formula (L99-102); token 3 is
    # then no sink, token 7 (7.05) one.
    hidden = hidden_with_sinks()
    tau = official_value(hidden[0, 3], 1)
    assert [official_sinks(hidden[b], [0, 1], tau) for b in range(3)] == SINKS
    # rho: the sink share of head 1, query 5 below (1/4 over 5/8), computed as the sum over the image
    # plus 1e-6 per image token (L129); inputs and sums are exact, so this is the float32 result.
    share = torch.tensor(0.25) / (torch.tensor(0.625) + torch.tensor(1e-6) * 4)
    rho, summ, p = float(share), 0.25, 0.25
    weights = uniform_map()
    weights[:, 0, 5] = torch.tensor([1 / 2, 1 / 16, 1 / 16, 1 / 16, 1 / 16, 1 / 8, 1 / 8, 0])  # mass = summ
    weights[:, 0, 6] = torch.tensor([1 / 2, 1 / 32, 1 / 32, 1 / 32, 1 / 32, 1 / 4, 1 / 8, 0])  # mass < summ
    weights[:, 1, 5] = torch.tensor([1 / 4, 1 / 8, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 0, 0])  # share = rho
    weights[:, 1, 6] = torch.tensor([1 / 4, 1 / 16, 1 / 2, 1 / 16, 1 / 16, 1 / 16, 0, 0])  # share > rho
    weights[:, 3, 7] = torch.tensor([1 / 8, 1 / 8, 1 / 8, 1 / 2, 1 / 8, 0, 0, 0])  # token 3: a receiver
    got = var_on_map(tiny, hidden, weights, p=p, rho=rho, summ=summ, tau=tau)
    # Row 0 only (row 1 has no image sink, row 2's shares are all ~1), queries 5-7 only (the image
    # ends at 5); uniform rows have mass 1/2 and share ~1/4: selected.
    rejected = {(0, 0, 6), (0, 1, 6)}
    selected = [(0, h, q) for h in range(HEADS) for q in (5, 6, 7) if (0, h, q) not in rejected]
    torch.testing.assert_close(got, expected_var(weights, selected, p).float(), atol=1e-7, rtol=0)


def test_var_share_epsilon_and_rows_with_nothing_to_receive(tiny):
    """The 1e-6 per image token in the share's denominator (L129) decides rows with tiny image mass; a
    selected row whose image tokens are all sinks is left alone (the official code's NaN)."""
    p, rho = 0.25, 0.4
    weights = uniform_map()
    # Image mass 2^-17 with half of it on the sink: share 0.33 with 1e-6 per token (selected); 0.44
    # with 1e-6 in all, 0.48 with 1e-7 per token, 1/2 without: rejected.
    weights[:, 0, 5] = torch.tensor([1 / 2, 2**-19, 2**-18, 2**-20, 2**-20, 1 / 2 - 2**-17, 0, 0])
    # Image mass 2^-14: share 0.47 with 1e-6 per token (rejected); 0.30 with 1e-5 per token.
    weights[:, 1, 5] = torch.tensor([1 / 2, 2**-16, 2**-15, 2**-17, 2**-17, 1 / 2 - 2**-14, 0, 0])
    # Row 2, all image tokens sinks, image mass 2^-20: share 0.19, selected, nothing to receive.
    weights[2, 0, 5] = torch.tensor([1 / 2, 2**-22, 2**-22, 2**-22, 2**-22, 1 / 2 - 2**-20, 0, 0])
    got = var_on_map(tiny, hidden_with_sinks(), weights, p=p, rho=rho, summ=0.0, tau=7.5)
    sinks = [[0, 2], [6], [1, 2, 3, 4]]  # tokens 3 and 7 of row 0 (6.97 and 7.05) are below 7.5
    assert [official_sinks(hidden_with_sinks()[b], [0, 1], 7.5) for b in range(3)] == sinks
    selected = [(0, h, q) for h in range(HEADS) for q in (5, 6, 7) if (h, q) != (1, 5)]
    expected = expected_var(weights, selected + [(2, 0, 5)], p, sinks)
    assert expected[2, 0, 5].isnan().any()  # L207 divides by zero
    expected[2, 0, 5] = weights[2, 0, 5]  # veridical leaves such a row alone (documented)
    torch.testing.assert_close(got, expected.float(), atol=1e-12, rtol=1e-6)


# -- published sink dimensions -----------------------------------------------------------------------------


def meta_model(config_class, model_class, text_config):
    with torch.device("meta"):
        return model_class(config_class(text_config=text_config))


def test_published_sink_dims_tell_llama_3_from_llama_2():
    """LLaMA-3-8B (llama3-llava-next-8b) is as wide and deep as LLaMA-2-7B but has none of its sink
    dimensions: it must be detected, not given LLaMA-2's. Configs as the llava-hf releases ship them."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    llava_7b = {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096}
    llava_13b = {**llava_7b, "hidden_size": 5120, "intermediate_size": 13824}
    llava_13b.update(num_attention_heads=40, num_hidden_layers=40)
    llama3 = {
        "model_type": "llama",
        "vocab_size": 128320,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
    }
    llama3.update(max_position_embeddings=8192)
    mistral = {
        "model_type": "mistral",
        "vocab_size": 32064,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
    }
    cases = [
        (LlavaConfig, LlavaForConditionalGeneration, llava_7b, (2533, 1415)),  # VisAttnSink constants.py L9
        (LlavaNextConfig, LlavaNextForConditionalGeneration, llava_7b, (2533, 1415)),
        (LlavaConfig, LlavaForConditionalGeneration, llava_13b, (2100, 4743)),  # constants.py L10
        (LlavaNextConfig, LlavaNextForConditionalGeneration, llama3, None),
        (LlavaNextConfig, LlavaNextForConditionalGeneration, mistral, None),
    ]
    for config_class, model_class, text, dims in cases:
        assert known_sink_dims(get_adapter(meta_model(config_class, model_class, text))) == dims, text


def test_automatic_sink_dims_ignore_padding(world):
    """The padding token is massive in D_PAD, but padding is no token of the prompt."""
    model = world.model
    clear_sink_dims(model)
    try:
        assert set(detect_sink_dims(model, world.batch, VAR_LAYERS, num_dims=3)) == {D_IMAGE, D_TEXT}
    finally:
        clear_sink_dims(model)

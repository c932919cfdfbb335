"""PAI, PAINT and VHR against oracles built from transformers' own eager computations.

Nothing here computes an expectation through veridical: layer inputs and outputs come from
``generate(output_hidden_states=True)`` of the model the method ran on, a decoder layer is re-run by
hand from transformers' own modules (norms, projections, rotary embedding, MLP) with the method's
edit written out from the official code, vision-tower attention comes from ``output_attentions`` of
the eager tower, per-head outputs from plain torch hooks on ``o_proj``. The models are deep enough
for the official layer indices to apply literally (32 decoder layers), and every rule is triggered
(asserted below): PAINT finds summary tokens and a local candidate that is also a summary token;
VHR meets an outlier head, one that is an outlier for the population std only, and one that is
above mean + std in one measure only. Every check covers the prefill and two decoding steps.

Official code: LALBJ/PAI at 9bbd8bd, hasanar1f/PAINT at 2a9e8f8; VHR: the paper (He et al., ACL
2025, arXiv 2412.13949), whose code (github.com/jinghan1he/VHR) could not be read here.
"""

import copy

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import veridical
from veridical.errors import MethodSpecError
from veridical.heads import PAI, PAINT, VHR
from veridical.heads.paint import iqr_outliers
from veridical.tiny import LLAVA_CHAT_TEMPLATE, tiny_inputs, word_tokenizer

QUESTIONS = ["describe this image in detail please", "what is this ?"]
DEPTH = 32
NEW_TOKENS = 3
#: PAI: ``--start-layer 2 --end-layer 32`` (LALBJ/PAI pope_eval.py / chair_eval.py lines 54-55),
#: ``llama_modify`` patches ``range(start_layer, end_layer)`` (attention.py line 122).
PAI_LAYERS = range(2, 32)
#: VHR on LLaVA-1.5-7B: layer 1 and the last 14 layers (paper, implementation details).
VHR_LAYERS = [1, *range(18, 32)]


def build_llava(
    seed: int,
    heads: int,
    kv_heads: int,
    head_dim: int = 8,
    vision: str = "clip_vision_model",
    strategy: str = "default",
    depth: int = DEPTH,
):
    """A LLaVA-1.5 of ``depth`` LLaMA layers over a 4-layer vision tower, 42 px images, 6 px patches
    (49 patches: 25% of them is not a whole number), eager attention throughout, random weights."""
    tok = word_tokenizer(["<image>"], image_token="<image>")
    config = LlavaConfig(
        vision_config=dict(
            model_type=vision,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=42,
            patch_size=6,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=heads * head_dim,
            intermediate_size=64,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        # Random initialisation leaves attention scores near 0 (a trained model's are of order 1),
        # where ``a + alpha |a|`` barely moves anything: scale queries and keys up.
        for block in model.model.language_model.layers:
            block.self_attn.q_proj.weight *= 10.0
            block.self_attn.k_proj.weight *= 10.0
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}
        ),
        tokenizer=tok,
        chat_template=LLAVA_CHAT_TEMPLATE,
        patch_size=6,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=0 if vision.startswith("siglip") else 1,
    )
    return model, tiny_inputs("llava", processor, QUESTIONS)


@pytest.fixture(scope="module")
def pai_model():
    """Grouped-query heads (4 query heads on 2 key/value heads). Seed 8 gives both images summary
    tokens in vision layer -2 and a summary token among image 0's top 25% in vision layer 0."""
    return build_llava(seed=8, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def pai_model_full(pai_model):
    """The same weights with ``vision_feature_select_strategy="full"``: the CLS token is an image token."""
    model, _ = pai_model
    full = copy.deepcopy(model)
    full.config.vision_feature_select_strategy = "full"
    _, inputs = build_llava(seed=8, heads=4, kv_heads=2, strategy="full", depth=1)
    return full, inputs


# -- the oracle: one decoder layer re-run by hand ---------------------------------------------------


def rerun_layer(model, layer: int, x, position_ids, valid, boost=None, scale=None):
    """Decoder layer ``layer`` of transformers' LLaMA on inputs ``x`` ``(B, T, hidden)``, from its own
    modules, with eager attention written out (causal + padding mask, float32 softmax).

    ``boost`` ``(B, heads, T, T)``: PAI's edit ``a + w |a|`` of the pre-softmax scores after the mask
    (LALBJ/PAI attention.py lines 90-94; hasanar1f/PAINT modPAI/attention.py lines 139-147), zero
    outside the rows the official code edits. Each query row is computed from its own scores only, so
    the prefill's and every decoding step's rows are checked in one pass over the whole sequence.

    ``scale`` ``(B, 1, T, T)``: VAF's product of the raw scores before the mask is added
    (ustc-hyin/ClearSight visaug/inference/AttnAdapter.py lines 68-78, mask at lines 87-92).
    """
    lm = model.model.language_model
    block = lm.layers[layer]
    attn = block.self_attn
    h = block.input_layernorm(x)
    batch, length, _ = h.shape
    q = attn.q_proj(h).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(h, position_ids)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * attn.scaling
    if scale is not None:
        scores = scores * scale
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if boost is not None:
        scores = scores + boost * scores.abs()
    probs = torch.softmax(scores.float(), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, -1)
    residual = x + attn.o_proj(out)
    y = residual + block.mlp(block.post_attention_layernorm(residual))
    return lm.norm(y) if layer == len(lm.layers) - 1 else y  # transformers' last hidden state is normed


def check_every_layer_and_step(model, inputs, out, boost_of=lambda layer: None, scale_of=lambda layer: None):
    """Each layer's output at every prompt position (prefill) and at each generated token (decoding
    steps) equals the hand re-run of that layer on the same run's own layer inputs.

    ``boost_of(layer)``: ``(B, heads, T, T)`` boost of the whole sequence's scores, or ``None``;
    ``scale_of(layer)``: ``(B, 1, T, T)`` product of the raw scores, or ``None``.
    """
    mask = inputs["attention_mask"]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], NEW_TOKENS - 1, dtype=mask.dtype)], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    valid = full_mask.bool()
    # Per step: the input of every layer, then the last (normed) output; steps are joined along T.
    states = [torch.cat([step[i] for step in out.hidden_states], dim=1) for i in range(DEPTH + 1)]
    for layer in range(DEPTH):
        with torch.no_grad():
            want = rerun_layer(
                model, layer, states[layer], position_ids, valid, boost_of(layer), scale_of(layer)
            )
        torch.testing.assert_close(
            states[layer + 1][valid],
            want[valid],
            atol=2e-5,
            rtol=1e-4,
            msg=lambda m, layer=layer: f"layer {layer}: {m}",
        )


def run(model, inputs, method):
    with torch.no_grad():
        return veridical.generate(
            model,
            inputs,
            methods=[method],
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_hidden_states=True,
            output_logits=True,
        )


def image_columns(model, inputs) -> torch.Tensor:
    return inputs["input_ids"] == model.config.image_token_id


def column_weights(model, inputs, weights_per_image) -> torch.Tensor:
    """``(B, prompt columns)``: each prompt's image columns get its image's weights, in order."""
    images = image_columns(model, inputs)
    weights = torch.zeros(images.shape)
    for row in range(images.shape[0]):
        weights[row, images[row]] = torch.as_tensor(weights_per_image[row], dtype=torch.float32)
    return weights


def boost_rule(model, weights, layers, prefill: bool, per_head=None):
    """``boost_of(layer)``: the official edit of the last prompt row (if ``prefill``) and of every
    generated token's row (always), with ``weights`` ``(B, prompt columns)`` on the keys, in
    ``layers``; ``per_head`` ``(B, layers, heads)`` scales it per head (PAINT's paper variant)."""
    rows, width = weights.shape
    heads = model.config.text_config.num_attention_heads
    length = width + NEW_TOKENS - 1
    edited = list(range(width if prefill else width + 1, length + 1))  # 1-based: the last prompt row
    boost = torch.zeros(rows, heads, length, length)
    for row in edited:
        boost[:, :, row - 1, :width] = weights[:, None, :]

    def boost_of(layer):
        if layer not in layers:
            return None
        return boost if per_head is None else boost * per_head[:, layer, :, None, None]

    return boost_of


def test_oracle_harness_reproduces_the_unmodified_model(pai_model):
    """The hand re-run without a boost is the model itself: the oracle below is sound."""
    model, inputs = pai_model
    out = run(model, inputs, {"name": "pai", "alpha": 0.0})
    check_every_layer_and_step(model, inputs, out)


# -- PAI ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "prefill"),
    [
        ({}, True),  # contrast off: every forward boosted (attention.py line 90, use_cfg False)
        ({"gamma": 1.1}, False),  # --use-cfg: the prefill runs with use_cfg True (CFG.py lines 33, 49)
        ({"gamma": 1.1, "boost_prefill": True}, True),
    ],
    ids=["no-contrast", "contrast", "contrast-boost-prefill"],
)
def test_pai_every_layer_and_step_equals_the_official_edit(pai_model, settings, prefill):
    model, inputs = pai_model
    alpha = 0.2  # pope_eval.py / chair_eval.py line 50, and every README command
    out = run(model, inputs, PAI(model, inputs, **settings))
    weights = alpha * image_columns(model, inputs).float()
    check_every_layer_and_step(model, inputs, out, boost_rule(model, weights, PAI_LAYERS, prefill))


def test_pai_with_contrast_leaves_the_first_token_to_the_contrast(pai_model, last_logits):
    """With ``gamma`` the first token's scores are the official contrast of the *unboosted* model:
    ``gamma * log p(y | v, x) - (gamma - 1) * log p(y | x)``, cut at 0.1 of the top probability
    (CFG.py lines 29, 51-57), both from plain forwards."""
    model, inputs = pai_model
    model = copy.deepcopy(model)
    with torch.no_grad():  # a peaked next-token distribution (a random head's is flat): the cutoff bites
        model.lm_head.weight *= 20.0
    method = PAI(model, inputs, gamma=1.1)
    with torch.no_grad():
        out = veridical.generate(
            model,
            inputs,
            methods=[method],
            max_new_tokens=1,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
    main = torch.log_softmax(last_logits(model, inputs), -1)
    uncond = torch.log_softmax(last_logits(model, text_only(model, inputs)), -1)  # model_loader.py 290
    expected = 1.1 * (main - uncond) + uncond
    expected = expected.masked_fill(main < np.log(0.1) + main.amax(-1, keepdim=True), float("-inf"))
    got = torch.log_softmax(out.scores[0].float(), -1)
    finite = torch.isfinite(expected)
    assert (finite.sum(-1) > 1).all() and not finite.all()  # the cutoff keeps several tokens, drops some
    assert torch.equal(torch.isfinite(got), finite)
    # Float noise here is about 1e-6; boosting the prefill moves these scores by about 0.1.
    torch.testing.assert_close(got[finite], torch.log_softmax(expected, -1)[finite], atol=1e-5, rtol=0)


def test_pai_warns_when_its_contrast_never_runs(pai_model):
    model, inputs = pai_model
    with pytest.warns(UserWarning, match="without its text-only contrast"):
        with torch.no_grad(), PAI(model, inputs, gamma=1.1):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)


# -- PAINT -------------------------------------------------------------------------------------------


def official_paint_weights(model, inputs, local_alpha=0.7, summary_alpha=0.3, with_cls=False):
    """Per image: the boost of each image token, from the eager vision tower's CLS-query attention.

    hasanar1f/PAINT clip_encoder.py: scores are the CLS row summed over heads in vision layers 0 and
    -2 (lines 38-39); summary tokens are the top-k of layer -2 with k its IQR outliers above
    Q3 + 1.5 IQR (numpy percentiles, lines 16-29, 48; the official ``int(n * k / n)`` is k at its
    576 patches); local tokens the top ``int(n * 0.25)`` of layer 0 (line 42) minus the summary
    tokens (lines 51-55). attention.py lines 139-147: local ``+ alpha |a|``, summary ``+ beta |a|``.
    """
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    per_image, found = [], {"summary": 0, "overlap": 0}
    for image in range(inputs["pixel_values"].shape[0]):
        first = attentions[0][image, :, 0, 1:].sum(0).numpy()
        second_last = attentions[-2][image, :, 0, 1:].sum(0).numpy()
        patches = len(first)
        q1, q3 = np.percentile(second_last, 25), np.percentile(second_last, 75)
        outliers = int((second_last > q3 + 1.5 * (q3 - q1)).sum())
        summary = set(np.argsort(-second_last, kind="stable")[:outliers].tolist())
        top = set(np.argsort(-first, kind="stable")[: int(patches * 0.25)].tolist())
        local = top - summary
        found["summary"] += len(summary)
        found["overlap"] += len(top & summary)
        weights = [
            local_alpha if p in local else summary_alpha if p in summary else 0.0 for p in range(patches)
        ]
        per_image.append(([0.0] if with_cls else []) + weights)
    return per_image, found


def head_divergence_factors(model, inputs):
    """``(B, layers, heads)``: each head's ``||o(v, x) - o(x)||`` at the last prompt token over its
    layer's mean, from plain forwards of the unmodified model (PAINT's paper variant)."""
    with_image = head_outputs(model, inputs)
    without = head_outputs(model, text_only(model, inputs))
    divergence = (with_image - without).norm(dim=-1)
    return divergence / divergence.mean(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    ("settings", "prefill", "strategy"),
    [
        ({}, True, "default"),
        ({"gamma": 1.1}, False, "default"),
        ({"head_modulation": True}, True, "default"),
        ({}, True, "full"),
    ],
    ids=["no-contrast", "contrast", "head-modulation", "cls-feature"],
)
def test_paint_every_layer_and_step_equals_the_official_edit(
    pai_model, pai_model_full, settings, prefill, strategy
):
    model, inputs = pai_model if strategy == "default" else pai_model_full
    weights, found = official_paint_weights(model, inputs, with_cls=strategy == "full")
    assert found["summary"] >= 2 and found["overlap"] >= 1  # every token rule is exercised
    per_head = head_divergence_factors(model, inputs) if settings.get("head_modulation") else None
    out = run(model, inputs, PAINT(model, inputs, **settings))
    boost = boost_rule(model, column_weights(model, inputs, weights), PAI_LAYERS, prefill, per_head)
    check_every_layer_and_step(model, inputs, out, boost)


def test_paint_refuses_a_vision_tower_without_cls_token():
    """SigLIP has no CLS token: the CLS-query attention would silently be the first patch's."""
    model, inputs = build_llava(
        seed=0, heads=4, kv_heads=2, vision="siglip_vision_model", strategy="full", depth=2
    )
    with torch.no_grad():
        veridical.generate(model, inputs, max_new_tokens=1)  # the model itself runs these inputs
    with pytest.raises(MethodSpecError, match="no CLS token"):
        PAINT(model, inputs)


def test_iqr_outlier_count_follows_the_official_rule():
    """clip_encoder.py lines 19-26: numpy's linear percentiles, strictly above Q3 + 1.5 IQR."""
    # Each case sits at an edge: the bound itself, just either side of it, and two where numpy's
    # linear interpolation of the quartiles differs from lower/higher/nearest/midpoint.
    cases = [(12, 18.0, 0), (12, 17.9, 0), (12, 18.1, 1), (11, 16.8, 1), (11, 16.0, 0)]
    for size, extra, count in cases:
        data = np.append(np.arange(float(size)), extra)
        q1, q3 = np.percentile(data, [25, 75])
        assert int((data > q3 + 1.5 * (q3 - q1)).sum()) == count  # the expectation is the rule
        assert iqr_outliers(torch.tensor(data, dtype=torch.float32)) == count


# -- VHR ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: one thread avoids paying thread synchronisation on every operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_only(model, inputs):
    """The prompts without their image tokens, left-padded again (the paper's ``x`` without ``v``)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    rows = [ids[b][mask[b] & (ids[b] != model.config.image_token_id)] for b in range(ids.shape[0])]
    width = max(len(r) for r in rows)
    new_ids = torch.zeros(len(rows), width, dtype=ids.dtype)
    new_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        new_ids[b, width - len(row) :] = row
        new_mask[b, width - len(row) :] = 1
    return {"input_ids": new_ids, "attention_mask": new_mask}


def scale_heads_hooks(model, scales):
    """Plain torch pre-hooks on ``o_proj``: multiply each head's slice of its input by ``scales``
    ``(B, layers, heads)`` (the paper's reinforcement of a head's output)."""
    handles = []
    for layer, block in enumerate(model.model.language_model.layers):

        def hook(module, args, layer=layer):
            x = args[0]
            b, t, _ = x.shape
            s = scales[:, layer].to(x)
            return ((x.view(b, t, s.shape[1], -1) * s[:, None, :, None]).view(b, t, -1),)

        handles.append(block.self_attn.o_proj.register_forward_pre_hook(hook))
    return handles


def head_outputs(model, inputs, scales=None):
    """``(B, layers, heads, head_dim)``: every head's output (the input of ``o_proj``) at the last
    prompt token, of a plain forward, with ``scales`` reinforcing heads as :func:`scale_heads_hooks`."""
    seen = {}
    handles = scale_heads_hooks(model, scales) if scales is not None else []
    for layer, block in enumerate(model.model.language_model.layers):

        def capture(module, args, layer=layer):
            seen[layer] = args[0][:, -1].detach()

        # After the scaling hook: it sees the reinforced heads (a layer being chosen has scale 1).
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(capture))
    mask = inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            model(**inputs, position_ids=position_ids)
    finally:
        for handle in handles:
            handle.remove()
    heads = model.config.text_config.num_attention_heads
    return torch.stack([seen[i].view(mask.shape[0], heads, -1) for i in range(len(seen))], dim=1).float()


def above_mean_std(values: np.ndarray, ddof: int) -> np.ndarray:
    return values > values.mean() + values.std(ddof=ddof)


def vhr_oracle(model, inputs, alpha=2.0, ddof=0):
    """The paper's head choice, layer by layer: VHD = ||o(v, x) - o(x)|| per head at the first
    generated token (the last prompt position); heads with VHD and ||o(x)|| both above their layer's
    mean + std are outliers (score 0); heads scoring above the layer median are scaled by ``alpha``;
    later layers are measured with the earlier ones reinforced. Returns the scales and which rules
    fired."""
    heads = model.config.text_config.num_attention_heads
    prompts = inputs["input_ids"].shape[0]
    scales = torch.ones(prompts, DEPTH, heads)
    text = text_only(model, inputs)
    fired = {"outlier": 0, "population_only": 0, "one_measure": 0}
    for layer in VHR_LAYERS:
        with_image = head_outputs(model, inputs, scales)[:, layer]
        without = head_outputs(model, text, scales)[:, layer]
        for b in range(prompts):
            vhd = (with_image[b] - without[b]).norm(dim=-1).double().numpy()
            norm = without[b].norm(dim=-1).double().numpy()
            outlier = above_mean_std(vhd, ddof) & above_mean_std(norm, ddof)
            score = np.where(outlier, 0.0, vhd)
            chosen = score > np.median(score)
            scales[b, layer] = torch.tensor(np.where(chosen, alpha, 1.0))
            fired["outlier"] += int(outlier.sum())
            fired["population_only"] += int(
                (outlier & ~(above_mean_std(vhd, 1) & above_mean_std(norm, 1))).sum()
            )
            fired["one_measure"] += int((above_mean_std(vhd, ddof) ^ above_mean_std(norm, ddof)).sum())
    return scales, fired


@pytest.fixture(scope="module")
def vhr_model():
    """7 heads (an odd count: the median is one head's score), 32 layers. One head of layer 1 gets
    its value projection scaled so that it is an outlier under the population std but not under
    the sample std: both std conventions, and the outlier rule itself, change the choice."""
    model, inputs = build_llava(seed=1, heads=7, kv_heads=7)
    head, layer = 0, VHR_LAYERS[0]
    text = text_only(model, inputs)
    with_image = head_outputs(model, inputs)[:, layer]
    without = head_outputs(model, text)[:, layer]
    vhd = (with_image - without).norm(dim=-1).double().numpy()  # (B, heads)
    norm = without.norm(dim=-1).double().numpy()

    def flags(c, ddof):
        out = []
        for b in range(vhd.shape[0]):
            v, n = vhd[b].copy(), norm[b].copy()
            v[head] *= c
            n[head] *= c  # scaling the head's values scales its outputs with and without the image
            out.append(bool(above_mean_std(v, ddof)[head] and above_mean_std(n, ddof)[head]))
        return out

    factor = next(c for c in np.arange(1.0, 30.0, 0.01) if flags(c, 0)[0] and not flags(c, 1)[0])
    v_proj = model.model.language_model.layers[layer].self_attn.v_proj
    dim = model.config.text_config.head_dim
    with torch.no_grad():
        v_proj.weight[head * dim : (head + 1) * dim] *= float(factor)
    return model, inputs


def test_vhr_head_choice_and_every_step_equal_the_paper_rule(vhr_model):
    model, inputs = vhr_model
    scales, fired = vhr_oracle(model, inputs)
    assert fired["outlier"] >= 1 and fired["population_only"] >= 1 and fired["one_measure"] >= 1
    assert (scales == 2).any(dim=-1)[:, VHR_LAYERS].all()
    method = VHR(model, inputs)
    assert method.layers == VHR_LAYERS
    method.prepare()
    torch.testing.assert_close(method.head_scales, scales)
    # Generation with the chosen heads reinforced at every position and step, against the same
    # model with plain o_proj hooks applying the oracle's scales.
    handles = scale_heads_hooks(model, scales)
    try:
        with torch.no_grad():
            expected = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
    finally:
        for handle in handles:
            handle.remove()
    got = run(model, inputs, VHR(model, inputs))
    assert torch.equal(got.sequences, expected.sequences)
    for step in range(NEW_TOKENS):
        torch.testing.assert_close(got.logits[step], expected.logits[step], atol=5e-6, rtol=0)

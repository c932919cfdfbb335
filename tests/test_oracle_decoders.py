"""Oracles for VISTA, VCD, AvisC and M3ID: expected values from transformers' own eager outputs.

Every expectation here is computed from plain forwards of the model (``output_hidden_states``,
``output_attentions``, forward hooks that read or rewrite a module's output) with indices and
formulas written down from the official code, never through veridical's helpers. The model is a
LLaVA whose text decoder is deep enough (16 layers) for VISTA's scaled window to cover several
layers and stop short of the last one, and whose vocabulary (96) is larger than transformers'
default top-k (50).

Official code (commits as the search tool shows them):
- VISTA: LzVv123456/VISTA at dc62252
- VCD: DAMO-NLP-SG/VCD at d6568ff
- AvisC (and its M3ID baseline): sangminwoo/AvisC at 772eba4
- M3ID: Favero et al., CVPR 2024 (arXiv:2403.14003), no official code
"""

import copy
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import LlavaForConditionalGeneration, LogitsProcessorList

import veridical
from veridical.decoders import M3ID, VCD, AvisC
from veridical.decoders.avisc import blind_tokens, top_share_layers
from veridical.heads import VISTA
from veridical.tiny import tiny_inputs, tiny_llava

DEPTH = 16
VOCAB = 96
GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and far faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def deep():
    """``(model, eager copy, inputs)``: two left-padded prompts, one image each."""
    base, processor = tiny_llava()
    config = copy.deepcopy(base.config)
    config.text_config.num_hidden_layers = DEPTH
    config.text_config.vocab_size = VOCAB
    torch.manual_seed(3)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random logits are flat; spread them so that cutoffs and gates bite
        model.lm_head.weight.mul_(4.0)
    model.generation_config = copy.deepcopy(base.generation_config)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    inputs = tiny_inputs("llava", processor, ["describe this image in detail please", "what is this ?"])
    return model, eager, inputs


# -- plain-forward helpers (no veridical code) ---------------------------------------------------


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward(model, inputs, **kwargs):
    """One plain forward, positions numbered as generate() numbers them."""
    inputs = dict(inputs)
    with torch.no_grad():
        return model(**inputs, position_ids=positions(inputs["attention_mask"]), **kwargs)


def last_logits(model, inputs):
    return forward(model, inputs).logits[:, -1].float()


def extended(inputs, tokens):
    """``inputs`` with one more token per row, as the next plain forward sees them."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, None]], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, None])], dim=1)
    return out


def without_image(model, inputs):
    """The prompts with their image tokens removed, left-padded again (VISTA's and M3ID's image-free
    prompt: VISTA's ``model_loader.py`` lines 372-424 keep the text before and after the image)."""
    image = model.config.image_token_id
    pairs = zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    rows = [ids[(ids != image) & (mask == 1)] for ids, mask in pairs]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def with_hooks(modules_and_hooks, run):
    handles = [module.register_forward_hook(hook) for module, hook in modules_and_hooks]
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()


def decoder_layers(model):
    return model.model.language_model.layers


# -- VISTA ---------------------------------------------------------------------------------------


def raw_layer_outputs(model, inputs):
    """Every decoder layer's output at the last token, read by hooks on the layers as the official
    ForwardTracer (steering_vector.py lines 80-88): the last layer's output is before the norm."""
    seen = {}

    def record(i):
        def hook(module, args, output):
            seen[i] = (output[0] if isinstance(output, tuple) else output)[:, -1].float()

        return hook

    layers = decoder_layers(model)
    with_hooks([(layer, record(i)) for i, layer in enumerate(layers)], lambda: forward(model, inputs))
    return torch.stack([seen[i] for i in range(len(layers))], dim=1)


def official_vectors(model, inputs, pca=True):
    """obtain_vsv (steering_vector.py lines 113-129) with one (no image, image) pair per prompt: the
    rank-1 PCA of a single row returns mean + first unit vector (myutils.py lines 120-130)."""
    vectors = raw_layer_outputs(model, inputs) - raw_layer_outputs(model, without_image(model, inputs))
    if pca:
        vectors[:, 0, 0] += 1.0
    return vectors


def vsv(x, v, lam):
    """VSVLayer.forward (llm_layers.py lines 15-30) for one vector per layer; v is (rows, d)."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True)
    similarity = 1.0 + torch.clamp(F.cosine_similarity(x, -v[:, None, :], dim=-1), min=0.0)[..., None]
    y = lam * similarity * (v / v.norm(dim=-1, keepdim=True))[:, None, :]
    return F.normalize(F.normalize(x, dim=-1) + y, dim=-1) * norm


def steered_forward(model, inputs, vectors, lam, pairs, **kwargs):
    """A plain forward with the official VSV layer after the MLP of each steered layer."""

    def hook(source):
        def apply(module, args, output):
            return vsv(output, vectors[:, source], lam).to(output.dtype)

        return apply

    layers = decoder_layers(model)
    return with_hooks(
        [(layers[layer].mlp, hook(source)) for layer, source in pairs],
        lambda: forward(model, inputs, **kwargs),
    )


def augmented(model, output, window):
    """llava_llama.py lines 93-103: 0.3 x mean lm_head(hidden_states[1:][i]) + 0.7 x logits."""
    states = output.hidden_states[1:]  # the official code drops the embeddings first
    with torch.no_grad():
        early = torch.stack([model.lm_head(states[i][:, -1]) for i in window]).mean(0).float()
    return torch.log_softmax(0.3 * early + 0.7 * output.logits[:, -1].float(), dim=-1)


def test_vista_steering_vectors_are_raw_layer_outputs_with_the_pca_offset(deep):
    model, _, inputs = deep
    for pca in (True, False):
        method = VISTA(model, inputs, official_pca=pca)
        method.prepare()
        expected = official_vectors(model, inputs, pca)
        torch.testing.assert_close(method.vectors, expected, atol=1e-5, rtol=1e-5)
    normed_last = forward(model, inputs, output_hidden_states=True).hidden_states[-1][:, -1]
    raw_last = raw_layer_outputs(model, inputs)[:, -1]
    assert not torch.allclose(normed_last, raw_last, atol=1e-2), "the final norm must matter here"


def test_vista_default_window_is_the_official_25_30_scaled(deep):
    model, _, inputs = deep
    # Outputs 25..30 of 32 layers = outputs 12..15 of 16, cut to end one layer before the last.
    assert VISTA(model, inputs, lam=0.0).augmentation.window == [12, 13, 14]
    out = veridical.generate(
        model, inputs, methods=[VISTA(model, inputs, lam=0.0)], max_new_tokens=1, **GREEDY
    )
    plain = forward(model, inputs, output_hidden_states=True)
    expected = augmented(model, plain, [12, 13, 14])
    torch.testing.assert_close(out.scores[0], expected, **TOL)
    shifted = augmented(model, plain, [11, 12, 13])  # transformers' hidden_states[12..14]: the old bug
    assert not torch.allclose(expected, shifted, atol=1e-3)


@pytest.mark.parametrize("spec", ["13,15", [13, 14, 15], "-3,-1"])
def test_vista_window_with_the_last_layer_reads_it_after_the_final_norm(deep, spec):
    model, _, inputs = deep
    method = VISTA(model, inputs, lam=0.0, logits_layers=spec)
    out = veridical.generate(model, inputs, methods=[method], max_new_tokens=2, **GREEDY)
    first = out.sequences[:, inputs["input_ids"].shape[1]]
    for step, batch in enumerate([inputs, extended(inputs, first)]):
        expected = augmented(model, forward(model, batch, output_hidden_states=True), [13, 14, 15])
        torch.testing.assert_close(out.scores[step], expected, **TOL)


def test_vista_official_strings_equal_their_lists(deep):
    model, _, inputs = deep
    assert VISTA(model, inputs, logits_layers="12,14").augmentation.window == [12, 13, 14]
    assert VISTA(model, inputs, layers="2,6").pairs == [(2, 2), (3, 3), (4, 4), (5, 5)]
    assert VISTA(model, inputs, layers="2,6,8,12").pairs == [(2, 8), (3, 9), (4, 10), (5, 11)]
    assert VISTA(model, inputs, layers=[1, 3]).pairs == [(1, 1), (3, 3)]
    assert VISTA(model, inputs).pairs == [(i, i) for i in range(DEPTH)]
    for bad in ("2,6,8", "2,6,8,9", "a,b", "6,2"):
        with pytest.raises(veridical.errors.MethodSpecError, match="layers"):
            VISTA(model, inputs, layers=bad)
    for bad in ("12", [16], "-17,-16"):
        with pytest.raises(veridical.errors.MethodSpecError, match="logits_layers"):
            VISTA(model, inputs, logits_layers=bad)


@pytest.mark.parametrize(
    ("layers", "pairs"),
    [
        (None, [(i, i) for i in range(DEPTH)]),
        ("2,6,8,12", [(2, 8), (3, 9), (4, 10), (5, 11)]),  # llm_layers.py lines 142-145
        ("10,16", [(i, i) for i in range(10, 16)]),  # lines 138-141: a slice, end excluded
    ],
)
def test_vista_steers_as_the_official_vsv_layers(deep, layers, pairs):
    model, _, inputs = deep
    lam = 0.4
    method = VISTA(model, inputs, lam=lam, logits_alpha=0.0, layers=layers)
    out = veridical.generate(model, inputs, methods=[method], max_new_tokens=2, **GREEDY)
    vectors = official_vectors(model, inputs)
    first = out.sequences[:, inputs["input_ids"].shape[1]]
    for step, batch in enumerate([inputs, extended(inputs, first)]):
        logits = steered_forward(model, batch, vectors, lam, pairs).logits[:, -1].float()
        # No logits processor runs (logits_alpha=0): greedy scores are the raw logits.
        torch.testing.assert_close(out.scores[step], logits, **TOL)
    assert not torch.allclose(out.scores[0], last_logits(model, inputs), atol=1e-3)


def test_vista_defaults_steer_and_augment_from_the_steered_forward(deep):
    model, _, inputs = deep
    out = veridical.generate(model, inputs, methods=["vista"], max_new_tokens=2, **GREEDY)
    vectors = official_vectors(model, inputs)
    pairs = [(i, i) for i in range(DEPTH)]
    first = out.sequences[:, inputs["input_ids"].shape[1]]
    for step, batch in enumerate([inputs, extended(inputs, first)]):
        plain = steered_forward(model, batch, vectors, 0.17, pairs, output_hidden_states=True)
        torch.testing.assert_close(out.scores[step], augmented(model, plain, [12, 13, 14]), **TOL)


def test_vista_augmentation_alone_keeps_tokens_other_processors_removed(deep):
    """logits_alpha=1 uses the early-layer logits alone (llava_llama.py line 103); a token that
    another processor bans stays banned (the official code mixes before every processor)."""
    model, _, inputs = deep
    method = VISTA(model, inputs, lam=0.0, logits_alpha=1.0)
    out = veridical.generate(model, inputs, methods=[method], max_new_tokens=1, suppress_tokens=[5], **GREEDY)
    states = forward(model, inputs, output_hidden_states=True).hidden_states[1:]
    with torch.no_grad():
        early = torch.stack([model.lm_head(states[i][:, -1]) for i in (12, 13, 14)]).mean(0).float()
    expected = torch.log_softmax(early.index_fill(-1, torch.tensor([5]), -math.inf), -1)
    assert_scores(torch.log_softmax(out.scores[0], -1), expected)


def test_vista_augmentation_passes_a_fully_masked_row_through(deep):
    model, _, inputs = deep
    augmentation = VISTA(model, inputs, lam=0.0).augmentation
    augmentation.readout.states = {i: torch.randn(2, 64) for i in augmentation.indices}
    scores = torch.randn(2, VOCAB)
    scores[1] = -math.inf
    got = augmentation(inputs["input_ids"], scores.clone())
    assert torch.isfinite(got[0]).all() and torch.isneginf(got[1]).all()


@pytest.mark.parametrize("window", [None, "13,15"])
def test_vista_reads_the_main_rows_of_a_forward_shared_with_a_contrast_branch(deep, window):
    """Stacked after VCD, whose image-free rows run in the same forward from the second token on."""
    model, _, inputs = deep
    vcd = {"name": "vcd", "contrast": "no_image", "alpha": 1.0, "beta": 0.1}
    vista = {"name": "vista", "lam": 0.0, "logits_layers": window}
    out = veridical.generate(model, inputs, methods=[vcd, vista], max_new_tokens=2, **GREEDY)
    first = out.sequences[:, inputs["input_ids"].shape[1]]
    text = without_image(model, inputs)
    layers = [12, 13, 14] if window is None else [13, 14, 15]
    for step, (main, other) in enumerate([(inputs, text), (extended(inputs, first), extended(text, first))]):
        plain = forward(model, main, output_hidden_states=True)
        contrast = vcd_by_hand(plain.logits[:, -1].float(), last_logits(model, other), 1.0, 0.1)
        states = plain.hidden_states[1:]
        with torch.no_grad():
            early = torch.stack([model.lm_head(states[i][:, -1]) for i in layers]).mean(0).float()
        assert_scores(out.scores[step], torch.log_softmax(0.7 * contrast + 0.3 * early, -1))


# -- VCD -----------------------------------------------------------------------------------------


def official_noise(pixels, step, seed):
    """add_diffusion_noise (vcd_utils/vcd_add_noise.py lines 3-28), float32 as there; the noise is
    drawn from a generator seeded with ``seed`` (VCD's ``seed`` argument)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    alphas_prod = torch.cumprod(1 - betas, dim=0)
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    return alphas_prod[step].sqrt() * pixels + (1 - alphas_prod[step]).sqrt() * noise


def vcd_by_hand(l_v, l_d, alpha, beta):
    """vcd_sample.py lines 150-153 on raw logits, returned as log-probabilities."""
    cutoff = math.log(beta) + l_v.max(dim=-1, keepdim=True).values if beta > 0 else -math.inf
    scores = ((1 + alpha) * l_v - alpha * l_d).masked_fill(l_v < cutoff, -math.inf)
    return torch.log_softmax(scores, dim=-1)


def assert_scores(got, expected):
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite), "the plausibility set differs"
    torch.testing.assert_close(got[finite], expected[finite], **TOL)


@pytest.mark.parametrize(
    ("contrast", "alpha", "beta", "step"),
    [
        ("noise", 1.0, 0.1, 500),
        ("noise", 2.5, 0.2, 900),
        ("blank", 0.5, 1.0, 500),
        ("no_image", 1.0, 0.0, 500),
    ],
)
def test_vcd_two_steps_equal_the_official_rule(deep, contrast, alpha, beta, step):
    model, _, inputs = deep
    method = VCD(model, inputs, alpha=alpha, beta=beta, noise_step=step, contrast=contrast, seed=5)
    out = veridical.generate(model, inputs, methods=[method], max_new_tokens=2, **GREEDY)
    if contrast == "noise":
        distorted = {**inputs, "pixel_values": official_noise(inputs["pixel_values"], step, 5)}
    elif contrast == "blank":
        distorted = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
    else:
        distorted = without_image(model, inputs)
    first = out.sequences[:, inputs["input_ids"].shape[1]]
    for t, (main, other) in enumerate(
        [(inputs, distorted), (extended(inputs, first), extended(distorted, first))]
    ):
        l_v, l_d = last_logits(model, main), last_logits(model, other)
        expected = vcd_by_hand(l_v, l_d, alpha, beta)
        assert_scores(out.scores[t], expected)
        assert not torch.allclose(expected, torch.log_softmax(l_v, -1), atol=1e-3)
        if beta == 1.0:  # only the top token survives the cutoff
            assert torch.isfinite(expected).sum(-1).tolist() == [1, 1]
        elif beta:
            assert torch.isinf(expected).any(-1).all() and torch.isfinite(expected).sum(-1).min() > 1


@pytest.mark.parametrize("method", [VCD, AvisC])
def test_official_sampling_has_no_top_k_and_nothing_after_the_contrast(deep, method):
    """The official LLaVA scripts sample with top_k=None (no top-k under transformers 4.31,
    object_hallucination_vqa_llava.py lines 75-78 and 113); transformers 5 adds top-k 50 unless told."""
    model, _, inputs = deep
    decoder = method(model, inputs, beta=0.0)
    settings = dict(method.generation_defaults)
    config, _ = model._prepare_generation_config(None, **settings)
    processors = model._get_logits_processor(
        config, logits_processor=LogitsProcessorList([decoder]), device="cpu"
    )
    assert list(processors) == [decoder]
    config, _ = model._prepare_generation_config(None, **{k: v for k, v in settings.items() if k != "top_k"})
    default = model._get_logits_processor(
        config, logits_processor=LogitsProcessorList([decoder]), device="cpu"
    )
    assert [type(p).__name__ for p in default] == [type(decoder).__name__, "TopKLogitsWarper"]
    # End to end: with no cutoff every one of the 96 tokens keeps its contrastive probability.
    kwargs = {"contrast": "blank"} if method is VCD else {}
    torch.manual_seed(0)
    out = model.generate(
        **inputs,
        logits_processor=[method(model, inputs, beta=0.0, **kwargs)],
        max_new_tokens=1,
        output_scores=True,
        return_dict_in_generate=True,
        **settings,
    )
    assert torch.isfinite(out.scores[0]).all()
    if method is VCD:
        blank = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
        expected = vcd_by_hand(last_logits(model, inputs), last_logits(model, blank), 1.0, 0.0)
        torch.testing.assert_close(out.scores[0], expected, **TOL)


# -- AvisC ---------------------------------------------------------------------------------------


def official_blind(eager, inputs, gamma, lam):
    """avisc_sample.py lines 138-179 on transformers' eager attentions, per prompt: the layers with the
    largest share of image attention (count_top_p: running sum below gamma, plus one), the image
    tokens' mean attention over them, blind = not below mean + lam * std (unbiased)."""
    output = forward(eager, inputs, output_attentions=True, output_hidden_states=True)
    image = inputs["input_ids"] == eager.config.image_token_id
    blind = torch.zeros_like(image)
    chosen = []
    for row in range(image.shape[0]):
        columns = image[row].nonzero().flatten()
        per_layer = torch.stack([a[row].mean(0)[-1, columns] for a in output.attentions]).float()
        share = per_layer.sum(-1)
        share = share / share.sum()
        k = int((torch.cumsum(torch.sort(share, descending=True).values, 0) < gamma).sum()) + 1
        layers = torch.topk(share, k).indices
        tokens = per_layer[layers].mean(0)
        blind[row, columns] = ~(tokens < tokens.mean() + tokens.std() * lam)
        chosen.append(k)
    return blind, output.hidden_states[0], chosen


@pytest.mark.parametrize(("gamma", "lam"), [(0.5, 1.0), (0.3, 0.5), (0.8, 1.5), (0.5, 0.0)])
def test_avisc_blind_tokens_follow_the_official_selection(deep, gamma, lam):
    model, eager, inputs = deep
    blind, _, chosen = official_blind(eager, inputs, gamma, lam)
    image_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert all(1 < k < DEPTH for k in chosen), "the layer selection must be a proper subset"
    assert all(0 < n < image_tokens for n in blind.sum(-1).tolist()), "the blind set must be non-trivial"
    method = AvisC(model, inputs, gamma=gamma, lam=lam)
    veridical.generate(model, inputs, methods=[method], max_new_tokens=1, **GREEDY)
    assert torch.equal(method.blind, blind)


def test_avisc_two_steps_equal_the_official_rule(deep):
    model, eager, inputs = deep
    alpha, beta = 1.5, 0.1
    blind, embeddings, _ = official_blind(eager, inputs, 0.5, 1.0)
    image = inputs["input_ids"] == model.config.image_token_id
    masked = embeddings.clone()
    masked[image & ~blind] = 0.0  # masking_scheme "zeros": llava_llama.py lines 99-112
    method = AvisC(model, inputs, alpha=alpha, beta=beta)
    out = veridical.generate(model, inputs, methods=[method], max_new_tokens=2, **GREEDY)
    first = out.sequences[:, inputs["input_ids"].shape[1]]
    mask = inputs["attention_mask"]
    for t in range(2):
        if t == 0:
            main = inputs
            branch = {"inputs_embeds": masked, "attention_mask": mask}
        else:
            main = extended(inputs, first)
            next_embedding = model.get_input_embeddings()(first)[:, None]
            branch = {
                "inputs_embeds": torch.cat([masked, next_embedding], dim=1),
                "attention_mask": torch.cat([mask, torch.ones_like(first[:, None])], dim=1),
            }
        expected = vcd_by_hand(last_logits(model, main), last_logits(model, branch), alpha, beta)
        assert_scores(out.scores[t], expected)
        assert not torch.allclose(expected, torch.log_softmax(last_logits(model, main), -1), atol=1e-3)


def test_avisc_falls_back_to_the_main_logits_for_a_nan_contrast():
    """avisc_sample.py lines 200-201 (per row here)."""
    method = AvisC.__new__(AvisC)
    method.alpha, method.beta = 1.0, 0.0
    log_probs = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5], [0.2, 0.1, 3.0]]), -1)
    contrast = torch.log_softmax(torch.tensor([[0.5, 0.5, 0.5], [1.0, 2.0, 0.0]]), -1)
    contrast[1, 0] = math.nan
    got = method.combine(log_probs, contrast)
    torch.testing.assert_close(got[0], torch.log_softmax(2 * log_probs[0] - contrast[0], -1))
    torch.testing.assert_close(got[1], log_probs[1])


def test_avisc_layer_count_is_the_official_count_top_p():
    """count_top_p (avisc_sample.py lines 138-145): sorted shares whose running sum is below gamma, + 1."""
    share = torch.tensor([0.25, 0.5, 0.15, 0.1])
    assert top_share_layers(share, 0.5).tolist() == [1]  # running sums 0.5, 0.75, ...: none below 0.5
    assert sorted(top_share_layers(share, 0.75).tolist()) == [0, 1]
    assert sorted(top_share_layers(share, 0.8).tolist()) == [0, 1, 2]  # 0.5, 0.75 below: 2 + 1


def test_avisc_blind_threshold_is_mean_plus_unbiased_std_inclusive():
    """avisc_sample.py lines 175-179: tokens below mean + lam * std (torch.std: unbiased) are masked."""
    tokens = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.8, 0.9, 0.75])
    per_layer = torch.stack([tokens, tokens / 100])  # the second layer holds 1% of the share: left out
    # mean 0.436, unbiased std 0.370: threshold 0.806 (a biased std would give 0.779 and take 0.8)
    assert blind_tokens(per_layer, 0.5, 1.0).tolist() == [False] * 5 + [True, False]
    # lam 0: the threshold is the mean, 0.5 here, and a token equal to it is blind
    assert blind_tokens(torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.01, 0.005]]), 0.5, 0.0).tolist() == [
        False,
        True,
        True,
    ]


# -- M3ID ----------------------------------------------------------------------------------------


def m3id_by_hand(l_c, l_u, t, lam, alpha=None, beta=None):
    """The paper's update with gamma_t = exp(-lam t), t = 1 at the first token; ``alpha`` gates it on
    max p_c < alpha (the paper), ``beta`` applies VCD's cutoff instead (avisc_sample.py lines 246-269)."""
    gamma = math.exp(-lam * t)
    corrected = l_c + (1 - gamma) / gamma * (l_c - l_u)
    if beta is not None:
        cutoff = math.log(beta) + l_c.max(dim=-1, keepdim=True).values
        return torch.log_softmax(corrected.masked_fill(l_c < cutoff, -math.inf), -1)
    unsure = l_c.exp().max(dim=-1, keepdim=True).values < alpha
    return torch.log_softmax(torch.where(unsure, corrected, l_c), -1)


def m3id_steps(model, inputs, sequences, steps):
    prompt = inputs["input_ids"].shape[1]
    text = without_image(model, inputs)
    for t in range(1, steps + 1):
        main, other = inputs, text
        for k in range(t - 1):
            token = sequences[:, prompt + k]
            main, other = extended(main, token), extended(other, token)
        yield (
            t,
            (
                torch.log_softmax(last_logits(model, main), -1),
                torch.log_softmax(last_logits(model, other), -1),
            ),
        )


def test_m3id_three_steps_with_one_row_gated(deep):
    model, _, inputs = deep
    top = torch.softmax(last_logits(model, inputs), -1).max(-1).values
    alpha = float(top.min() * top.max()) ** 0.5  # one row is sure enough at the first step, one is not
    lam = 0.5
    out = veridical.generate(
        model, inputs, methods=[M3ID(model, inputs, alpha=alpha, lam=lam)], max_new_tokens=3, **GREEDY
    )
    for t, (l_c, l_u) in m3id_steps(model, inputs, out.sequences, 3):
        expected = m3id_by_hand(l_c, l_u, t, lam, alpha=alpha)
        torch.testing.assert_close(out.scores[t - 1], expected, **TOL)
        if t == 1:
            changed = ~torch.isclose(expected, l_c, atol=1e-4).all(-1)
            assert changed.tolist().count(True) == 1, "exactly one row must pass the gate"


def test_m3id_avisc_variant_three_steps(deep):
    model, _, inputs = deep
    lam, beta = 0.3, 0.1
    method = M3ID(model, inputs, variant="avisc", lam=lam, beta=beta)
    out = veridical.generate(model, inputs, methods=[method], max_new_tokens=3, **GREEDY)
    for t, (l_c, l_u) in m3id_steps(model, inputs, out.sequences, 3):
        expected = m3id_by_hand(l_c, l_u, t, lam, beta=beta)
        assert_scores(out.scores[t - 1], expected)
        assert torch.isinf(expected).any()


def test_m3id_gate_is_strict():
    """The correction applies where max p < alpha, not where it equals alpha."""
    method = M3ID.__new__(M3ID)
    method.alpha, method.lam, method.variant, method.beta, method.generated = 0.5, 1.0, "paper", 0.1, 0
    log_probs = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.4, 0.3, 0.3]]))
    contrast = torch.log(torch.tensor([[0.2, 0.4, 0.4], [0.2, 0.4, 0.4]]))
    got = method.combine(log_probs, contrast)
    torch.testing.assert_close(got[0], log_probs[0])
    gamma = math.exp(-1.0)
    expected = log_probs[1] + (1 - gamma) / gamma * (log_probs[1] - contrast[1])
    torch.testing.assert_close(got[1], torch.log_softmax(expected, -1))


@pytest.mark.parametrize("variant", ["paper", "avisc"])
def test_m3id_with_no_correction_keeps_removed_tokens_removed(variant):
    """lam=0 makes gamma_t = 1 and the correction zero: the image logits alone, banned tokens banned."""
    method = M3ID.__new__(M3ID)
    method.alpha, method.lam, method.variant, method.beta, method.generated = 0.9, 0.0, variant, 0.0, 0
    log_probs = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5, 0.0]]), -1)
    log_probs[0, 2] = -math.inf
    contrast = torch.log_softmax(torch.tensor([[0.5, 0.5, 3.0, 0.5]]), -1)
    torch.testing.assert_close(method.combine(log_probs, contrast), torch.log_softmax(log_probs, -1))

"""Tiny random-weight vision-language models of every supported family.

They are built from configs in well under a second and never touch the network, so the test-suite
and the README demo run offline on a CPU. Each factory returns ``(model, processor)`` where the
processor is the family's real processor class (PIL image processors: torchvision is not a
dependency). Random weights do not hallucinate in any meaningful way; they exercise code paths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from veridical.processors import image_only_qwen_processor_class

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "instructblip")

_WORDS = (
    "a an the is there in of and on with to what describe this image picture please detail "
    "yes no not cat dog car person table cup fork knife red blue green big small one two three "
    "USER: ASSISTANT: user assistant system ? . , :"
).split()
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_IMAGE_TOKENS = {
    "llava": ["<image>"],
    "llava_next": ["<image>"],
    "qwen2_vl": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"],
    "qwen2_5_vl": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"],
    "instructblip": ["<image>"],
}
TEXT_HIDDEN = 64
TEXT_LAYERS = 4
TEXT_HEADS = 4
TEXT_KV_HEADS = 2


def word_tokenizer(
    extra_specials: list[str],
    words: tuple[str, ...] | list[str] = _WORDS,
    image_token: str | None = None,
    lowercase: bool = False,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer splitting on whitespace (and, with ``lowercase``, on punctuation after
    lower-casing); ``extra_specials`` are never split or lower-cased."""
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + extra_specials + list(dict.fromkeys(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
        )
    backend.add_special_tokens(_SPECIALS + extra_specials)
    kwargs = {"image_token": image_token} if image_token else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=kwargs or None,
    )
    return tok


def _text_config(vocab_size: int, **extra) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def _filled_words(vocab_size: int, specials: int) -> list[str]:
    """The tiny vocabulary filled with made-up words (``w<i>``) up to ``vocab_size`` entries in all, so
    that every id a real-size model can emit decodes to a word: random weights then write non-empty
    answers (an id beyond the tokenizer decodes to nothing, and ``veridical eval`` refuses all-empty
    outputs)."""
    words = list(dict.fromkeys(_WORDS))
    fill = vocab_size - len(_SPECIALS) - specials - len(words)
    return words + [f"w{i}" for i in range(max(fill, 0))]


def _build(model_class, config, seed: int, device: str | torch.device, dtype: torch.dtype | None):
    """``model_class(config)`` with seeded random weights, created directly on ``device`` in ``dtype``
    (a 7B model is never materialised in float32 on the CPU first)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device):
            return model_class(config)
    finally:
        torch.set_default_dtype(previous)


def _finish(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> torch.nn.Module:
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return model.eval()


#: CLIP vision tower of the tiny LLaVA models: 30 px images, 6 px patches -> 25 image tokens.
_CLIP_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=30,
    patch_size=6,
)
_LLAVA_PROCESSOR = dict(patch_size=6, vision_feature_select_strategy="default", num_additional_image_tokens=1)

#: LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:") as a chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _llava(
    vision: dict,
    text: Callable[[int], dict],
    image_size: int,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
):
    """A LLaVA-1.5 model with random weights and its processor (``image_size`` px): ``vision`` the CLIP
    tower's config, ``text(vocabulary size of the tokenizer)`` the LLaMA decoder's. ``vocab_size``:
    fill the tokenizer up to that many entries (:func:`_filled_words`)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    extra = _IMAGE_TOKENS["llava"]
    words = _filled_words(vocab_size, len(extra)) if vocab_size else _WORDS
    tok = word_tokenizer(extra, words=words, image_token="<image>")
    config = LlavaConfig(
        vision_config=vision,
        text_config=dict(model_type="llama", **text(len(tok))),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = _build(LlavaForConditionalGeneration, config, seed, device, dtype)
    size = {"height": image_size, "width": image_size}
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size)
    processor_settings = {**_LLAVA_PROCESSOR, "patch_size": vision["patch_size"]}
    proc = LlavaProcessor(
        image_processor=ip, tokenizer=tok, chat_template=LLAVA_CHAT_TEMPLATE, **processor_settings
    )
    return _finish(model, tok), proc


def tiny_llava(seed: int = 0):
    return _llava(dict(_CLIP_VISION), _text_config, 30, seed)


def tiny_llava_next(seed: int = 0):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = word_tokenizer(_IMAGE_TOKENS["llava_next"], image_token="<image>")
    pinpoints = [[30, 60], [60, 30], [60, 60]]
    config = LlavaNextConfig(
        vision_config=dict(_CLIP_VISION),
        text_config=dict(model_type="llama", **_text_config(len(tok))),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, **_LLAVA_PROCESSOR)
    return _finish(model, tok), proc


def _tiny_qwen(family: str, seed: int):
    from transformers import Qwen2VLImageProcessorPil

    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=TEXT_HIDDEN,
            num_heads=4,
            patch_size=6,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=6,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=24,
            out_hidden_size=TEXT_HIDDEN,
            fullatt_block_indexes=[1],
        )
    tok = word_tokenizer(_IMAGE_TOKENS[family])
    ids = {t: tok.convert_tokens_to_ids(t) for t in _IMAGE_TOKENS[family]}
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    config = Config(
        vision_config=vision,
        text_config=_text_config(
            len(tok),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
            },
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Model(config)
    ip = Qwen2VLImageProcessorPil(
        patch_size=6,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 12 * 12 * 4, "longest_edge": 36 * 36},
    )
    proc = image_only_qwen_processor_class()(image_processor=ip, tokenizer=tok)
    return _finish(model, tok), proc


def tiny_qwen2_vl(seed: int = 0):
    return _tiny_qwen("qwen2_vl", seed)


def tiny_qwen2_5_vl(seed: int = 0):
    return _tiny_qwen("qwen2_5_vl", seed)


def tiny_instructblip(seed: int = 0):
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    # InstructBlipProcessor crashes when the LM tokenizer carries an `image_token` attribute.
    tok = word_tokenizer(_IMAGE_TOKENS["instructblip"])
    num_query = 8
    config = InstructBlipConfig(
        # The vision default initializer_range (1e-10) would make every image look the same.
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=30,
            patch_size=6,
            initializer_range=0.02,
        ),
        qformer_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=32,
            max_position_embeddings=64,
        ),
        text_config=dict(model_type="llama", **_text_config(len(tok))),
        num_query_tokens=num_query,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    # The query tokens start at zero: every query would read the image identically, unlike a trained model.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)
    ip = BlipImageProcessorPil(size={"height": 30, "width": 30})
    qtok = word_tokenizer([])
    qtok.padding_side = "right"
    proc = InstructBlipProcessor(
        image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=num_query
    )
    return _finish(model, tok), proc


def full_size_llava(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    text_layers: int = 32,
    vision_layers: int = 24,
    seed: int = 0,
):
    """``(model, processor)`` with the shapes of ``llava-hf/llava-1.5-7b-hf`` and random weights.

    CLIP ViT-L/14 at 336 px (576 image tokens per image), a LLaMA-7B text decoder (32 layers, 32
    heads, hidden 4096), built on ``device`` in ``dtype`` without any download: for benchmarks of real
    sizes (about 14 GB in float16). ``text_layers`` / ``vision_layers`` shorten the towers. The
    word-level tokenizer is filled to the 32064 entries of the vocabulary, so that any generated id
    decodes to a word (``veridical eval`` runs on this model write non-empty answers).
    """
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = dict(  # LLaVA's vocabulary, whatever the (word-level) tokenizer's size
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=text_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _llava(vision, lambda _: text, 336, seed, device, dtype, vocab_size=text["vocab_size"])


#: Qwen2.5-VL's chat format, one user turn with one image (the released template without its system turn).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def full_size_qwen2_5_vl(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    text_layers: int = 28,
    vision_layers: int = 32,
    seed: int = 0,
    vocab_size: int = 152064,
):
    """``(model, processor)`` with the shapes of ``Qwen/Qwen2.5-VL-7B-Instruct`` and random weights.

    Text decoder: hidden 3584, 28 layers, 28 heads with 4 key/value heads, MLP 18944, vocabulary
    152064, M-RoPE sections (16, 24, 24), rope theta 1e6. Vision tower: 32 blocks of width 1280 (16
    heads, MLP 3420), 14 px patches merged 2x2 into tokens of width 3584, window attention (112 px
    windows) with full attention in blocks 7, 15, 23 and 31. These are the released ``config.json``'s
    values (the vision ones are also the defaults of ``Qwen2_5_VLVisionConfig`` in transformers 5.24,
    models/qwen2_5_vl/configuration_qwen2_5_vl.py, but for its width); 8,292,166,656 parameters, about
    16.6 GB in float16. The image processor uses the released pixel bounds (56x56 to 28x28x1280 px): a
    672x672 image gives 576 image tokens, as many as LLaVA-1.5. ``text_layers`` / ``vision_layers``
    shorten the towers (full attention stays on the blocks that remain of 7, 15, 23, 31, else the last
    block); ``vocab_size`` shrinks the vocabulary (a CPU test: the two 152064 x 3584 matrices take most
    of the build time).

    The tokenizer is a word-level one filled to the full vocabulary, so the special token ids differ
    from the released tokenizer's (151655 for ``<|image_pad|>``); the config carries this tokenizer's
    ids.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    specials = [*_IMAGE_TOKENS["qwen2_5_vl"], "<|im_start|>", "<|im_end|>"]
    tok = word_tokenizer(specials, words=_filled_words(vocab_size, len(specials)))
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    full_attention = [i for i in (7, 15, 23, 31) if i < vision_layers] or [vision_layers - 1]
    vision = dict(
        depth=vision_layers,
        hidden_size=1280,
        hidden_act="silu",
        intermediate_size=3420,
        num_heads=16,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=112,
        out_hidden_size=3584,
        fullatt_block_indexes=full_attention,
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=text_layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = _build(Qwen2_5_VLForConditionalGeneration, config, seed, device, dtype)
    ip = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
    )
    proc = image_only_qwen_processor_class()(
        image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE
    )
    return _finish(model, tok), proc


FACTORIES = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "instructblip": tiny_instructblip,
}


def tiny_model(family: str, seed: int = 0):
    """``(model, processor)`` of a tiny random-weight model of ``family``."""
    try:
        factory = FACTORIES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; tiny models exist for {', '.join(FAMILIES)}") from None
    return factory(seed)


def random_images(n: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((40, 50), (30, 30))):
    """``n`` noise images of alternating sizes (PIL), reproducible from ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray((rng.random((*sizes[i % len(sizes)], 3)) * 255).astype("uint8")) for i in range(n)
    ]


def tiny_inputs(family: str, processor, questions: list[str], seed: int = 0):
    """Processor outputs for one image per question, left-padded, as a real user builds them."""
    from veridical.adapters import ADAPTERS

    tag = ADAPTERS[family].image_placeholder
    texts = [f"USER: {tag} {q} ASSISTANT:" for q in questions]
    return processor(images=random_images(len(texts), seed), text=texts, return_tensors="pt", padding=True)

"""The world's tiny LLaVA: word-level tokenizer, processor and model config, built from scratch."""

from __future__ import annotations

from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from veridical.evals.world.scenes import CLASSES, IMAGE_SIZE
from veridical.tiny import LLAVA_CHAT_TEMPLATE, word_tokenizer

#: Words of the prompts veridical's evals send (CHAIR's and POPE's), the captions and the answers.
WORDS = "user assistant : please describe this image in detail . is there a an the ? , and yes no".split()
PATCH = 8


def world_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(["<image>"], words=WORDS + sorted(CLASSES), image_token="<image>", lowercase=True)


def world_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=world_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def world_model(processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """0.66 M parameters: CLIP vision (2 layers, width 128, 6x6 patches = 36 image tokens) and Llama
    (2 layers, width 128, 4 heads)."""
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return model

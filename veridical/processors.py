"""Processor workarounds for a stack without torchvision."""

from __future__ import annotations

from functools import cache


@cache
def image_only_qwen_processor_class() -> type:
    """Qwen2-VL's processor without its video processor, which cannot be built without torchvision.

    ``AutoProcessor.from_pretrained`` on a Qwen2-VL folder then silently returns only the tokenizer;
    ``image_only_qwen_processor_class().from_pretrained(folder)`` loads the image processor too.
    """
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor

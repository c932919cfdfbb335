"""Loading a model and its processor for ``veridical eval``, and turning questions into prompts."""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch import nn

from veridical.adapters import ADAPTERS, get_adapter
from veridical.errors import VeridicalError

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@lru_cache(maxsize=1)  # a sweep runs many cells on one model: load it once
def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto") -> tuple[nn.Module, object]:
    """``(model, processor)`` from a hub id, a local folder or ``world``/``world-noprior`` (the shipped
    synthetic-world checkpoints); the processor pads on the left."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from veridical.evals.world.evaluate import WORLD_MODELS

    name_or_path = str(WORLD_MODELS.get(name_or_path, name_or_path))
    if dtype not in DTYPES:
        raise VeridicalError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in ADAPTERS:
        raise VeridicalError(
            f"{name_or_path} is a {config.model_type!r} model; supported families: {', '.join(ADAPTERS)}"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = DTYPES[dtype]
    if torch_dtype == "auto" and device == "cpu":
        torch_dtype = torch.float32  # half precision is slow and lossy on CPUs
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    if not hasattr(processor, "image_processor"):
        processor = _image_processor_fallback(name_or_path, config.model_type)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _image_processor_fallback(name_or_path: str, model_type: str):
    # Without torchvision, AutoProcessor returns only the tokenizer for Qwen2-VL folders (its video
    # processor cannot be built); an image-only processor class loads the rest.
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from veridical.processors import image_only_qwen_processor_class

        return image_only_qwen_processor_class().from_pretrained(name_or_path)
    raise VeridicalError(f"{name_or_path}: the processor has no image processor")


def build_prompt(model: nn.Module, processor, question: str) -> str:
    """The question with one image, through the processor's chat template when it has one."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    placeholder = get_adapter(model).image_placeholder
    return f"USER: {placeholder} {question} ASSISTANT:".replace("  ", " ")

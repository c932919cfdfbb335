"""Loading a model and its processor for ``veridical eval``, and turning questions into prompts."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from veridical.adapters import ADAPTERS, get_adapter
from veridical.errors import VeridicalError
from veridical.evals.world.shipped import model_path

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@lru_cache(maxsize=1)  # a sweep runs many cells on one model: load it once
def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto") -> tuple[nn.Module, object]:
    """``(model, processor)`` from a hub id, a local folder or ``world``/``world-noprior`` (the shipped
    synthetic-world checkpoints); the processor pads on the left."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    name_or_path = model_path(name_or_path)
    if dtype not in DTYPES:
        raise VeridicalError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_device(device)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise VeridicalError(_load_failure(name_or_path, err)) from None
    if config.model_type not in ADAPTERS:
        raise VeridicalError(
            f"{name_or_path} is a {config.model_type!r} model; supported families: {', '.join(ADAPTERS)}"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = DTYPES[dtype]
    if torch_dtype == "auto" and device == "cpu":
        torch_dtype = torch.float32  # half precision is slow and lossy on CPUs
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise VeridicalError(_load_failure(name_or_path, err)) from None
    if not hasattr(processor, "image_processor"):
        processor = _image_processor_fallback(name_or_path, config.model_type)
    processor.tokenizer.padding_side = "left"
    return model, processor


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before anything loads."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise VeridicalError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise VeridicalError(f"--device {device}: this machine has no CUDA GPU; use --device cpu (or auto)")
    if kind == "cuda" and torch.device(device).index is not None:
        if torch.device(device).index >= torch.cuda.device_count():
            raise VeridicalError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise VeridicalError(f"--device {device}: MPS is not available here; use --device cpu")


def _load_failure(name_or_path: str, err: Exception) -> str:
    """One line for a model that cannot be loaded (offline, mistyped, incomplete folder)."""
    if Path(name_or_path).exists():
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"cannot load the model in {name_or_path}: {reason}"
    return (
        f"cannot load model {name_or_path!r}: it is not a local folder and not in the Hugging Face cache "
        "(or the hub is unreachable); download it first (`hf download "
        + name_or_path
        + "`) or pass its folder"
    )


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

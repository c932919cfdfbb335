"""Calibration sets for methods that choose heads on the model (ACT): POPE questions with their labels."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from veridical.evals.io import DataFileError
from veridical.evals.models import build_prompt
from veridical.evals.samples import pope_samples


def answer_ids(tokenizer, label: str) -> torch.Tensor:
    """Token ids of a POPE answer as the model would start it ("Yes"; "yes" for lower-case vocabularies)."""
    for text in (label.capitalize(), label.lower()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and tokenizer.unk_token_id not in ids:
            return torch.tensor(ids)
    raise DataFileError(f"the tokenizer cannot spell the answer {label!r} without unknown tokens")


def pope_calibration_samples(
    model: nn.Module,
    processor,
    questions_file: str | Path,
    image_dir: str | Path,
    limit: int = 32,
    seed: int = 0,
) -> list[tuple[dict, torch.Tensor]]:
    """``limit`` random POPE questions as ``(inputs, answer_ids)`` pairs, one prompt each."""
    samples = pope_samples(questions_file, image_dir)
    if limit < len(samples):
        samples = random.Random(seed).sample(samples, limit)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pairs = []
    for sample in samples:
        prompt = build_prompt(model, processor, sample.question)
        inputs = processor(images=[sample.load_image()], text=[prompt], return_tensors="pt")
        inputs = {
            k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()
        }
        pairs.append((inputs, answer_ids(processor.tokenizer, sample.meta["label"]).to(device)))
    return pairs

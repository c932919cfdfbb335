"""One forward of the prompts with and without their image, stacked as one batch.

VHR chooses heads by comparing each head's output with and without the image, layer by layer with
the earlier layers already modified; PAINT's head modulation measures the same divergence. Running
both versions of every prompt as rows of one batch gives both at every layer in a single pass.
"""

from __future__ import annotations

from typing import Any

import torch

from veridical.adapters import Inputs, ModelAdapter
from veridical.attention import AttentionHook, auxiliary_forwards, intercept_attention


def _left_pad(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    pad = tensor.new_full((tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:]), value)
    return torch.cat([pad, tensor], dim=1)


def with_and_without_image(adapter: ModelAdapter, inputs: Inputs) -> dict[str, Any]:
    """``2B`` rows: the ``B`` prompts as given, then the same prompts with the image removed.

    Both halves are left-padded to one width, so the last column is every row's last prompt token.
    Image tensors (pixels, grids, Q-Former inputs) belong to the first half only.
    """
    text_only = adapter.without_image(inputs)
    ids = inputs["input_ids"]
    width = max(ids.shape[1], text_only["input_ids"].shape[1])
    stacked: dict[str, Any] = dict(inputs)
    stacked["input_ids"] = torch.cat(
        [
            _left_pad(ids, width, adapter.pad_token_id),
            _left_pad(text_only["input_ids"], width, adapter.pad_token_id),
        ]
    )
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    stacked["attention_mask"] = torch.cat(
        [_left_pad(mask, width, 0), _left_pad(text_only["attention_mask"], width, 0)]
    )
    for key, value in inputs.items():
        # Other per-token tensors (Qwen's mm_token_type_ids): text rows are all-text (zeros).
        if (
            key in ("input_ids", "attention_mask")
            or not torch.is_tensor(value)
            or value.shape[:2] != ids.shape
        ):
            continue
        stacked[key] = torch.cat([_left_pad(value, width, 0), torch.zeros_like(_left_pad(value, width, 0))])
    return stacked


@torch.no_grad()
def paired_forward(adapter: ModelAdapter, inputs: Inputs, *hooks: AttentionHook) -> None:
    """Run :func:`with_and_without_image` rows once with ``hooks`` attached (no cache kept)."""
    stacked = with_and_without_image(adapter, inputs)
    position_ids = adapter.prefill_position_ids(stacked)
    with intercept_attention(adapter.model, *hooks), auxiliary_forwards():
        adapter.prefill_module(stacked)(
            **stacked, position_ids=position_ids, use_cache=False, logits_to_keep=1
        )


def last_token_head_outputs(outputs: torch.Tensor, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head outputs ``(B, heads, head_dim)`` at the last prompt token: with image, without image."""
    last = outputs[:, -1].float()
    return last[:prompts], last[prompts:]

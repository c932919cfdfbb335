"""Contrast branches batched into the main forward: one forward per generated token, not two.

A :class:`~veridical.branch.Branch` runs its prompt on its own (once), then *joins* the KV cache that
``generate()`` holds: its rows go below the main rows, left-padded to the main prompt's length. From
the next token on, every forward ``generate()`` makes runs all rows at once; each branch's logits are
handed to its processor and ``generate()`` sees only its own rows (logits, hidden states,
attentions). Beam search reorders every branch's rows with the main ones. When the ``with`` block
ends, the cache holds the main rows alone again.

The weights are read once per token for all rows, which is what makes a two-branch decoder cost
close to one forward on a GPU. A branch stays a separate forward (same results, about twice the
cost) when it cannot join: a cache other than a plain ``DynamicCache`` (static or sliding-window
caches), a branch prompt longer than the main prompt, or no ``with`` block around ``generate()``.

Head methods see each branch's rows with that branch's own image positions, padding and cache
length (see :class:`veridical.attention.ForwardContext`), exactly as in a separate forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from veridical.adapters import get_adapter
from veridical.attention import SEGMENTS, Segment, fused_rows, in_auxiliary_forward, sequence_of
from veridical.outputs import cache_kwarg, output_cache

if TYPE_CHECKING:
    from veridical.branch import Branch


def pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """``tensor`` with ``columns`` zeros prepended along ``dim``."""
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def stack_padded(tensors: list[torch.Tensor], pads: list[int], dim: int) -> torch.Tensor:
    """Rows of several sequences in one tensor, each left-padded by its ``pads`` entry along ``dim``."""
    return torch.cat([pad_left(tensor, pad, dim) for tensor, pad in zip(tensors, pads, strict=True)])


class BranchFusion:
    """Batches the contrast branches of ``decoders`` into ``model``'s own forwards inside ``with``.

    ``decoders`` are :class:`~veridical.decoders.contrastive.ContrastiveDecoder` instances (anything
    with a ``fusion`` attribute its branch reads); ``veridical.generate`` enters one fusion for all
    of them, and ``with VCD(model, inputs) as vcd: model.generate(..., logits_processor=[vcd])``
    enters one for a single decoder.
    """

    def __init__(self, model: nn.Module, decoders: Iterable[Any]):
        self.model = model
        self.module = get_adapter(model).decode_module()
        self.cache_name = cache_kwarg(self.module)
        self.decoders = list(decoders)
        self.cache: Any = None
        self.branches: list[Branch] = []
        self.rows = 0
        #: What the forward running now is: a main prefill, a fused step, or neither (``None``).
        self._running: str | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> BranchFusion:
        for decoder in self.decoders:
            decoder.fusion = self
        self._handles = [
            self.module.register_forward_pre_hook(self._before, with_kwargs=True),
            self.module.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for decoder in self.decoders:
            decoder.fusion = None
        fused_rows(None)
        self._release()

    # -- joining -------------------------------------------------------------------------------
    def join(self, branch: Branch) -> bool:
        """Move ``branch``'s freshly prefilled cache into generate()'s; ``False`` if it cannot join."""
        cache, own = self.cache, branch.cache
        if cache is None or own is None or not _plain_dynamic(cache) or not _plain_dynamic(own):
            return False
        rows, main_len, branch_len = self.rows, cache.get_seq_length(), own.get_seq_length()
        if own.layers[0].keys.shape[0] != rows or branch_len > main_len or branch.previous_ids is not None:
            return False
        pad = main_len - branch_len
        for layer, extra in zip(cache.layers, own.layers, strict=True):
            layer.keys = stack_padded([layer.keys, extra.keys], [0, pad], dim=2)
            layer.values = stack_padded([layer.values, extra.values], [0, pad], dim=2)
        segments = getattr(cache, SEGMENTS, None) or [Segment(rows, 0, None)]
        setattr(cache, SEGMENTS, [*segments, Segment(rows, pad, sequence_of(self.model, own))])
        # generate() reorders beams through the cache it holds; every branch's rows must follow.
        cache.reorder_cache = self._reorder
        branch.pad = pad
        self.branches.append(branch)
        return True

    def _reorder(self, beam_idx: torch.LongTensor) -> None:
        offsets = torch.arange(len(self.branches) + 1, device=beam_idx.device) * self.rows
        DynamicCache.reorder_cache(self.cache, (offsets[:, None] + beam_idx[None, :]).flatten())

    def _release(self) -> None:
        """Leave generate()'s cache with the main rows only, as if no branch had joined."""
        cache = self.cache
        if cache is not None and self.branches:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[: self.rows], layer.values[: self.rows]
            del cache.reorder_cache
            delattr(cache, SEGMENTS)
        self.cache, self.branches = None, []

    # -- the forwards generate() makes ----------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if in_auxiliary_forward():
            return None
        self._running = None
        cache = kwargs.get(self.cache_name)
        if cache is not None and cache.get_seq_length() == 0:
            self._running = "prefill"  # generate() starts a new sequence, captured in _after
            return None
        if cache is None or cache is not self.cache or not self.branches:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or args or ids.shape[0] != self.rows:
            raise RuntimeError(
                "a fused contrast branch expects generate() to pass one new token per row by keyword"
            )
        queries, past = ids.shape[1], cache.get_seq_length()
        if queries != 1:
            raise RuntimeError(f"a fused contrast branch expects one new token per step, got {queries}")
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(self.rows, past + queries, dtype=torch.long, device=ids.device)
        positions = kwargs.get("position_ids")
        if positions is None:  # what the decoder computes itself without position ids
            positions = torch.arange(past, past + queries, device=ids.device).expand(self.rows, -1)
        masks, all_positions = [mask], [positions]
        for branch in self.branches:
            branch.advance(queries)
            branch_mask = pad_left(branch.attention_mask.to(mask.dtype), branch.pad, dim=1)
            masks.append(branch_mask)
            all_positions.append(_positions_like(positions, branch.position_ids, branch_mask))
        segments = getattr(cache, SEGMENTS)
        kwargs = dict(kwargs)
        for key, value in kwargs.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == self.rows:
                kwargs[key] = value.repeat(len(segments), *[1] * (value.dim() - 1))
        kwargs["attention_mask"] = torch.cat(masks)
        kwargs["position_ids"] = torch.cat(all_positions, dim=0 if positions.dim() == 2 else 1)
        self._running = "fused"
        fused_rows(segments)
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if in_auxiliary_forward():
            return None
        running, self._running = self._running, None
        if running == "prefill":
            # A new sequence: branches can join the cache this prefill built.
            self._release()
            self.cache = output_cache(output)
            self.rows = int(output.logits.shape[0])
        if running != "fused":
            return None
        fused_rows(None)
        logits = output.logits
        for index, branch in enumerate(self.branches, start=1):
            branch.pending = logits[index * self.rows : (index + 1) * self.rows, -1, :].float()
        for key, value in output.items():
            if torch.is_tensor(value) and value.shape[0] > self.rows:
                output[key] = value[: self.rows]
            elif isinstance(value, tuple) and value and all(torch.is_tensor(v) for v in value):
                output[key] = tuple(v[: self.rows] for v in value)
        return output


def _plain_dynamic(cache: Any) -> bool:
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _positions_like(main: torch.Tensor, branch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A branch's position ids of one new token in the layout ``generate()`` passes for the main rows.

    ``(rows, 1)`` for 1D RoPE; Qwen-VL's M-RoPE takes ``(3, rows, 1)``, or ``(4, rows, 1)`` with the
    text positions (counted over the attention mask, as ``generate()`` counts them) first.
    """
    branch = branch.to(main.device, main.dtype)
    if main.shape[:-2] == branch.shape[:-2]:
        return branch
    if main.dim() == 3 and branch.dim() == 3 and main.shape[0] == branch.shape[0] + 1:
        text = (mask.long().cumsum(-1) - 1)[:, -1:].to(main.device, main.dtype)
        return torch.cat([text[None], branch])
    raise RuntimeError(f"cannot lay out branch positions {tuple(branch.shape)} like {tuple(main.shape)}")

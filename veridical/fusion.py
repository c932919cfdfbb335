"""Contrast branches batched into the main forward: one forward per generated token, not two.

A :class:`~veridical.branch.Branch` runs its prompt on its own (once), then *joins* the KV cache that
``generate()`` holds: its rows go below the main rows, left-padded to the main prompt's length. From
the next token on, every forward ``generate()`` makes runs all rows at once; each branch's logits are
handed to its processor and ``generate()`` sees only its own rows (logits, hidden states,
attentions). Beam search reorders every branch's rows with the main ones. When the ``with`` block
ends, the cache holds the main rows alone again.

The weights are read once per token for all rows, which is what makes a two-branch decoder cost
close to one forward on a GPU. A branch stays a separate forward (same results, about twice the
cost) when it cannot join: a cache other than a plain ``DynamicCache`` or ``StaticCache``
(sliding-window caches), a branch prompt longer than the main prompt, or no ``with`` block around
``generate()``.

With a ``StaticCache`` (``cache_implementation="static"``, which ``generate()`` compiles) the
branch rows are appended to the same static cache once, after the eager prefill, so every decode
step is one graph of fixed shapes: the forward wrapper decides from Python state that does not
change from one step to the next (no tensor is read on the host), and each branch's mask and positions are
derived from the main rows' by tensors fixed at joining (the branch's prompt columns and its
position offset), not by growing a mask.

Head methods see each branch's rows with that branch's own image positions, padding and cache
length (see :class:`veridical.attention.ForwardContext`), exactly as in a separate forward.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

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

    ``decoders`` are :class:`~veridical.contrastive.ContrastiveDecoder` instances (anything
    with a ``fusion`` attribute its branch reads); ``veridical.generate`` enters one fusion for all
    of them, and ``with VCD(model, inputs) as vcd: model.generate(..., logits_processor=[vcd])``
    enters one for a single decoder.
    """

    def __init__(self, model: nn.Module, decoders: Iterable[Any]):
        self.model = model
        self.adapter = get_adapter(model)
        self.module = self.adapter.decode_module()
        self.cache_name = cache_kwarg(self.module)
        self.decoders = list(decoders)
        self.cache: Any = None
        self.branches: list[Branch] = []
        self.rows = 0
        #: Static caches: each layer with its own key and value buffers of the main rows, kept while
        #: branches join; the main rows' positions of the first generated token (from the prefill).
        self._static_buffers: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self._main_next: torch.Tensor | None = None
        self._prompt_columns: torch.Tensor | None = None
        #: What the forward running now is: a main prefill, a fused step, or neither (``None``).
        self._running: str | None = None
        self._forward: Any = None

    def __enter__(self) -> BranchFusion:
        for decoder in self.decoders:
            decoder.fusion = self
        # A wrapper of the module's own forward rather than forward hooks: torch.compile (what
        # generate() does to a static-cache decode step) skips nn.Module.__call__ and traces the hooks
        # and the forward as separate frames, three graphs per step; one forward frame is one graph.
        module, original = self.module, self.module.forward

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            changed = self._before(module, args, kwargs)
            if changed is not None:
                args, kwargs = changed
            output = original(*args, **kwargs)
            result = self._after(module, args, kwargs, output)
            return output if result is None else result

        module.forward = forward
        self._forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.module.__dict__.get("forward") is self._forward:
            del self.module.forward
        self._forward = None
        for decoder in self.decoders:
            decoder.fusion = None
        fused_rows(None)
        self._release()

    # -- joining -------------------------------------------------------------------------------
    def join(self, branch: Branch) -> bool:
        """Move ``branch``'s freshly prefilled cache into generate()'s; ``False`` if it cannot join."""
        cache, own = self.cache, branch.cache
        if cache is not None and own is not None and _plain_static(cache) and _plain_dynamic(own):
            return self._join_static(branch)
        if cache is None or own is None or not _plain_dynamic(cache) or not _plain_dynamic(own):
            return False
        rows, main_len, branch_len = self.rows, cache.get_seq_length(), own.get_seq_length()
        if own.layers[0].keys.shape[0] != rows or branch_len > main_len or branch.previous_ids is not None:
            return False
        pad = main_len - branch_len
        for layer, extra in zip(cache.layers, own.layers, strict=True):
            layer.keys = stack_padded([layer.keys, extra.keys], [0, pad], dim=2)
            layer.values = stack_padded([layer.values, extra.values], [0, pad], dim=2)
        return self._joined(branch, own, pad)

    def _join_static(self, branch: Branch) -> bool:
        """:meth:`join` for a ``StaticCache``: the branch's rows are appended below the main ones once.

        Each layer's key and value buffers are replaced by ones with the branch's rows added (left-padded
        to the main prompt's length, as in :meth:`join`); the main rows' buffers are kept and get the
        main rows back in :meth:`_release`. The branch's attention mask over the prompt columns and its
        position offset to the main rows are fixed here, so a decode step only selects and adds.
        """
        cache, own, rows = self.cache, branch.cache, self.rows
        main_len, branch_len = int(cache.get_seq_length()), own.get_seq_length()
        if own.layers[0].keys.shape[0] != rows or branch_len > main_len or branch.previous_ids is not None:
            return False
        branch_next = branch.position_ids + 1  # the branch's positions of the first generated token
        main_next = self._main_next
        if main_next is not None and main_next.dim() == 3 == branch_next.dim():
            if main_next.shape[0] == branch_next.shape[0] + 1:
                # Qwen-VL's text positions first, counted over the attention mask as generate() counts them.
                text = branch.attention_mask.long().sum(-1, keepdim=True)[None]
                branch_next = torch.cat([text.to(branch_next), branch_next])
        if self._main_next is None or self._main_next.shape != branch_next.shape:
            return False
        pad = main_len - branch_len
        if not self.branches:
            self._static_buffers = [(layer, layer.keys, layer.values) for layer in cache.layers]
        for layer, extra in zip(cache.layers, own.layers, strict=True):
            for name, added in (("keys", extra.keys), ("values", extra.values)):
                held = getattr(layer, name)
                grown = held.new_zeros((held.shape[0] + rows, *held.shape[1:]))
                grown[: held.shape[0]] = held
                grown[held.shape[0] :, :, pad:main_len] = added.to(held.dtype)
                torch._dynamo.mark_static_address(grown)  # as StaticLayer marks its own buffers
                setattr(layer, name, grown)
            layer.batch_size = layer.keys.shape[0]
        max_len = cache.layers[0].keys.shape[2]
        columns = torch.arange(max_len, device=branch.attention_mask.device)
        self._prompt_columns = (columns < main_len)[None, None, None, :]
        prompt_mask = torch.zeros(rows, max_len, dtype=torch.bool, device=columns.device)
        prompt_mask[:, pad:main_len] = branch.attention_mask.bool()
        branch.static_mask = prompt_mask[:, None, None, :]
        branch.position_offset = branch_next.to(self._main_next.device) - self._main_next
        return self._joined(branch, own, pad)

    def _joined(self, branch: Branch, own: Any, pad: int) -> bool:
        """Record a branch whose rows now sit below the others in generate()'s cache (``pad`` columns of
        left padding), with ``own`` its former cache; both joins end here."""
        cache, rows = self.cache, self.rows
        segments = getattr(cache, SEGMENTS, None) or [Segment(rows, 0, None)]
        setattr(cache, SEGMENTS, [*segments, Segment(rows, pad, sequence_of(self.model, own))])
        # generate() reorders beams through the cache it holds; every branch's rows must follow.
        cache.reorder_cache = self._reorder
        branch.pad = pad
        self.branches.append(branch)
        return True

    def _reorder(self, beam_idx: torch.LongTensor) -> None:
        offsets = torch.arange(len(self.branches) + 1, device=beam_idx.device) * self.rows
        order = (offsets[:, None] + beam_idx[None, :]).flatten()
        if _plain_static(self.cache):
            # In place: the compiled decode step holds these buffers' addresses.
            for layer in self.cache.layers:
                layer.keys.copy_(layer.keys.index_select(0, order.to(layer.keys.device)))
                layer.values.copy_(layer.values.index_select(0, order.to(layer.values.device)))
            return
        DynamicCache.reorder_cache(self.cache, order)

    def _release(self) -> None:
        """Leave generate()'s cache with the main rows only, as if no branch had joined."""
        cache = self.cache
        if cache is not None and self.branches:
            if self._static_buffers:
                for layer, keys, values in self._static_buffers:
                    keys.copy_(layer.keys[: self.rows])
                    values.copy_(layer.values[: self.rows])
                    layer.keys, layer.values, layer.batch_size = keys, values, self.rows
            else:
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[: self.rows], layer.values[: self.rows]
            del cache.reorder_cache
            delattr(cache, SEGMENTS)
        self.cache, self.branches, self._static_buffers = None, [], []

    # -- the forwards generate() makes ----------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if in_auxiliary_forward():
            return None
        self._running = None
        cache = kwargs.get(self.cache_name)
        if cache is not None and _plain_static(cache):
            # Decided from Python state only: a compiled decode step cannot branch on the cache's length.
            if cache is not self.cache:
                self._running = "prefill"
                positions = kwargs.get("position_ids")
                # generate() numbers each decode step one past the prompt's last column, in every axis.
                self._main_next = None if positions is None else positions[..., -1:] + 1
                return None
            return self._static_step(args, kwargs) if self.branches else None
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

    def _static_step(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A decode step on a static cache with branches joined: the same shapes and Python state at every
        step, so ``generate()``'s compiled forward captures it once."""
        ids, mask, positions = (
            kwargs.get("input_ids"),
            kwargs.get("attention_mask"),
            kwargs.get("position_ids"),
        )
        if args or ids is None or ids.shape != (self.rows, 1) or not _mask_4d(mask):
            raise RuntimeError(
                "a fused contrast branch on a static cache expects generate() to pass one new token per row, "
                "a 4D attention mask and position ids by keyword"
            )
        if positions is None or positions.shape != self._main_next.shape:
            raise RuntimeError("a fused contrast branch on a static cache got position ids it cannot follow")
        all_positions = [positions] + [positions + branch.position_offset for branch in self.branches]
        if isinstance(mask, dict):  # one mask per attention type (Qwen-VL): each gets the branch rows
            mask = {kind: self._static_masks(value) for kind, value in mask.items()}
        else:
            mask = self._static_masks(mask)
        segments = getattr(kwargs[self.cache_name], SEGMENTS)
        kwargs = dict(kwargs)
        for key, value in kwargs.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == self.rows:
                kwargs[key] = value.repeat(len(segments), *[1] * (value.dim() - 1))
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = torch.cat(all_positions, dim=0 if positions.dim() == 2 else 1)
        self._running = "fused"
        fused_rows(segments)
        return args, kwargs

    def _static_masks(self, mask: torch.Tensor) -> torch.Tensor:
        """The main rows' 4D mask of a static decode step with each branch's rows below it."""
        masks = [mask]
        for branch in self.branches:
            # Prompt columns from the branch's own padding; generated columns (causal) as the main rows.
            if mask.dtype == torch.bool:
                prompt = branch.static_mask
            else:  # an additive float mask
                blocked = torch.finfo(mask.dtype).min
                prompt = torch.where(branch.static_mask, 0.0, blocked).to(mask.dtype)
            masks.append(torch.where(self._prompt_columns, prompt, mask))
        return torch.cat(masks)

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


def _mask_4d(mask: Any) -> bool:
    masks = mask.values() if isinstance(mask, dict) else [mask]
    return bool(masks) and all(torch.is_tensor(m) and m.dim() == 4 for m in masks)


def _plain_static(cache: Any) -> bool:
    return type(cache) is StaticCache and all(type(layer) is StaticLayer for layer in cache.layers)


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

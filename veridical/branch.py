"""A second forward branch that follows a running ``generate()`` call token by token.

Contrastive decoders compare the model's next-token logits with those of the same model on
distorted inputs. :class:`Branch` runs those distorted inputs on its own KV cache: the prompt once
(prefill), then one token per step. It sees only what a logits processor sees (the full
``input_ids`` of every row), so it recovers on its own

- how many rows each prompt was expanded to (``num_beams`` and ``num_return_sequences``),
- which row each current row continues after beam search reordered them (by matching prefixes),

and works unchanged under greedy, sampling and beam search. Inside a
:class:`~veridical.fusion.BranchFusion` it runs only its prompt on its own, then joins the main
forward's batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from veridical.adapters import Inputs, ModelAdapter
from veridical.attention import auxiliary_forwards
from veridical.errors import InputError
from veridical.outputs import cache_kwarg, output_cache

if TYPE_CHECKING:
    from veridical.fusion import BranchFusion


class Branch:
    """Next-token logits of ``model`` on ``branch_inputs``, kept in step with a generate() call.

    ``main_input_ids`` is the prompt the main branch starts from; the first call checks that the
    rows handed in continue it.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        branch_inputs: Inputs,
        main_input_ids: torch.Tensor,
        fusion: BranchFusion | None = None,
    ):
        self.adapter = adapter
        self.inputs = dict(branch_inputs)
        self.prompt_ids = main_input_ids
        self.cache: Any = None
        self.attention_mask: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None
        self.previous_ids: torch.Tensor | None = None
        self.expansion = 1
        self.fusion = fusion
        #: Set once the branch joined the main forward's batch: its logits arrive in ``pending``.
        self.fused = False
        self.pending: torch.Tensor | None = None
        #: Left padding of this branch's rows in the shared cache.
        self.pad = 0

    @torch.no_grad()
    def next_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 ``(rows, vocab)`` logits for the token that follows each row of ``input_ids``."""
        with auxiliary_forwards():
            logits = self._prefill(input_ids) if self.previous_ids is None else self._step(input_ids)
        self.previous_ids = input_ids
        return logits

    # -- internals --------------------------------------------------------------------------
    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, prompt_len = self.prompt_ids.shape
        rows = input_ids.shape[0]
        if rows % batch or input_ids.shape[1] != prompt_len:
            raise InputError(
                f"the contrast branch was built for {batch} prompt(s) of length {prompt_len} but generate() "
                f"passed {rows} row(s) of length {input_ids.shape[1]}: build the method with the same "
                "inputs you pass to generate(), and a new one for every generate() call"
            )
        self.expansion = rows // batch
        expected = self.prompt_ids.to(input_ids.device).repeat_interleave(self.expansion, dim=0)
        if not torch.equal(expected, input_ids):
            raise InputError("generate() was called with other input_ids than the method was built with")

        inputs = dict(self.inputs)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
            inputs["attention_mask"] = mask
        position_ids = self.adapter.prefill_position_ids(inputs)
        if "inputs_embeds" in inputs:
            # Embeddings built by the method (AvisC's masked image tokens): the ids only gave positions.
            for key in ("input_ids", "mm_token_type_ids", *self.adapter.image_input_keys):
                inputs.pop(key, None)
        module = self.adapter.prefill_module(inputs)
        out = module(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        self.cache = output_cache(out)
        logits = out.logits[:, -1, :].float()
        self.attention_mask = mask
        self.position_ids = self.adapter.next_position_ids(position_ids) - 1
        if self.expansion > 1:
            self.cache.batch_repeat_interleave(self.expansion)
            self.attention_mask = mask.repeat_interleave(self.expansion, dim=0)
            self.position_ids = self.position_ids.repeat_interleave(self.expansion, dim=-2)
            logits = logits.repeat_interleave(self.expansion, dim=0)
        if self.fusion is not None and self.fusion.join(self):
            self.fused, self.cache = True, None
        return logits

    def _step(self, input_ids: torch.Tensor) -> torch.Tensor:
        previous = self.previous_ids
        if input_ids.shape[0] != previous.shape[0] or input_ids.shape[1] != previous.shape[1] + 1:
            raise InputError(
                "the contrast branch lost track of generation (rows or length changed unexpectedly); "
                "build a new method instance for every generate() call"
            )
        if self.fused:  # the main forward ran this branch's rows too; generate() reordered them
            logits, self.pending = self.pending, None
            if logits is None:
                raise RuntimeError("the fused contrast branch got no logits from this step's forward")
            return logits
        parents = self._parents(input_ids[:, :-1], previous)
        identity = torch.arange(len(parents), device=parents.device)
        if not torch.equal(parents, identity):
            self.cache.reorder_cache(parents.to(self.attention_mask.device))
        new_tokens = input_ids[:, -1:]
        self.advance(1)
        module = self.adapter.decode_module()
        kwargs = {cache_kwarg(module): self.cache}
        out = module(
            input_ids=new_tokens,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -1, :].float()

    def advance(self, tokens: int) -> None:
        """Extend the attention mask and positions by ``tokens`` new tokens."""
        new = self.attention_mask.new_ones(self.attention_mask.shape[0], tokens)
        self.attention_mask = torch.cat([self.attention_mask, new], dim=1)
        self.position_ids = self.position_ids + tokens

    def _parents(self, prefixes: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Index of the previous row each current row continues (rows only move within a prompt)."""
        k = self.expansion
        if k == 1:
            if not torch.equal(prefixes, previous):
                raise InputError("generate() rows do not continue the previous step's rows")
            return torch.arange(prefixes.shape[0], device=prefixes.device)
        grouped_now = prefixes.view(-1, k, 1, prefixes.shape[1])
        grouped_before = previous.view(-1, 1, k, previous.shape[1])
        matches = (grouped_now == grouped_before).all(dim=-1)  # (batch, k now, k before)
        if not matches.any(dim=-1).all():
            raise InputError("a beam continues no row of the previous step; the branch cannot follow it")
        within = matches.int().argmax(dim=-1)  # first matching row; equal rows share equal caches
        offsets = torch.arange(0, prefixes.shape[0], k, device=prefixes.device).unsqueeze(1)
        return (within + offsets).flatten()

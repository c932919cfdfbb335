"""OPERA: over-trust penalty and retrospection-allocation beam search."""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
)

from veridical.adapters import Inputs, ModelAdapter, get_adapter
from veridical.attention import (
    SEGMENTS,
    AttentionHook,
    ForwardContext,
    Segment,
    alternative_tokens,
    fused_rows,
    intercept_attention,
    running_prompts,
    sequence_of,
    share_sequence,
)
from veridical.errors import MethodSpecError
from veridical.fusion import stack_padded
from veridical.outputs import cache_kwarg, output_cache
from veridical.params import Choice, Integer, Optional, Real, Rule
from veridical.registry import check_hyperparameters, register_method

PRESETS = {"default": {}, "fast": {"threshold": 25, "num_candidates": 1}}
IMAGE_COLUMNS = ("code", "image")
#: The official code's ``window_size`` (utils.py line 3134): the length of its per-position lists.
_WINDOW = 512


class _LastQueryAttention(AttentionHook):
    """The last layer's attention of each row's newest query (or queries), max over heads.

    Each forward adds ``(rows, newest queries, keys)``; a forward over several prompts adds one entry
    per prompt, each over that prompt's own keys.
    """

    def __init__(self, layer: int):
        self.layers = [layer]
        self.rows: list[torch.Tensor] = []

    def edit_weights(self, module: nn.Module, weights: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        self.rows.append(weights[:, :, -context.newest :, :].amax(dim=1).float())
        return weights


@dataclass
class _Decide:
    """One prompt's request after its look-ahead: score the candidates (see ``OPERA._decide``)."""

    rows: torch.Tensor  # (beams, candidates, keys + 1): each candidate's last-layer attention
    attention: torch.Tensor  # (beams, n, n): the response's earlier rows, normalised
    history: torch.Tensor  # (beams, n): each beam's argmax column at every earlier step
    image: torch.Tensor  # (prompt length,): image positions
    candidates: torch.Tensor  # (beams, candidates)
    candidate_logits: torch.Tensor  # (beams, candidates)
    vocab: int


@dataclass
class _Decision:
    """What ``OPERA._decide`` answers one prompt."""

    log_probs: torch.Tensor  # (beams, vocab): the step's scores if it does not roll back
    response: torch.Tensor  # (beams, candidates, n + 1): each candidate's normalised response row
    history: torch.Tensor  # (beams, n + 1)
    location: int  # the step's argmax column (mode over beams)
    may_roll_back: bool  # the recurrence test passed: retrospection is worth checking


@dataclass
class _Advance:
    """One prompt's request: a beam-search step with these log-probabilities (see _BeamState)."""

    state: _BeamState
    log_probs: torch.Tensor
    criteria: StoppingCriteriaList


@dataclass
class _LookAhead:
    """One prompt's request: each beam's candidate tokens ``(beams, candidates)``, all at ``positions``.

    ``keep``: ``cache`` is the previous look-ahead's, to be cut first by :func:`keep_candidate` with
    these ``(rows, length, chosen)`` (done for all prompts at once when they all reused theirs).
    """

    cache: Any
    tokens: torch.Tensor
    positions: torch.Tensor
    keep: tuple[torch.Tensor, int, torch.Tensor] | None = None


def tree_mask(pads: list[int], rows: list[int], length: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(rows, 1, width, length + width)`` for ``width`` alternative next tokens per row.

    Every query sees its row's real cache columns (those after the ``pads`` left padding of its
    sequence) and, of the ``width`` new columns, only its own: each candidate attends as if it were the
    only token appended.
    """
    columns = torch.arange(length)
    prefix = torch.cat(
        [(columns >= pad).expand(count, length) for pad, count in zip(pads, rows, strict=True)]
    )
    own = torch.eye(width, dtype=torch.bool)
    visible = torch.cat(
        [prefix[:, None, :].expand(-1, width, -1), own.expand(prefix.shape[0], width, width)], dim=-1
    )
    mask = torch.zeros(visible.shape, dtype=dtype)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def keep_candidate(cache: Any, rows: torch.Tensor, length: int, chosen: torch.Tensor) -> None:
    """Cut a look-ahead cache (``length`` columns + the candidates) to one candidate per row, in place.

    New row ``r`` is old row ``rows[r]`` with the candidate column ``length + chosen[r]`` appended.
    """
    index = torch.arange(len(rows), device=rows.device)
    for layer in cache.layers:
        for name in ("keys", "values"):
            kept = getattr(layer, name)[rows]
            kept[:, :, length] = kept[index, :, length + chosen]
            setattr(layer, name, kept[:, :, : length + 1])


def column_scores(local: torch.Tensor) -> torch.Tensor:
    """OPERA's knowledge-aggregation score of every column of scaled local attention maps.

    ``local`` is ``(..., n, n)`` lower-triangular (rows: queries, columns: keys of the generated region,
    already multiplied by the scale). Column ``j`` scores ``1e-7 * prod_{i >= j} local[i, j]``.
    """
    n = local.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=local.device).tril()
    return 1e-7 * torch.where(below, local, torch.ones_like(local)).prod(dim=-2)


@dataclass
class _Snapshot:
    """Beam state before one decision, kept for retrospection."""

    beams: dict[str, torch.Tensor]  # copies of _BeamState.TENSORS
    generated: int
    attention: torch.Tensor
    chosen: torch.Tensor | None = None  # the (slot x vocab + token) pairs last chosen from this state


@register_method("opera")
class OPERA:
    r"""Over-trust Penalty and Retrospection-Allocation.

    Huang et al., "OPERA: Alleviating Hallucination in Multi-Modal Large Language Models via Over-Trust
    Penalty and Retrospection-Allocation", CVPR 2024; official code shikiw/OPERA
    (``transformers-4.29.2/src/transformers/generation/utils.py``, ``opera_beam_search``).

    Beam search (5 beams) where each beam's ``num_candidates`` (5) best tokens by raw logit are scored
    with one look-ahead forward each: the last layer's attention, max over heads, rows renormalised;
    on the generated region, column :math:`j` scores :math:`10^{-7}\prod_{i \ge j} \sigma\,a_{ij}`
    (``scale`` :math:`\sigma = 50`); the penalty is the largest column score, subtracted
    (x ``penalty_weight`` 1.0) from the candidate's logit; every other token gets -999 before the
    log-softmax. Retrospection: when every beam's history of argmax columns holds the current one
    more than ``threshold`` (15) times, and it lies at response position 10 or later, decoding rolls
    back to just after that column and bans the tokens chosen there before; at most
    ``num_candidates`` rollbacks per position (then one position earlier, as the code).

    Code and paper differ: for the first 10 response tokens the code does not penalise but rewards
    attention to the image (penalty = minus the candidate's attention to image tokens). Default as
    the code; ``image_reward_tokens=0`` is the paper.

    What the code does that the paper does not say, reproduced here (line numbers of utils.py at
    shikiw/OPERA 5fc3aa4, unchanged since):

    - The history of argmax columns is kept per beam slot and never reordered with the beams
      (3443-3447); the column is the mode over a beam's candidates, then over the beams (3437-3438).
    - A rollback to position ``r`` keeps the history of steps ``0..r``: the entry of the decision
      taken at ``r`` before the rollback stays, and the new decision there adds none (3478-3480,
      3539).
    - When the recurring column is the newest or the one before (only possible with ``threshold`` <=
      1), the code's target ``r`` is at or after the current step: it goes back one step only (it
      drops no state, then restores the one before last, 3478-3489), while the count and the bans
      are booked under ``r``.
    - Bans: a rollback to ``r`` bans the (beam slot, token) pairs chosen from the restored state,
      plus those banned at ``r`` by earlier rollbacks, and forgets the bans of ``r + 1`` only
      (3540-3551). The bans of later positions stay: the loop meant to drop them clears entries
      counted from the end of its 512-entry list (3481), so a later rollback to such a position,
      after the prefix changed, bans those stale (slot, token) pairs again. Reproduced because the
      code is the default and the bans decide what the search may take after a rollback.
    - Banned pairs drop to the row's lowest logit (not -inf) and the re-decision uses the whole
      vocabulary without a penalty (3543-3552).
    - InstructBLIP: the LAVIS wrapper's key positions are ``image_start=1, image_end=32``
      (inclusive) while the 32 query tokens sit at 0..31 (minigpt4/models/blip2_vicuna_instruct.py
      373-377 at b1f4e55), so the image reward reads query tokens 1..31 and the first text token
      (BOS). ``image_columns="code"`` (default) reproduces that; ``"image"`` reads the query tokens.
      LLaVA's positions (minigpt4/models/llava.py 205-210 at ae10d23) are its image tokens exactly;
      other families have no official positions and always use their image tokens.

    Not reproduced: the code computes the column products in the model's float16 (3423-3428): one
    past 65504 is inf, the candidates it penalises fall to -inf, and a beam whose candidates all did
    continues with one of the tokens tied at -999 (whichever its top-k returns first); here the
    scores stay in float32. It holds at most 512 positions (``window_size``): past that its
    history is truncated and a rollback to position 512 raises inside its ``try`` (silently no
    rollback); here no window applies.

    Beyond every released implementation: batches of any size (each prompt decodes, and rolls back,
    on its own), rollback keeps the prompt's KV cache and re-runs only the kept response tokens,
    the chosen candidate's look-ahead forward is reused as the next step's forward (its logits and
    cache), and the look-aheads of all candidates of all prompts run as one batched forward in which
    a beam's candidates are parallel queries of its row (each sees the cache and itself only), so the
    cache is neither copied per candidate nor re-stacked while every prompt keeps a candidate; prompts
    at the same step score their candidates and take their beam-search step together.
    ``preset="fast"`` is the official fast setting (``threshold=25, num_candidates=1``).

    OPERA is a generation loop, not a logits processor: use ``veridical.generate(model, inputs,
    methods=["opera"], num_beams=5, max_new_tokens=...)``. Head methods compose with it; logits
    processors are applied to each step's log-probabilities as in beam search, except contrastive
    decoders, whose branches cannot follow a rollback.

    Args:
        scale: :math:`\sigma`, the attention scale.
        threshold: rollback when an argmax column recurs more than this many times in every beam.
        num_candidates: look-ahead candidates per beam.
        penalty_weight: weight of the penalty; 0 with no rollback is beam search over the candidates.
        image_reward_tokens: response length up to which the image-attention reward replaces the
            penalty (10 in the code; 0 is the paper).
        rollback_start: earliest response position a rollback may target the column of (10).
        max_rollbacks: rollbacks allowed per position (default ``num_candidates``, as the code).
        preset: ``"default"`` or ``"fast"`` (overrides ``threshold`` and ``num_candidates``).
        image_columns: ``"code"``: the columns the official code rewards (InstructBLIP's shifted by
            one, see above); ``"image"``: the image tokens.
    """

    #: Accepted values of each hyper-parameter (:mod:`veridical.params`), checked before any model.
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "scale": Real(0, low_open=True),
        "threshold": Integer(0),
        "num_candidates": Integer(1),
        "penalty_weight": Real(0),
        "image_reward_tokens": Integer(0),
        "rollback_start": Integer(0),
        "max_rollbacks": Optional(Integer(0)),
        "preset": Choice(*PRESETS),
        "image_columns": Choice(*IMAGE_COLUMNS),
    }

    generation_defaults: ClassVar[dict] = {"do_sample": False, "num_beams": 5}

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        scale: float = 50.0,
        threshold: int = 15,
        num_candidates: int = 5,
        penalty_weight: float = 1.0,
        image_reward_tokens: int = 10,
        rollback_start: int = 10,
        max_rollbacks: int | None = None,
        preset: str = "default",
        image_columns: str = "code",
    ):
        check_hyperparameters(self, locals())
        threshold = PRESETS[preset].get("threshold", threshold)
        num_candidates = PRESETS[preset].get("num_candidates", num_candidates)
        self.model = model
        self.adapter: ModelAdapter = get_adapter(model)
        self.adapter.validate_inputs(inputs)
        self.inputs = inputs
        self.scale, self.threshold, self.num_candidates = scale, threshold, num_candidates
        self.penalty_weight, self.image_reward_tokens = penalty_weight, image_reward_tokens
        self.rollback_start, self.image_columns = rollback_start, image_columns
        self.max_rollbacks = num_candidates if max_rollbacks is None else max_rollbacks
        #: ``(prompt, decision step, target, position decoding resumed at)`` for every retrospection;
        #: the target is where the code books it (counts and bans), one after the recurring column or
        #: the column itself.
        self.rollbacks: list[tuple[int, int, int, int]] = []
        #: Per prompt, each decision's ``(beams, vocab)`` log-probabilities before the beam scores are added.
        self.step_scores: list[list[torch.Tensor]] = []

    # -- entry point used by veridical.generate ---------------------------------------------------
    def check_generation(
        self, logits_processor: LogitsProcessorList | None = None, **kwargs: Any
    ) -> GenerationConfig:
        """The generation config of a call with ``kwargs``; raises for what OPERA cannot do with it
        (sampling, several sequences, a contrast branch or VISTA's logits in the stack)."""
        config = copy.deepcopy(self.model.generation_config)
        config.update(**kwargs)
        if config.do_sample:
            raise MethodSpecError("OPERA is a beam search: pass do_sample=False")
        if kwargs.get("cache_implementation") is not None or kwargs.get("compile_config") is not None:
            raise MethodSpecError(
                "OPERA runs its own eager beam loop with its own cache: drop cache_implementation and "
                "compile_config (veridical.generate(..., compile=True) runs OPERA eagerly)"
            )
        if (config.num_return_sequences or 1) != 1:
            raise MethodSpecError("OPERA returns one sequence per prompt (num_return_sequences=1)")
        processors = LogitsProcessorList(logits_processor or [])
        from veridical.contrastive import ContrastiveDecoder

        branched = [type(p).__name__ for p in processors if isinstance(p, ContrastiveDecoder)]
        if branched:
            raise MethodSpecError(
                f"OPERA cannot be stacked with {', '.join(branched)}: "
                "a contrast branch cannot follow a rollback"
            )
        if any(getattr(p, "reads_model_forward", False) for p in processors):
            raise MethodSpecError(
                "OPERA cannot be stacked with VISTA's logits augmentation (its look-ahead forwards are not "
                "the step's forward); use VISTA with logits_alpha=0 (steering only)"
            )
        return config

    @torch.no_grad()
    def custom_generate(
        self, logits_processor: LogitsProcessorList | None = None, **kwargs: Any
    ) -> torch.Tensor:
        config = self.check_generation(logits_processor, **kwargs)
        processors = LogitsProcessorList(logits_processor or [])
        hook = _LastQueryAttention(self.adapter.num_layers - 1)
        # Each prompt decodes (and rolls back) on its own, as a generator of requests; the driver below
        # answers the requests of all prompts together.
        look_ahead = _LookAheads(self, hook)
        decoders, requests, outputs = {}, {}, {}
        with intercept_attention(self.model, hook):
            for index, sample in enumerate(self.adapter.split_inputs(self.inputs)):
                self.step_scores.append([])
                decoders[index] = self._decode(index, sample, config, processors)
                requests[index] = next(decoders[index])
            while requests:
                # Prompts step together: decisions and beam-search steps first, then one look-ahead
                # forward for all.
                decide = {i: r for i, r in requests.items() if isinstance(r, _Decide)}
                steps = {i: r for i, r in requests.items() if isinstance(r, _Advance)}
                if decide:
                    results = self._decide(decide)
                else:
                    results = _advance(steps) if steps else look_ahead(requests)
                for index, result in results.items():
                    try:
                        requests[index] = decoders[index].send(result)
                    except StopIteration as finished:
                        outputs[index] = finished.value
                        del requests[index]
        return self._batch([outputs[index] for index in sorted(outputs)], config)

    def _batch(self, generated: list[torch.Tensor], config) -> torch.Tensor:
        prompt = self.inputs["input_ids"]
        width = max(len(g) for g in generated)
        pad = config.pad_token_id if config.pad_token_id is not None else self.adapter.pad_token_id
        new = prompt.new_full((len(generated), width), int(pad))
        for row, tokens in enumerate(generated):
            new[row, : len(tokens)] = tokens
        return torch.cat([prompt, new], dim=1)

    # -- one prompt ------------------------------------------------------------------------------
    def _decode(self, index, sample, config, processors) -> torch.Tensor:
        beams, n_can = int(config.num_beams or 1), self.num_candidates
        adapter, model = self.adapter, self.model
        prompt_len = sample["input_ids"].shape[1]
        # The processors generate() would add from the config (min_new_tokens, repetition penalty, ...),
        # then the caller's, as generate() orders them.
        model._prepare_special_tokens(
            config, kwargs_has_attention_mask=True, device=sample["input_ids"].device
        )
        processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=prompt_len,
            encoder_input_ids=sample["input_ids"],
            logits_processor=processors,
            device=sample["input_ids"].device,
            model_kwargs={"attention_mask": sample["attention_mask"].expand(beams, -1)},
        )
        max_length = prompt_len + config.max_new_tokens if config.max_new_tokens else config.max_length
        eos = config.eos_token_id
        eos = torch.tensor(
            [eos] if isinstance(eos, int) else list(eos or []), device=sample["input_ids"].device
        )
        # On the response alone (see _BeamState).
        criteria = StoppingCriteriaList([MaxLengthCriteria(max_length - prompt_len)])
        if eos.numel():
            criteria.append(EosTokenCriteria(eos))
        image = adapter.image_mask(sample["input_ids"])[0]
        if self.image_columns == "code" and adapter.family == "instructblip":
            image = torch.cat([image.new_zeros(1), image[:-1]])  # the code's columns 1..32 (see above)

        # Prefill once, then expand to the beams.
        positions = adapter.prefill_position_ids(sample)
        with running_prompts([index]):
            out = adapter.prefill_module(sample)(
                **sample, position_ids=positions, use_cache=True, logits_to_keep=1
            )
        cache = output_cache(out)
        prefill_logits = out.logits[:, -1].float().expand(beams, -1).clone()
        cache.batch_repeat_interleave(beams)
        first_position = adapter.next_position_ids(positions).repeat_interleave(beams, dim=-2)

        state = _BeamState(model, config, sample["input_ids"], beams, max_length - prompt_len, eos)
        logits = prefill_logits
        attention = torch.zeros(beams, 0, 0, device=logits.device)  # generated rows x generated columns
        history = torch.zeros(beams, 0, dtype=torch.long, device=logits.device)
        snapshots: list[_Snapshot] = []
        rollbacks_at = torch.zeros(max_length - prompt_len + 1, dtype=torch.long)
        bans: dict[int, torch.Tensor] = {}  # the code's reject_token_pos_gather, by target position
        lookahead = keep = None
        while True:
            n = state.generated  # tokens generated so far by the running beams
            snapshots.append(state.snapshot(attention))
            cand_scores, candidates = torch.topk(logits, n_can, dim=-1)
            # Look-ahead: every beam's candidates as parallel queries of one forward (with the other
            # prompts').
            ahead_out, ahead_rows, ahead = yield _LookAhead(
                cache=cache,
                tokens=candidates,
                positions=(first_position + n).expand(*first_position.shape[:-1], n_can),
                keep=keep,
            )
            length, keep = prompt_len + n, None
            decision = yield _Decide(
                ahead_rows, attention, history, image, candidates, cand_scores, logits.shape[-1]
            )
            history, generated_part = decision.history, decision.response
            target = None
            if decision.may_roll_back:
                target = self._rollback_target(decision.location, rollbacks_at)
            if target is not None:
                resume = min(target, n - 1)  # the code restores the previous state at most (see above)
                self.rollbacks.append((index, n, target, resume))
                restored = snapshots[resume]
                state.restore(restored)
                attention = restored.attention
                history = history[:, : resume + 1]  # the entry of the decision taken at `resume` stays
                banned = _record_bans(bans, target, n, restored.chosen)
                del snapshots[resume + 1 :]
                if cache.get_seq_length() > prompt_len:  # keep the prompt, drop the response
                    cache.crop(prompt_len - cache.get_seq_length())
                with running_prompts([index]):
                    logits = self._replay(cache, state, first_position, resume, prefill_logits)
                # As the code: the banned continuations drop to the row's lowest logit (not -inf), and the
                # re-decision uses the whole vocabulary without a penalty.
                next_logits = logits.clone()
                minimum = next_logits.min(dim=-1, keepdim=True).values.expand_as(next_logits).reshape(-1)
                next_logits.view(-1).scatter_(0, banned, minimum.gather(0, banned))
                log_probs = torch.log_softmax(next_logits, dim=-1)
                lookahead = None
            else:
                log_probs = decision.log_probs
                lookahead = (ahead, ahead_out, candidates, generated_part, length)
            for processor in processors:  # as LogitsProcessorList, without its per-call signature check
                log_probs = processor(state.flat_sequences(), log_probs)
            self.step_scores[index].append(log_probs)
            parents, tokens = yield _Advance(state, log_probs, criteria)
            snapshots[-1].chosen = parents * logits.shape[-1] + tokens
            if state.done():
                break
            n = state.generated - 1
            reuse = lookahead is not None and bool(
                (lookahead[2][parents] == tokens[:, None]).any(dim=-1).all()
            )
            if reuse:
                ahead, ahead_out, candidates, generated_part, length = lookahead
                which = (candidates[parents] == tokens[:, None]).int().argmax(dim=-1)
                keep = (parents, length, which)  # applied with the next look-ahead
                cache = ahead
                logits = ahead_out[parents, which]
                new_rows = generated_part[parents, which]
            else:
                # The chosen tokens in every candidate slot: a look-ahead of their own, batched with
                # the other prompts' look-aheads.
                cache.reorder_cache(parents)
                step_out, step_rows, cache = yield _LookAhead(
                    cache=cache,
                    tokens=tokens[:, None].expand(-1, n_can),
                    positions=(first_position + n).expand(*first_position.shape[:-1], n_can),
                )
                first = torch.zeros(beams, dtype=torch.long, device=tokens.device)
                keep = (torch.arange(beams, device=tokens.device), prompt_len + n, first)
                logits, row = step_out[:, 0], step_rows[:, 0]
                new_rows = row[:, prompt_len:] / row.sum(dim=-1, keepdim=True)
            attention = torch.cat(
                [torch.nn.functional.pad(attention[parents], (0, 1)), new_rows[:, None, :]], dim=1
            )
        return state.best()

    def _decide(self, requests: dict[int, _Decide]) -> dict[int, _Decision]:
        """Penalties, argmax columns and step scores of every prompt; those at the same step at once."""
        groups = _in_step(requests, lambda request: request.attention.shape[-1])
        return {i: d for members in groups for i, d in self._decide_together(requests, members)}

    def _decide_together(self, requests: dict[int, _Decide], members: list[int]):
        """For prompts with as many tokens generated: the penalty of every candidate is the largest
        column score of its scaled local window (the response's earlier rows plus its own row)."""
        batch = [requests[i] for i in members]
        rows = [r.rows / r.rows.sum(dim=-1, keepdim=True) for r in batch]  # each over its own keys
        response = torch.stack([row[..., r.image.shape[0] :] for row, r in zip(rows, batch, strict=True)])
        width = response.shape[2]  # (prompts, beams, candidates, n + 1)
        earlier = torch.nn.functional.pad(torch.stack([r.attention for r in batch]), (0, 1))
        earlier = earlier[:, :, None].expand(-1, -1, width, -1, -1)
        window = torch.cat([earlier, response[:, :, :, None, :]], dim=3)
        penalty, locations = column_scores(self.scale * window).max(dim=-1)  # (prompts, beams, candidates)
        n = response.shape[-1] - 1
        if n + 1 <= self.image_reward_tokens:
            # The code's early phase: reward attention to the image instead (not in the paper).
            image = [
                row[..., : r.image.shape[0]][..., r.image].sum(dim=-1)
                for row, r in zip(rows, batch, strict=True)
            ]
            penalty = -torch.stack(image)
        slots = locations.mode(dim=-1).values  # (prompts, beams)
        history = torch.cat([torch.stack([r.history for r in batch]), slots[..., None]], dim=-1)
        location = slots.mode(dim=-1).values  # (prompts,)
        recurs = ((history == location[:, None, None]).sum(dim=-1) > self.threshold).all(dim=-1)
        # A step to go back to is needed (the code's rollback_start of 10 implies one).
        may_roll_back = recurs & (location >= self.rollback_start) & (n > 0)
        candidates = torch.stack([r.candidates for r in batch])
        logits = torch.stack([r.candidate_logits for r in batch]) - self.penalty_weight * penalty
        # Every token outside the candidates gets -999 before the log-softmax, as the code.
        scores = logits.new_full((*candidates.shape[:2], batch[0].vocab), -999.0)
        log_probs = torch.log_softmax(scores.scatter_(-1, candidates, logits), dim=-1)
        for k, (i, roll, where) in enumerate(
            zip(members, may_roll_back.tolist(), location.tolist(), strict=True)
        ):
            yield i, _Decision(log_probs[k], response[k], history[k], where, roll)

    def _rollback_target(self, location: int, rollbacks_at: torch.Tensor) -> int | None:
        """Where a retrospection on ``location`` goes (a decision whose ``may_roll_back`` held): just
        after the column, or one earlier once that position used its rollbacks; ``None`` if both did."""
        target = location + 1
        if rollbacks_at[target] >= self.max_rollbacks:
            target -= 1
            if rollbacks_at[target] >= self.max_rollbacks:
                return None
        rollbacks_at[target] += 1
        return target

    def _forward(self, cache, tokens, mask, positions) -> torch.Tensor:
        """New tokens ``(rows, queries)`` against ``cache``; float32 logits ``(rows, queries, vocab)``."""
        module = self.adapter.decode_module()
        out = module(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_kwarg(module): cache},
        )
        return out.logits.float()

    def _replay(self, cache, state, first_position, target, prefill_logits) -> torch.Tensor:
        """Re-feed the kept response tokens (``target`` of them) after the prompt's cache."""
        if target == 0:
            return prefill_logits.clone()
        tokens = state.response(target)
        positions = first_position + torch.arange(target, device=tokens.device)
        return self._forward(cache, tokens, state.attention_mask(target), positions)[:, -1]


def _record_bans(bans: dict[int, torch.Tensor], target: int, n: int, chosen: torch.Tensor) -> torch.Tensor:
    """The code's ban bookkeeping for a rollback to ``target`` decided at step ``n`` (utils.py 3478-3481,
    3540-3550): the (slot, token) pairs ``chosen`` from the restored state join those banned at
    ``target`` before, and the record of ``target + 1`` is dropped. The code's loop over the dropped
    steps clears entries counted from the end of its 512-entry list, not the dropped positions: the
    bans of positions after ``target + 1`` stay (see OPERA)."""
    for j in range(n - 1 - target):
        bans.pop(_WINDOW - 1 - j, None)
    bans.pop(target + 1, None)
    bans[target] = chosen if target not in bans else torch.cat([bans[target], chosen])
    return bans[target]


def _slots(indices: torch.Tensor, beams: int) -> torch.Tensor:
    """Beam indices as slots of the prompt's own beams: transformers numbers them across the batch
    (position in the batch x beams + slot), and a prompt's position changes with who steps with it."""
    return torch.where(indices >= 0, indices % beams, indices)


def _in_step(requests: dict[int, Any], step: Callable[[Any], Hashable]) -> list[list[int]]:
    """The prompts of ``requests`` grouped by ``step`` (prompts in step are batched together)."""
    groups: dict[Hashable, list[int]] = {}
    for i, request in requests.items():
        groups.setdefault(step(request), []).append(i)
    return list(groups.values())


def _advance(requests: dict[int, _Advance]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every prompt's beam-search step; those with as many tokens generated and the same limit at once."""
    results = {}
    for members in _in_step(requests, lambda request: (request.state.generated, request.state.max_new)):
        steps = _BeamState.advance_together(
            [requests[i].state for i in members],
            [requests[i].log_probs for i in members],
            requests[members[0]].criteria,
        )
        results.update(zip(members, steps, strict=True))
    return results


class _LookAheads:
    """Runs the look-ahead requests of all prompts as one forward.

    The prompts' caches are left-padded to one length (:class:`Segment`); head methods and the
    attention hook see each prompt's rows in its own key columns. When every prompt kept a candidate
    of the previous look-ahead, the previous forward's stacked cache is cut in place for all of
    them (one gather per layer) instead of being split and stacked again.
    """

    def __init__(self, opera: OPERA, hook: _LastQueryAttention):
        self.opera, self.hook = opera, hook
        self.shared: Any = None
        self.aheads: dict[int, Any] = {}

    def __call__(self, requests: dict[int, _LookAhead]) -> dict[int, tuple]:
        """Per prompt: its candidates' logits ``(beams, candidates, vocab)``, attention rows
        ``(beams, candidates, keys + 1)`` and look-ahead cache."""
        order = sorted(requests)
        if not self._keep_all(requests, order):
            for i in order:
                if requests[i].keep is not None:
                    keep_candidate(requests[i].cache, *requests[i].keep)
            self._stack(requests, order)
        shared, segments = self.shared, getattr(self.shared, SEGMENTS)
        length, width = shared.get_seq_length(), self.opera.num_candidates
        keys = shared.layers[0].keys
        pads = [segment.pad for segment in segments]
        mask = tree_mask(pads, [s.rows for s in segments], length, width, keys.dtype).to(keys.device)
        self.hook.rows.clear()
        fused_rows(segments)
        try:
            with alternative_tokens(width):
                logits = self.opera._forward(
                    shared,
                    torch.cat([requests[i].tokens for i in order]),
                    mask,
                    torch.cat([requests[i].positions for i in order], dim=-2),
                )
        finally:
            fused_rows(None)
        results, self.aheads, start = {}, {}, 0
        for i, segment, row in zip(order, segments, self.hook.rows, strict=True):
            ahead = _empty_like(requests[i].cache)
            self._view(ahead, start, segment)
            share_sequence(self.opera.model, requests[i].cache, ahead)
            # Each candidate's row over its cache and its own column (the others are masked out).
            own = length - segment.pad
            row = torch.cat([row[..., :own], row[..., own:].diagonal(dim1=1, dim2=2)[..., None]], dim=-1)
            results[i] = (logits[start : start + segment.rows], row, ahead)
            self.aheads[i] = ahead
            start += segment.rows
        return results

    def _keep_all(self, requests: dict[int, _LookAhead], order: list[int]) -> bool:
        """Cut the previous stacked cache to every prompt's kept candidate, if all of them kept one."""
        if list(self.aheads) != order or any(
            requests[i].keep is None or requests[i].cache is not self.aheads[i] for i in order
        ):
            return False
        segments = getattr(self.shared, SEGMENTS)
        length = self.shared.get_seq_length() - self.opera.num_candidates
        starts = torch.tensor([0, *[s.rows for s in segments]]).cumsum(0)[:-1].tolist()
        rows = torch.cat([requests[i].keep[0] + start for i, start in zip(order, starts, strict=True)])
        chosen = torch.cat([requests[i].keep[2] for i in order])
        keep_candidate(self.shared, rows, length, chosen)
        for i, start, segment in zip(order, starts, segments, strict=True):
            self._view(requests[i].cache, start, segment)
        return True

    def _stack(self, requests: dict[int, _LookAhead], order: list[int]) -> None:
        lengths = [requests[i].cache.get_seq_length() for i in order]
        segments = [
            Segment(
                rows=requests[i].tokens.shape[0],
                pad=max(lengths) - own,
                sequence=sequence_of(self.opera.model, requests[i].cache),
                prompt=i,
            )
            for i, own in zip(order, lengths, strict=True)
        ]
        pads = [segment.pad for segment in segments]
        shared = _empty_like(requests[order[0]].cache)
        for layer_index, layer in enumerate(shared.layers):
            for name in ("keys", "values"):
                own = [getattr(requests[i].cache.layers[layer_index], name) for i in order]
                setattr(layer, name, stack_padded(own, pads, dim=2))
        setattr(shared, SEGMENTS, segments)
        self.shared = shared

    def _view(self, cache: Any, start: int, segment: Segment) -> None:
        """Point ``cache`` at its prompt's rows and columns of the stacked cache."""
        for layer, whole in zip(cache.layers, self.shared.layers, strict=True):
            layer.keys = whole.keys[start : start + segment.rows, :, segment.pad :]
            layer.values = whole.values[start : start + segment.rows, :, segment.pad :]


def _empty_like(cache):
    """A new cache object of ``cache``'s kind whose layers still point at its tensors (to be replaced)."""
    fresh = copy.copy(cache)
    fresh.layers = [copy.copy(layer) for layer in cache.layers]
    return fresh


class _BeamState:
    """transformers' beam search bookkeeping for one prompt; prompts at the same step advance together.

    Sequences hold the response only (the prompt is kept apart), so prompts of different lengths share
    one call of transformers' batched helpers, which take one length for the whole batch.
    """

    #: The tensors that make up the search state at a decision (what retrospection restores).
    TENSORS = (
        "running_sequences",
        "running_scores",
        "running_indices",
        "sequences",
        "scores",
        "indices",
        "finished",
        "unsatisfied",
    )

    def __init__(self, model, config, prompt: torch.Tensor, beams: int, max_new: int, eos: torch.Tensor):
        self.model, self.beams, self.max_new = model, beams, max_new
        self.prompt, self.prompt_len = prompt, prompt.shape[1]
        # transformers leaves these unset until generate() fills its defaults: 1.0 and False.
        self.length_penalty = 1.0 if config.length_penalty is None else config.length_penalty
        self.early_stopping = False if config.early_stopping is None else config.early_stopping
        device = prompt.device
        fill = config.pad_token_id
        fill = fill if fill is not None else (int(eos[0]) if eos.numel() else -1)
        self.running_sequences = torch.full((1, beams, max_new), int(fill), dtype=torch.long, device=device)
        self.sequences = self.running_sequences.clone()
        self.running_scores = torch.zeros(1, beams, device=device)
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((1, beams), -1e9, device=device)
        self.finished = torch.zeros(1, beams, dtype=torch.bool, device=device)
        self.unsatisfied = torch.ones(1, 1, dtype=torch.bool, device=device)
        self.hits = torch.zeros(1, beams, dtype=torch.bool, device=device)
        self.running_indices = torch.full((1, beams, max_new), -1, dtype=torch.int32, device=device)
        self.indices = self.running_indices.clone()
        self.generated = 0
        self.keep = max(2, 1 + eos.numel()) * beams
        self.top_mask = torch.cat(
            [torch.ones(beams, dtype=torch.bool), torch.zeros(self.keep - beams, dtype=torch.bool)]
        ).to(device)

    def flat_sequences(self) -> torch.Tensor:
        """Prompt and response of every beam, as generate() hands them to logits processors."""
        response = self.running_sequences[0, :, : self.generated]
        return torch.cat([self.prompt.expand(self.beams, -1), response], dim=1)

    def response(self, length: int) -> torch.Tensor:
        return self.running_sequences[0, :, :length]

    def attention_mask(self, generated: int) -> torch.Tensor:
        return torch.ones(
            self.beams,
            self.prompt_len + generated,
            dtype=torch.long,
            device=self.running_sequences.device,
        )

    @staticmethod
    def advance_together(
        states: list[_BeamState], log_probs: list[torch.Tensor], criteria
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One beam-search step, as transformers does it, for prompts with as many tokens generated
        (and the same limit); each prompt's new beams' parent slots and tokens."""
        first, m = states[0], states[0].model
        batch, beams, n = len(states), first.beams, first.generated
        state = {name: torch.cat([getattr(s, name) for s in states]) for name in _BeamState.TENSORS}
        accumulated = (torch.stack(log_probs) + state["running_scores"][:, :, None]).reshape(batch, -1)
        topk_scores, topk_sequences, topk_indices = m._get_top_k_continuations(
            accumulated_log_probs=accumulated,
            running_sequences=state["running_sequences"],
            running_beam_indices=state["running_indices"],
            cur_len=n,
            decoder_prompt_len=0,
            do_sample=False,
            beams_to_keep=first.keep,
            num_beams=beams,
            batch_size=batch,
        )
        hits = criteria(topk_sequences[:, :, : n + 1].reshape(batch * first.keep, n + 1), None)
        hits = hits.view(batch, first.keep)
        running_sequences, running_scores, running_indices = m._get_running_beams_for_next_iteration(
            topk_log_probs=topk_scores,
            topk_running_sequences=topk_sequences,
            topk_running_beam_indices=topk_indices,
            next_token_hits_stopping_criteria=hits,
            num_beams=beams,
        )
        sequences, scores, indices, finished = m._update_finished_beams(
            sequences=state["sequences"],
            topk_running_sequences=topk_sequences,
            beam_scores=state["scores"],
            topk_log_probs=topk_scores,
            beam_indices=state["indices"],
            topk_running_beam_indices=topk_indices,
            is_early_stop_heuristic_unsatisfied=state["unsatisfied"],
            is_sent_finished=state["finished"],
            next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=first.top_mask,
            num_beams=beams,
            cur_len=n,
            decoder_prompt_len=0,
            length_penalty=first.length_penalty,
            early_stopping=first.early_stopping,
        )
        unsatisfied = m._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=state["unsatisfied"],
            running_beam_scores=running_scores,
            beam_scores=scores,
            is_sent_finished=finished,
            cur_len=n + 1,
            max_length=first.max_new,
            decoder_prompt_len=0,
            early_stopping=first.early_stopping,
            length_penalty=first.length_penalty,
        )
        new = dict(
            running_sequences=running_sequences,
            running_scores=running_scores,
            running_indices=_slots(running_indices, beams),
            sequences=sequences,
            scores=scores,
            indices=_slots(indices, beams),
            finished=finished,
            unsatisfied=unsatisfied,
            hits=hits,
        )
        parents = new["running_indices"][:, :, n].long()
        tokens = running_sequences[:, :, n]
        for i, s in enumerate(states):
            for name, tensor in new.items():
                setattr(s, name, tensor[i : i + 1])
            s.generated = n + 1
        return [(parents[i], tokens[i]) for i in range(batch)]

    def done(self) -> bool:
        return not bool(
            self.model._beam_search_has_unfinished_sequences(
                self.unsatisfied, self.finished, self.hits, self.early_stopping
            )
        )

    def best(self) -> torch.Tensor:
        generated = int(((self.indices[0, 0] + 1).bool()).sum())
        return self.sequences[0, 0, :generated]

    def snapshot(self, attention) -> _Snapshot:
        beams = {name: getattr(self, name).clone() for name in self.TENSORS}
        return _Snapshot(beams=beams, generated=self.generated, attention=attention)

    def restore(self, snapshot: _Snapshot) -> None:
        for name in self.TENSORS:
            setattr(self, name, snapshot.beams[name].clone())
        self.hits = torch.zeros_like(self.hits)
        self.generated = snapshot.generated

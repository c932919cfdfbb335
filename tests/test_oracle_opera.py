"""OPERA against an independent re-implementation of the official search, run on eager attention maps.

The reference below is written from the official code, shikiw/OPERA
(``transformers-4.29.2/src/transformers/generation/utils.py`` at 5fc3aa4, ``opera_beam_search``,
lines 3116-3674; key positions from ``minigpt4/models/llava.py`` 205-210 at ae10d23 and
``minigpt4/models/blip2_vicuna_instruct.py`` 372-377 at b1f4e55). It shares no code with veridical:
every attention map comes from a plain forward of the whole sequence (``attn_implementation="eager"``,
``output_attentions=True``), every logit from a plain forward, and the beam step is the official
top-2k selection.

Random tiny models never repeat an argmax column past token 10 (their attention is nearly uniform), so
the LLaVA used here has planted weights: a bigram chain of token levels (level k is generated at
response position k), and in the last layer one head whose query and key share RoPE's slowest
(nearly unrotated) pair, so that "attractor" tokens draw attention from every later token, as the
summary tokens of the paper do. With attractors at levels 10 and 13 the official rules all fire:
rollbacks after token 10, repeated and shifted rollbacks, exhausted positions, and bans that outlive
the prefix they were made on.
"""

import copy
from collections import Counter

import pytest
import torch

import veridical
from veridical import get_adapter
from veridical.decoders import OPERA
from veridical.decoders.opera import _Decide, _record_bans
from veridical.tiny import random_images, tiny_inputs, tiny_llava, tiny_model

#: Response positions of the attractor levels (after "ASSISTANT:"; one earlier after "image").
EARLY, LATE = 10, 13
PROMPTS = ["USER: <image> describe this image ASSISTANT:", "USER: <image> describe this image"]


def planted_llava(early: float, late: float, seed: int):
    """A tiny LLaVA whose next token depends on the current token only (a chain of token levels,
    widths 3 up to level 9, then the early attractors, two plain levels and one late attractor, then
    level 0 again) and whose last layer's head 0 attends to attractor tokens with strength ``early``
    or ``late``. Everything else keeps its random weights (layer outputs damped)."""
    model, processor = tiny_llava(seed)
    tok = processor.tokenizer
    vocab, width = len(tok), model.config.text_config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    specials.add(model.config.image_token_id)
    prompt_words = set(tok.convert_tokens_to_ids(["USER:", "describe", "this", "image", "ASSISTANT:"]))
    words = [i for i in range(vocab) if i not in specials | prompt_words]
    words = [words[i] for i in torch.randperm(len(words), generator=generator).tolist()]
    levels, start = [], 0
    for size in (3,) * 10 + (3, 1, 1, 1):
        levels.append(words[start : start + size])
        start += size
    # Residual dims: 0 = query signal (varied per token, so candidates attend differently), 1 = key
    # signal (attractors only), 2 + token = the token's identity.
    embeddings = torch.zeros(vocab, width)
    embeddings[torch.arange(vocab), 2 + torch.arange(vocab)] = 1.0
    embeddings[:, 0] = 1 + 0.5 * (2 * torch.rand(vocab, generator=generator) - 1)
    embeddings[levels[EARLY], 1] = early
    embeddings[levels[LATE], 1] = late
    follows = {
        tok.convert_tokens_to_ids("ASSISTANT:"): levels[0],
        tok.convert_tokens_to_ids("image"): levels[1],
    }
    for k, level in enumerate(levels):
        follows.update({v: levels[(k + 1) % len(levels)] for v in level})
    head = torch.zeros(vocab, width)
    for v, nexts in follows.items():
        for w in nexts:
            head[w, 2 + v] = 1 + torch.rand(1, generator=generator).item()
    head[sorted(specials), 0] = -5.0  # never generated (no end of sequence either)
    text = model.model.language_model
    with torch.no_grad():
        text.embed_tokens.weight.copy_(embeddings)
        model.lm_head.weight.copy_(head)
        for layer in text.layers:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
        last = text.layers[-1].self_attn  # head 0, dim 7: the slowest RoPE frequency of head_dim 16
        last.q_proj.weight[7] = 0.0
        last.q_proj.weight[7, 0] = 0.5
        last.k_proj.weight[7] = 0.0
        last.k_proj.weight[7, 1] = 0.5
    return model, processor


def plain_forwards(eager, sample):
    """``forward(rows)``: each row of response tokens after the prompt in one plain eager forward;
    the last position's logits and the last layer's attention, max over heads, rows normalised.
    ``next_logits(rows)``: the last position's logits alone (kept from earlier forwards where one ran)."""
    with torch.no_grad():
        prompt = eager(**sample, output_hidden_states=True).hidden_states[0]  # embeddings, image merged
    embed = eager.get_input_embeddings()
    seen: dict[tuple, torch.Tensor] = {}

    def forward(rows: torch.Tensor):
        x = torch.cat([prompt.expand(rows.shape[0], -1, -1), embed(rows)], dim=1)
        mask = torch.ones(x.shape[:2], dtype=torch.long)
        with torch.no_grad():
            out = eager(inputs_embeds=x, attention_mask=mask, output_attentions=True)
        logits = out.logits[:, -1].float()
        seen.update(zip(map(tuple, rows.tolist()), logits, strict=True))
        attention = out.attentions[-1].amax(dim=1).float()  # utils.py 3349-3356, 3405-3406
        return logits, attention / attention.sum(-1, keepdim=True)  # 3415

    def next_logits(rows: torch.Tensor) -> torch.Tensor:
        missing = [row for row in map(tuple, rows.tolist()) if row not in seen]
        if missing:
            forward(torch.tensor(missing, dtype=torch.long).view(len(missing), rows.shape[1]))
        return torch.stack([seen[row] for row in map(tuple, rows.tolist())])

    return forward, next_logits, prompt.shape[1]


def official_opera(eager, sample, image, beams, candidates, scale, threshold, weight, max_new, window=512):
    """The official search for one prompt (utils.py line numbers at 5fc3aa4). No end-of-sequence token
    can be generated, so the beam scorer keeps the best ``beams`` of its top ``2 * beams``.

    Returns the best beam, each decision's ``(beams, vocab)`` log-probabilities (before beam scores),
    the rollbacks ``(step, target, resumed at)`` and a count of the rules that fired."""
    forward, next_logits, prompt = plain_forwards(eager, sample)
    tokens = torch.zeros(beams, 0, dtype=torch.long)
    scores = torch.full((beams,), -1e9)
    scores[0] = 0.0  # 3301-3303
    states, history = [], []  # history_states, history_rollback_locs
    rollback_times = Counter()  # max_rollback_time
    rejected: dict[int, torch.Tensor] = {}  # reject_token_pos_gather
    outdated: set[int] = set()  # positions whose bans were made on a prefix that has since changed
    decisions, rollbacks, fired = [], [], Counter()
    chosen = None  # beam_idx, beam_next_tokens of the last step (stored in the next state, 3377-3378)
    while tokens.shape[1] < max_new:
        n = tokens.shape[1]
        states.append((tokens, scores, chosen))
        logits = next_logits(tokens)
        vocab = logits.shape[-1]
        top, picks = logits.topk(candidates, dim=-1)  # raw logits, 3371-3373
        ahead = torch.cat([tokens[:, None].expand(-1, candidates, -1), picks[..., None]], dim=-1)
        _, attention = forward(ahead.reshape(beams * candidates, n + 1))
        attention = attention.view(beams, candidates, prompt + n + 1, prompt + n + 1)
        local = scale * attention[..., prompt:, prompt:]  # response_start = prompt length, 3420-3423
        columns = torch.stack([1e-7 * local[..., j:, j].prod(-1) for j in range(n + 1)], dim=-1)  # 3426-3428
        image_attention = attention[..., -1, image].sum(-1)  # 3432
        rollback_scores, locations = columns.max(-1)  # 3436
        per_beam = locations.mode(-1).values  # 3437, 3444-3446
        location = int(per_beam.mode(-1).values)  # 3438
        penalty = -image_attention if n + 1 <= 10 else rollback_scores  # 3431, 3440
        history.append(per_beam)
        counts = (torch.stack(history, -1) == location).sum(-1)
        target = None
        if bool((counts > threshold).all()):  # 3459
            fired["recurs at 9"] += location == 9
            if location >= 10:  # 3460
                target = location + 1  # 3463
                if rollback_times[target] >= candidates:  # 3464-3472
                    target -= 1
                    fired["shifted" if rollback_times[target] < candidates else "exhausted"] += 1
                    if rollback_times[target] >= candidates:
                        target = None
        if target is not None:
            rollback_times[target] += 1
            for j in range(n - 1 - target):  # 3478-3481: cur_response_lens = n + 1
                states.pop()
                history.pop()
                rejected.pop(window - 1 - j, None)
            resumed = len(states) - 2  # 3484: history_states[-2]
            tokens, scores, _ = states[-2]
            banned_now = states[-1][2]  # 3494-3495: the choice made from the restored state
            states.pop()  # 3538-3540
            history.pop()
            rejected.pop(target + 1, None)
            outdated.discard(target + 1)
            logits = next_logits(tokens)  # 3497-3534: the restored beams' next-token logits
            logits = logits - (999.0 + logits.min(-1, keepdim=True).values)  # 3543
            pairs = banned_now[0] * vocab + banned_now[1]  # 3547
            if target in rejected:  # 3548-3550
                fired["bans accumulate"] += 1
                fired["stale bans"] += target in outdated
                pairs = torch.cat([rejected[target], pairs])
            rejected[target] = pairs
            outdated.discard(target)
            outdated.update(k for k in rejected if k > resumed and k != target)
            step = logits.reshape(-1).scatter(0, pairs, -999.0).view(beams, vocab)  # 3551-3552
            rollbacks.append((n, target, resumed))
            fired["resumed before target"] += resumed < target
        else:
            step = torch.full((beams, vocab), -999.0).scatter(
                -1, picks, top - weight * penalty
            )  # 3449, 3556-3557
            if n + 1 > 10 and float((rollback_scores.amax(-1) - rollback_scores.amin(-1)).max()) > 1e-3:
                fired["penalties differ after token 10"] += 1
        log_probs = step.log_softmax(-1)  # 3563-3565
        decisions.append(log_probs)
        best, flat = (scores[:, None] + log_probs).reshape(-1).topk(2 * beams)  # 3568, 3590-3595
        parents, new = flat[:beams] // vocab, flat[:beams] % vocab  # 3597-3598, process() without EOS
        chosen = (parents, new)
        tokens, scores = torch.cat([tokens[parents], new[:, None]], dim=1), best[:beams]  # 3611-3617
    return tokens[0], decisions, rollbacks, fired


def image_columns(model, sample):
    """The official key positions: LLaVA's image_start..image_end are its image tokens (llava.py
    205-210)."""
    return (sample["input_ids"][0] == model.config.image_token_id).nonzero().flatten()


def run_both(model, processor, prompts, beams, candidates, threshold, max_new):
    inputs = processor(images=random_images(len(prompts)), text=prompts, return_tensors="pt", padding=True)
    # scale and penalty weight: OPERA's defaults, against the official 50 and 1 (utils.py 3131, 3135).
    method = OPERA(model, inputs, threshold=threshold, num_candidates=candidates)
    out = veridical.generate(
        model,
        inputs,
        methods=[method],
        num_beams=beams,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=None,
    )
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    results = []
    for b, sample in enumerate(get_adapter(model).split_inputs(inputs)):
        reference = official_opera(
            eager, sample, image_columns(model, sample), beams, candidates, 50.0, threshold, 1.0, max_new
        )
        ours = (
            out[b, inputs["input_ids"].shape[1] :],
            method.step_scores[b],
            [r[1:] for r in method.rollbacks if r[0] == b],
        )
        results.append((ours, reference))
    return results


def assert_same_search(ours, reference):
    tokens, decisions, rollbacks = ours
    want_tokens, want_decisions, want_rollbacks, _ = reference
    assert rollbacks == want_rollbacks
    assert len(decisions) == len(want_decisions)
    for k, (got, want) in enumerate(zip(decisions, want_decisions, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"decision {k}")
    assert torch.equal(tokens, want_tokens)


@pytest.fixture(scope="module")
def planted():
    return planted_llava(early=0.8, late=2.5, seed=5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny forwards: a second thread only adds synchronisation (10x slower on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_opera_follows_the_official_search_through_rollbacks_after_token_10(planted):
    """Two prompts in one batch, each against the official search alone: every decision's scores
    (image reward, then column penalties), every rollback (target, where decoding resumed) and the
    output. The first prompt's attractors sit at response positions 10 and 13: rollbacks there are
    repeated, shifted one position earlier, exhausted, and a rollback to 10 leaves the bans of 13
    behind, which the next rollback to 13 applies again. The second prompt's sit at 9 and 12: the
    column at 9 recurs but lies before token 10, so only the one at 12 rolls back."""
    model, processor = planted
    first, second = run_both(model, processor, PROMPTS, beams=2, candidates=2, threshold=4, max_new=24)
    for ours, reference in (first, second):
        assert_same_search(ours, reference)
    fired = first[1][3]
    for rule in ("bans accumulate", "shifted", "exhausted", "stale bans", "penalties differ after token 10"):
        assert fired[rule] > 0, rule
    assert {target for _, target, _ in first[1][2]} == {EARLY, EARLY + 1, LATE, LATE + 1}
    fired = second[1][3]
    assert fired["recurs at 9"] > 0 and fired["penalties differ after token 10"] > 5
    assert {target for _, target, _ in second[1][2]} == {LATE - 1, LATE}


def test_opera_rollback_onto_the_newest_column_goes_back_one_step():
    """threshold 0: the column recurs the step after the attractor, so the code's target (one past the
    column) is the current step; it restores the previous step and books the rollback under the
    target (utils.py 3478-3495). One beam and one candidate (the official "fast" candidate count)."""
    model, processor = planted_llava(early=1.5, late=2.5, seed=0)
    [(ours, reference)] = run_both(
        model, processor, PROMPTS[:1], beams=1, candidates=1, threshold=0, max_new=16
    )
    assert_same_search(ours, reference)
    assert reference[3]["resumed before target"] > 0


@pytest.mark.parametrize("columns", ["code", "image"])
def test_opera_instructblip_image_reward_reads_the_official_columns(columns):
    """The LAVIS wrapper's key positions are image_start=1, image_end=32 (inclusive) for 32 query
    tokens at 0..31 (blip2_vicuna_instruct.py 372-377): the first step's reward reads columns
    1..num_query_tokens, the image tokens shifted by one (``image_columns="code"``)."""
    model, processor = tiny_model("instructblip")
    inputs = tiny_inputs("instructblip", processor, ["describe this image in detail please"])
    queries = model.config.num_query_tokens
    method = OPERA(model, inputs, num_candidates=3, image_columns=columns)
    veridical.generate(model, inputs, methods=[method], num_beams=2, max_new_tokens=1, do_sample=False)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    sample = get_adapter(model).split_inputs(inputs)[0]
    assert (sample["input_ids"][0, :queries] == model.config.image_token_index).all()
    wanted = torch.arange(1, queries + 1) if columns == "code" else torch.arange(queries)
    with torch.no_grad():
        logits = model(**sample).logits[0, -1].float()
    values, picks = logits.topk(3)
    expected = torch.full_like(logits, -999.0)
    for value, token in zip(values, picks, strict=True):
        longer = dict(sample)
        longer["input_ids"] = torch.cat([sample["input_ids"], token.view(1, 1)], dim=1)
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        with torch.no_grad():
            attention = eager(**longer, output_attentions=True).language_model_outputs.attentions[-1]
        row = attention[0, :, -1].amax(0).float()
        expected[token] = value + (row / row.sum())[wanted].sum()  # penalty = -image attention
    torch.testing.assert_close(method.step_scores[0][0][0], expected.log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_opera_bans_follow_the_official_per_position_lists():
    """reject_token_pos_gather (utils.py 3315, 3478-3481, 3540-3550) as a 512-entry list, against the
    bans veridical books for the same rollbacks: bans at the target accumulate, the next position's
    are dropped, later positions' stay, and the loop over dropped steps clears entries counted from
    the end of the list."""
    gather: list = [[] for _ in range(512)]
    ours: dict = {}
    # (step n, target, choice): repeated target, a target two before earlier bans, a long rollback
    # whose dropped-step loop reaches the end of the list.
    events = [(20, 14, [1, 2]), (22, 14, [3, 4]), (25, 12, [5, 6]), (30, 14, [7, 8]), (505, 11, [9, 10])]
    events += [(506, 13, [11, 12]), (509, 500, [13, 14]), (508, 14, [15, 16]), (490, 11, [17, 18])]
    gather[500] = torch.tensor([99])  # a ban the long rollback at step 505 must clear (511 - j)
    ours[500] = torch.tensor([99])
    for n, target, choice in events:
        choice = torch.tensor(choice)
        for j in range(n + 1 - target - 2):
            gather[-(j + 1)] = []
        gather[target + 1] = []
        pairs = choice if len(gather[target]) == 0 else torch.cat([gather[target], choice])
        gather[target] = pairs
        assert torch.equal(_record_bans(ours, target, n, choice), pairs)
        assert {k for k, v in enumerate(gather) if len(v)} == set(ours)


def test_opera_defaults_are_the_official_evaluation_settings():
    """chair_eval.py 85-88 and pope_eval.py 73-76 (scale_factor 50, threshold 15, num_attn_candidates 5,
    penalty_weights 1); the code's fixed 10 for the reward phase and the rollback start (utils.py 3440,
    3460); 5 beams (README lines 123 and 152)."""
    model, processor = tiny_model("llava")
    method = OPERA(model, tiny_inputs("llava", processor, ["what is this ?"]))
    settings = (method.scale, method.threshold, method.num_candidates, method.penalty_weight)
    assert settings == (50.0, 15, 5, 1.0)
    assert (method.image_reward_tokens, method.rollback_start, method.max_rollbacks) == (10, 10, 5)
    assert OPERA.generation_defaults == {"do_sample": False, "num_beams": 5}


def test_opera_recurring_column_is_the_mode_over_candidates_then_beams():
    """utils.py 3437-3438, 3444-3447, 3459: each beam's column is the mode of its candidates' argmax
    columns, the step's column the mode over beams (torch.mode: the smallest of the most frequent),
    and retrospection needs it more than ``threshold`` times in every beam slot's history. Beam 0's
    candidates argue for their own column (12), beam 1's first candidate too but its other two for
    column 11, beam 2's for 11, which every slot has seen three times before: the step's column is 11
    and it recurs; column 12 would not."""
    model, processor = tiny_model("llava")
    method = OPERA(model, tiny_inputs("llava", processor, ["what is this ?"]), threshold=2)
    prompt, n, eps = 4, 12, 1e-3
    rows = torch.full((3, 3, prompt + n + 1), eps)  # (beams, candidates, keys + own column)
    rows[0, :, prompt + 12] = 0.5  # attend to themselves
    rows[1, 0, prompt + 12] = 0.5
    rows[1, 1:, prompt + 11] = 0.5  # attend to the last generated token
    rows[2, :, prompt + 11] = 0.5
    earlier = torch.full((3, n, n), eps).tril()
    earlier[1:, 11, 11] = 0.5
    request = _Decide(
        rows=rows,
        attention=earlier,
        history=torch.tensor([[0] * 9 + [11] * 3] * 3),
        image=torch.tensor([False, True, True, False]),
        candidates=torch.tensor([[5, 6, 7]] * 3),
        candidate_logits=torch.zeros(3, 3),
        vocab=10,
    )
    decision = method._decide({0: request})[0]
    assert decision.history[:, -1].tolist() == [12, 11, 11]
    assert decision.location == 11 and decision.may_roll_back

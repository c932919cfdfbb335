"""DeCo against the official rule applied to transformers' own outputs of the same generate() call.

At every step, transformers' ``output_hidden_states`` gives ``hidden_states[i]`` (the input of decoder
layer ``i``) and ``output_logits`` the step's raw final logits; the expected scores follow zjunlp/Deco
at fee8d75, ``transformers/generation/utils.py`` lines 2661-2682, one prompt at a time as the official
code runs: early-exit logits ``lm_head(norm(hidden_states[i]))`` (``modeling_llama.py`` lines 819-824),
candidates by ``topk`` + ``cumsum`` + ``searchsorted(right=False)`` + 1 capped at ``top_k``, the flat
argmax over (layers x candidates) of the early-exit probabilities, and ``l + alpha * p_max * l_anchor``
with every non-candidate at -inf. The model has 32 layers, so the official window
``hidden_states[20..28]`` applies literally; its LM head is scaled up so that the final distributions
are peaked enough for the top-p cut to end the candidate set before ``top_k``.
"""

from __future__ import annotations

import pytest
import torch
from test_oracle_pai_vhr import build_llava

import veridical
from veridical.errors import MethodSpecError

NEW_TOKENS = 3
WINDOW = range(20, 29)  # --start_layer 20 --end_layer 29 (chair_llava.py lines 174-175)


@pytest.fixture(scope="module")
def llava():
    model, inputs = build_llava(seed=3, heads=4, kv_heads=2)
    with torch.no_grad():
        model.lm_head.weight *= 20.0
    return model, inputs


def official_scores(model, raw: torch.Tensor, hidden: tuple, alpha: float, top_p: float, top_k: int):
    """The official mixed logits of each row (raw final logits ``(B, V)``, hidden states of the step)."""
    norm, lm_head = model.model.language_model.norm, model.lm_head
    rows, counts = [], []
    for b in range(raw.shape[0]):
        probs = torch.softmax(raw[b], dim=-1)
        top_probs, top_ids = torch.topk(probs, k=top_k)
        n = min(int(torch.searchsorted(top_probs.cumsum(-1), torch.tensor(top_p), right=False)) + 1, top_k)
        candidates = top_ids[:n]
        early = torch.stack([lm_head(norm(hidden[i][b, -1])).float() for i in WINDOW])  # (layers, V)
        early_probs = torch.softmax(early, dim=-1)[:, candidates]
        flat = int(torch.argmax(early_probs))
        p_max = float(early_probs.max())
        anchor = early[flat // early_probs.shape[1]]
        mixed = raw[b] + alpha * p_max * anchor
        removed = torch.ones_like(mixed, dtype=torch.bool)
        removed[candidates] = False
        rows.append(mixed.masked_fill(removed, -torch.inf))
        counts.append(n)
    return torch.stack(rows), counts


@pytest.mark.parametrize(("alpha", "top_p", "top_k"), [(0.6, 0.9, 20), (2.0, 0.5, 8)])
def test_every_step_equals_the_official_mix(llava, alpha, top_p, top_k):
    model, inputs = llava
    with torch.no_grad():
        out = veridical.generate(
            model,
            inputs,
            [{"name": "deco", "alpha": alpha, "top_p": top_p, "top_k": top_k}],
            # No min_new_tokens: its processor would remove EOS before DeCo sees the scores, while the
            # official candidates come from the raw logits (a difference the docstring lists).
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            output_logits=True,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        counts = []
        assert len(out.scores) == NEW_TOKENS
        for step in range(NEW_TOKENS):
            want, n = official_scores(
                model, out.logits[step].float(), out.hidden_states[step], alpha, top_p, top_k
            )
            counts += n
            got = out.scores[step]
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            torch.testing.assert_close(got, torch.log_softmax(want, dim=-1), atol=2e-5, rtol=1e-5)
    # The top-p cut closes every set here before top_k, with more than one candidate in some.
    assert max(counts) < top_k and 1 < max(counts)


def test_alpha_zero_keeps_greedy_tokens_and_the_anchor_changes_them(llava):
    model, inputs = llava
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        vanilla = veridical.generate(model, inputs, [], **kwargs)
        neutral = veridical.generate(model, inputs, [{"name": "deco", "alpha": 0.0}], **kwargs)
        strong = veridical.generate(model, inputs, [{"name": "deco", "alpha": 5.0}], **kwargs)
    assert torch.equal(neutral, vanilla)
    assert not torch.equal(strong, vanilla)


def test_batch_equals_each_prompt_alone(llava):
    model, inputs = llava
    kwargs = dict(
        max_new_tokens=3, min_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        batch = veridical.generate(model, inputs, ["deco"], **kwargs)
        for row in range(inputs["input_ids"].shape[0]):
            real = inputs["attention_mask"][row].bool()
            alone = {k: v[row : row + 1] for k, v in inputs.items()}
            for key in ("input_ids", "attention_mask"):
                alone[key] = alone[key][:, real]
            single = veridical.generate(model, alone, ["deco"], **kwargs)
            for a, b in zip(single.scores, batch.scores, strict=True):
                assert torch.equal(torch.isinf(a[0]), torch.isinf(b[row]))
                torch.testing.assert_close(a[0], b[row], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "decoding", [dict(num_beams=3), dict(do_sample=True, top_k=0)], ids=["beams", "sample"]
)
def test_runs_under_beam_search_and_sampling_and_stacks(llava, decoding):
    model, inputs = llava
    with torch.no_grad():
        out = veridical.generate(model, inputs, ["deco", "pai", "vcd"], max_new_tokens=4, **decoding)
    assert out.shape[0] == inputs["input_ids"].shape[0]


def test_opera_refuses_deco(llava):
    model, inputs = llava
    with pytest.raises(MethodSpecError, match="OPERA cannot be stacked"):
        veridical.generate(model, inputs, ["deco", "opera"], max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "deco", "top_p": 0.0}, "top_p"),
        ({"name": "deco", "top_k": 0}, "top_k"),
        ({"name": "deco", "layers": [32]}, "not in 0..31"),
    ],
)
def test_bad_settings_are_refused(llava, spec, message):
    model, inputs = llava
    with pytest.raises(MethodSpecError, match=message):
        veridical.generate(model, inputs, [spec], max_new_tokens=1)

"""Evaluation protocols (``veridical eval --protocol``): each resolves to what the official script sets.

Every expected value below is written from the official code (repository, file and line at the snapshot
commit in the comment), not read from ``veridical.evals.protocols``. The runs use the tiny random-weight
LLaVA-1.5 and InstructBLIP models; ``veridical.generate`` is wrapped to record what the runner passes
and to cut generation to two tokens, and transformers' own processor list is recorded as built.
"""

from __future__ import annotations

import json
import re

import pytest
from transformers.generation.utils import GenerationMixin

import veridical
from veridical.cli import main
from veridical.evals.chair import Chair, ChairScorer, ChairVocabulary, GroundTruth
from veridical.evals.pope import PopeScorer
from veridical.evals.protocols import (
    ProtocolError,
    check_protocol,
    protocols_table,
    render_prompt,
    resolve_run,
)
from veridical.evals.runner import EvalConfig, run_eval
from veridical.evals.samples import chair_samples, pope_samples
from veridical.evals.sweep import SweepError, cell_request, load_sweep

# LLaVA-1.5 system messages: haotian-liu/LLaVA@c121f04 llava/conversation.py:242-251 (vicuna_v1, also
# seilk/VisAttnSink@98e62d6 src/conversation.py:247-256 and the OPERA/VISTA/PAI/PAINT constants);
# DAMO-NLP-SG/VCD@d6568ff experiments/llava/conversation.py:335-345 and sangminwoo/AvisC@772eba4
# experiments/llava/conversation.py:325-333 (llava_v1, the "human" wording).
USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def conv_v1(system: str, message: str) -> str:
    """LLaVA's ``conv.get_prompt()`` for SeparatorStyle.TWO with one user message and an open reply
    (haotian-liu/LLaVA@c121f04 llava/conversation.py:54-63): system, " ", "USER: ", message, " ",
    "ASSISTANT:"; the message is "<image>\\n" + question (llava/eval/model_vqa_loader.py:46)."""
    return system + " " + "USER: " + "<image>\n" + message + " " + "ASSISTANT:"


def opera_style(question: str) -> str:
    """OPERA's ``"USER: <ImageHere> <question> ASSISTANT:"`` (shikiw/OPERA@61426ef pope_eval.py:50) after
    the system message with no separator (minigpt4/models/llava.py:172; VISTA myutils.py:30-34, PAI
    pope_eval.py:94-96 do the same)."""
    return USER + "USER: <image> " + question + " ASSISTANT:"


LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA docs/Evaluation.md:16-17
VCD_SUFFIX = " Please answer this question with one word."  # VCD object_hallucination_vqa_llava.py:50
OPERA_REQUEST = "Please describe this image in detail."  # OPERA chair_eval.py:166
HELP_REQUEST = "Please help me describe the image in detail."  # VISTA chair_eval.py:98, PAI chair_eval.py:94

#: (protocol, benchmark) -> generate() settings for LLaVA-1.5.
GENERATION = {
    # LLaVA model_vqa_loader.py:109 (--temperature 0 in pope.sh:8 -> greedy), :140 (1 beam), :141 (128).
    ("llava", "pope"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 128},
    # VCD object_hallucination_vqa_llava.py:75 do_sample, :79 1024 tokens, :111 T=1, :112 top_p=1,
    # :113 top_k=None (no top-k; 0 is "off" in transformers 5.24: test_vcd_and_avisc_sample_without_top_k).
    ("vcd", "pope"): {
        "do_sample": True,
        "num_beams": 1,
        "max_new_tokens": 1024,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
    },
    # OPERA pope_eval.py:204 (10 tokens), chair_eval.py:176 (512), README.md:123 and :152 (--beam 5).
    ("opera", "pope"): {"do_sample": False, "num_beams": 5, "max_new_tokens": 10},
    ("opera", "chair"): {"do_sample": False, "num_beams": 5, "max_new_tokens": 512},
    # VISTA pope_eval.py:40-42 (32 tokens, store_true sampling not passed, 1 beam), chair_eval.py:39-41.
    ("vista", "pope"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 32},
    ("vista", "chair"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 512},
    # AvisC pope_eval_batch.sh:15 (max_token 64), pope_eval_llavab.py:268 do_sample, :61-63 T, top_p, top_k.
    ("avisc", "pope"): {
        "do_sample": True,
        "num_beams": 1,
        "max_new_tokens": 64,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
    },
    # PAI pope_eval.py:47-48, :56 and chair_eval.py:47-48, :56; PAINT modPAI/chair_eval.py:47-48, :59.
    ("pai", "pope"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 512},
    ("pai", "chair"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 512},
    ("paint", "chair"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 512},
    # VAR A_exps/lv1.5_7b.yml:17 (128 tokens), src/inference.py:132 (greedy).
    ("var", "pope"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 128},
    # ClearSight visaug/inference/infer_pope.py:91-96: max_new_tokens=1024, no sampling or beam argument.
    ("vaf", "pope"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 1024},
    # Deco pope_llava.py:114 + :158 (--temperature -1: greedy), :118 (5 tokens); chair_llava.py:124/:164,
    # :127/:167 (1 beam), :168 (512).
    ("deco", "pope"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 5},
    ("deco", "chair"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 512},
    # MemVR eval_scripts/llava/chair.sh:10 (--temperature 0) and :15 (1024 tokens); the loader's :78 (1 beam).
    ("memvr", "chair"): {"do_sample": False, "num_beams": 1, "max_new_tokens": 1024},
    # veridical's default (the README's documented one): greedy, 128 / 512 tokens.
    ("default", "pope"): {"do_sample": False, "max_new_tokens": 128},
    ("default", "chair"): {"do_sample": False, "max_new_tokens": 512},
}

#: (protocol, benchmark) -> the prompt LLaVA-1.5 receives for request / question ``q``.
PROMPTS = {
    ("llava", "pope"): lambda q: conv_v1(USER, q + LLAVA_SUFFIX),  # pope.sh:9 --conv-mode vicuna_v1
    ("vcd", "pope"): lambda q: conv_v1(HUMAN, q + VCD_SUFFIX),  # VCD --conv-mode default llava_v1 (:108)
    ("opera", "pope"): opera_style,
    ("opera", "chair"): opera_style,
    ("vista", "pope"): opera_style,
    ("vista", "chair"): opera_style,
    ("avisc", "pope"): lambda q: conv_v1(HUMAN, q),  # pope_eval_llavab.py:58 llava_v1, :219 no suffix
    ("pai", "pope"): opera_style,
    ("pai", "chair"): opera_style,
    ("paint", "chair"): opera_style,
    ("var", "pope"): lambda q: conv_v1(USER, q),  # VAR A_exps/lv1.5_7b.yml:9 vicuna_v1, inference.py:105
    # ClearSight infer_pope.py:37 (--conv-mode vicuna_v1), :70 (the suffix).
    ("vaf", "pope"): lambda q: conv_v1(USER, q + " Please just answer yes or no."),
    # Deco pope_llava.py:84-86 (llava_v1 for a "v1" model name), :73 (no suffix); chair_llava.py:161.
    ("deco", "pope"): lambda q: conv_v1(HUMAN, q),
    ("deco", "chair"): lambda q: conv_v1(HUMAN, q),
    ("memvr", "chair"): lambda q: conv_v1(USER, q),  # MemVR llava_model_vqa_loader_chair.py:73 vicuna_v1
}

#: (protocol, benchmark) -> the CHAIR request.
REQUESTS = {
    ("opera", "chair"): OPERA_REQUEST,
    ("vista", "chair"): HELP_REQUEST,
    ("pai", "chair"): HELP_REQUEST,
    ("paint", "chair"): HELP_REQUEST,  # PAINT modPAI/chair_eval.py:100
    ("default", "chair"): OPERA_REQUEST,
    ("deco", "chair"): OPERA_REQUEST,  # Deco chair_llava.py:99
    ("memvr", "chair"): OPERA_REQUEST,  # MemVR llava_model_vqa_loader_chair.py:176
}

#: (protocol, benchmark) -> POPE answer parser.
RULES = {
    ("llava", "pope"): "llava",  # LLaVA llava/eval/eval_pope.py:11-20
    ("vcd", "pope"): "vcd",  # VCD experiments/eval/eval_pope.py:39-50 (label-aware substring test)
    ("opera", "pope"): "opera",  # OPERA pope_eval.py:123-135
    ("vista", "pope"): "opera",  # VISTA pope_ans.py:11-24, OPERA's recorder
    ("avisc", "pope"): "opera",  # AvisC pope_eval_llavab.py:131-142, OPERA's recorder
    ("pai", "pope"): "opera",  # PAI pope_ans.py:11-24
    ("var", "pope"): "llava",  # VAR src/eval/quick_eval_pope.py:23-35, LLaVA's rule
    # ClearSight visaug/inference/eval_pope.py:24-33: 'yes' in a yes answer, 'no' or 'not' in a no one.
    ("vaf", "pope"): "vcd",
    ("deco", "pope"): "vcd",  # Deco eval_tool/eval_pope.py:39-50, VCD's label-dependent substring test
    ("default", "pope"): "llava",
}

#: (protocol, benchmark, method) -> the method's hyper-parameters in that script (LLaVA-1.5).
METHODS = {
    # VCD llava1.5_pope.bash:5-7 (cd_alpha 1, cd_beta 0.2, noise_step 500).
    ("vcd", "pope", "vcd"): {"alpha": 1.0, "beta": 0.2, "noise_step": 500},
    # OPERA README.md:123/:152: --scale_factor 50 --threshold 15 --num_attn_candidates 5 --penalty_weights 1.
    ("opera", "pope", "opera"): {"scale": 50.0, "threshold": 15, "num_candidates": 5, "penalty_weight": 1.0},
    ("opera", "chair", "opera"): {"scale": 50.0, "threshold": 15, "num_candidates": 5, "penalty_weight": 1.0},
    # VISTA run_pope.sh:10,12 and run_chair.sh:9,11.
    ("vista", "pope", "vista"): {"lam": 0.01, "logits_alpha": 0.3},
    ("vista", "chair", "vista"): {"lam": 0.17, "logits_alpha": 0.3},
    # AvisC pope_eval_batch.sh:11 layer_gamma, :13 lamb, :17 cd_alpha, :18 cd_beta.
    ("avisc", "pope", "avisc"): {"alpha": 1.0, "beta": 0.1, "gamma": 0.5, "lam": 1.0},
    # PAI README.md:65 and :82: --alpha 0.2 --use-cfg --gamma 1.1.
    ("pai", "pope", "pai"): {"alpha": 0.2, "gamma": 1.1},
    ("pai", "chair", "pai"): {"alpha": 0.2, "gamma": 1.1},
    # PAINT modPAI/chair_eval.py:50-52 (top_token_ratio, alpha, beta), modPAI/README.md:82 (--gamma 1.1).
    ("paint", "chair", "paint"): {
        "local_alpha": 0.7,
        "summary_alpha": 0.3,
        "local_ratio": 0.25,
        "gamma": 1.1,
    },
    # VAR A_exps/lv1.5_7b.yml:12-15.
    ("var", "pope", "var"): {"tau": 20.0, "rho": 0.5, "p": 0.6, "summ": 0.2},
    # ClearSight visaug/inference/infer_pope.sh:7-8 (--enh-para 1.15 --sup-para 0.95).
    ("vaf", "pope", "vaf"): {"enhance": 1.15, "suppress": 0.95},
    # Deco pope_llava.py:161-163 and chair_llava.py:171-173 (alpha, threshold_top_p, threshold_top_k).
    ("deco", "pope", "deco"): {"alpha": 0.6, "top_p": 0.9, "top_k": 20},
    ("deco", "chair", "deco"): {"alpha": 0.6, "top_p": 0.9, "top_k": 20},
    # MemVR llava_model_vqa_loader_chair.py:114-120 (hard-coded; chair.sh's 0.31 is not read).
    ("memvr", "chair", "memvr"): {"retracing_ratio": 0.12, "entropy_threshold": 0.75},
}


# -- resolution ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol, benchmark", sorted(GENERATION))
def test_each_protocol_resolves_to_the_official_decoding_and_parser(protocol, benchmark):
    run = resolve_run(protocol, benchmark, "llava", [])
    assert run.generation == GENERATION[protocol, benchmark]
    assert run.rule == RULES.get((protocol, benchmark))
    assert run.instruction == REQUESTS.get((protocol, benchmark))
    assert run.record["name"] == protocol and run.record["overridden"] == {}


@pytest.mark.parametrize("protocol, benchmark, method", sorted(METHODS))
def test_a_protocol_sets_its_own_method_to_the_scripts_values(protocol, benchmark, method):
    run = resolve_run(protocol, benchmark, "llava", [method, "vhr"])
    assert run.methods == [{"name": method, **METHODS[protocol, benchmark, method]}, "vhr"]


def test_vcd_on_instructblip_takes_its_lavis_path():
    run = resolve_run("vcd", "pope", "instructblip", ["vcd"])
    # VCD object_hallucination_vqa_instructblip.py:61-64 never passes cd_alpha, so vcd_sample.py:142
    # falls back to 0.5; cd_beta is the argparse default 0.1 (:95); noise_step 500 (:92).
    assert run.methods == [{"name": "vcd", "alpha": 0.5, "beta": 0.1, "noise_step": 500}]
    # LAVIS generate(): max_length=256, min_length=1, temperature=1 (blip2_vicuna_instruct.py:246-252),
    # nucleus sampling with top_p 1 and repetition_penalty 1 (instructblip.py:62-63), and no top_k, so
    # transformers 4.x's default 50 (transformers-4.29.2 configuration_utils.py:242).
    assert run.generation == {
        "do_sample": True,
        "num_beams": 1,
        "max_new_tokens": 256,
        "min_new_tokens": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 50,
        "repetition_penalty": 1.0,
    }
    assert run.prompt == {"suffix": VCD_SUFFIX, "template": "{image}{question}"}


def test_opera_on_instructblip_keeps_the_lavis_wrappers_penalty():
    # OPERA minigpt4/models/blip2_vicuna_instruct.py (61426ef): generate() defaults min_length=1 and
    # repetition_penalty=1.5 (lines 249, 252) and passes both to transformers (lines 387, 390).
    run = resolve_run("opera", "chair", "instructblip", ["opera"])
    assert run.generation == {
        "max_new_tokens": 512,
        "do_sample": False,
        "num_beams": 5,
        "min_new_tokens": 1,
        "repetition_penalty": 1.5,
    }
    assert "repetition_penalty" not in resolve_run("opera", "chair", "llava", ["opera"]).generation


def test_the_default_protocol_keeps_each_methods_paper_decoding():
    assert resolve_run(None, "pope", "llava", ["opera"]).generation["num_beams"] == 5
    assert resolve_run(None, "pope", "llava", ["vcd"]).generation["do_sample"] is True
    # A named protocol fixes decoding for every method: OPERA under LLaVA's protocol is greedy.
    assert resolve_run("llava", "pope", "llava", ["opera"]).generation["num_beams"] == 1


def test_greedy_drops_the_sampling_settings_it_did_not_ask_for():
    # VCD's paper decoding samples with temperature 1, top-p 1 and no top-k (top_k=0); turned greedy,
    # those settings would only make transformers warn, so they go unless the user set them.
    greedy = resolve_run(None, "pope", "llava", ["vcd"], {"do_sample": False}).generation
    assert greedy["do_sample"] is False and not {"temperature", "top_p", "top_k"} & set(greedy)
    kept = resolve_run("vcd", "pope", "llava", ["vcd"], {"do_sample": False, "top_k": 5}).generation
    assert kept["top_k"] == 5 and "temperature" not in kept


def test_unknown_names_and_undefined_benchmarks_are_one_clear_error():
    with pytest.raises(
        ProtocolError, match=r"unknown protocol 'vdc'; known protocols: avisc, deco, default, llava, memvr"
    ):
        check_protocol("vdc", "pope")
    with pytest.raises(ProtocolError, match=r"'paint' defines no pope setting .*protocols with pope: avisc"):
        check_protocol("paint", "pope")
    with pytest.raises(ProtocolError, match="no CHAIR evaluation"):
        check_protocol("vcd", "chair")


def test_a_user_template_must_place_the_question_and_the_image(tiny_models):
    with pytest.raises(ProtocolError, match="no {question} field"):
        resolve_run("llava", "pope", "llava", [], template="USER: {image} ASSISTANT:")
    model, processor = tiny_models("llava")
    with pytest.raises(ProtocolError, match="no {image} field"):
        render_prompt(model, processor, "Is there a cat?", {"template": "USER: {question} ASSISTANT:"})


# -- what the model receives --------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Records every ``veridical.generate`` call of the runner and transformers' processor lists."""
    calls, processors = [], []
    real_generate = veridical.generate
    real_processors = GenerationMixin._get_logits_processor

    def generate(model, inputs, methods=(), **kwargs):
        calls.append({"inputs": dict(inputs), "methods": list(methods), "kwargs": dict(kwargs)})
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], 2)
        return real_generate(model, inputs, methods=methods, **kwargs)

    def get_processors(self, *args, **kwargs):
        out = real_processors(self, *args, **kwargs)
        processors.append([type(p).__name__ for p in out])
        return out

    monkeypatch.setattr(veridical, "generate", generate)
    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", get_processors)
    return calls, processors


def run_protocol(protocol, benchmark, family, tiny_models, dataset, out, methods=(), **user):
    """One sample through ``run_eval`` with a protocol resolved as ``veridical eval`` resolves it."""
    model, processor = tiny_models(family)
    run = resolve_run(protocol, benchmark, model.config.model_type, list(methods), **user)
    if benchmark == "pope":
        samples, scorer = pope_samples(dataset / "pope.json", dataset)[:1], PopeScorer(run.rule)
    else:
        vocabulary = ChairVocabulary.from_file(None)
        chair = Chair(GroundTruth.from_coco(dataset, vocabulary), vocabulary)
        samples = chair_samples(dataset, list(chair.ground_truth), 1, 0, run.instruction)
        scorer = ChairScorer(chair, bootstrap=0)
    config = EvalConfig(
        benchmark, family, run.methods, {}, run.generation, 1, 0, prompt=run.prompt, protocol=run.record
    )
    results = run_eval(config, model, processor, samples, scorer, out, progress=False)
    record = json.loads((out / "samples.rank0.jsonl").read_text().splitlines()[0])
    return samples[0], record, results, processor


@pytest.mark.parametrize("protocol, benchmark", sorted(PROMPTS))
def test_the_model_receives_the_scripts_prompt(protocol, benchmark, tiny_models, dataset, tmp_path, spy):
    calls, _ = spy
    sample, record, results, processor = run_protocol(
        protocol, benchmark, "llava", tiny_models, dataset, tmp_path
    )
    expected = PROMPTS[protocol, benchmark](sample.question)
    assert record["prompt"] == expected
    # The exact text reached the tokenizer: the ids the model got are the processor's for that text.
    ids = processor(images=[sample.load_image()], text=[expected], return_tensors="pt")["input_ids"]
    assert calls[0]["inputs"]["input_ids"].tolist() == ids.tolist()
    generation = dict(calls[0]["kwargs"])
    assert generation.pop("compile") is False  # how the steps run, not a protocol setting
    assert generation == GENERATION[protocol, benchmark]
    assert results["protocol"]["name"] == protocol and results["generation"] == generation


@pytest.mark.parametrize("protocol", ["default", "llava"])
def test_families_without_a_template_use_the_chat_template(protocol, tiny_models, dataset, tmp_path, spy):
    sample, record, _, processor = run_protocol(
        protocol, "pope", "llava", tiny_models, dataset, tmp_path, template=""
    )
    suffix = LLAVA_SUFFIX if protocol == "llava" else ""
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question + suffix}]}
    ]
    assert record["prompt"] == processor.apply_chat_template(conversation, add_generation_prompt=True)


@pytest.mark.parametrize(
    "protocol, prompt",
    [
        # VCD object_hallucination_vqa_instructblip.py:49: the question and the suffix, nothing else.
        ("vcd", lambda q: q + VCD_SUFFIX),
        # OPERA "<ImageHere><question>" split at the image (blip2_vicuna_instruct.py:281): the question.
        ("opera", lambda q: q),
    ],
)
def test_instructblip_gets_the_lavis_prompt(protocol, prompt, tiny_models, dataset, tmp_path, spy):
    _, processors = spy
    sample, record, results, _ = run_protocol(
        protocol, "pope", "instructblip", tiny_models, dataset, tmp_path
    )
    assert record["prompt"] == prompt(sample.question)
    assert results["protocol"]["family"] == "instructblip"
    if protocol == "vcd":
        # LAVIS samples with transformers 4.x's top-k 50 (no top_k passed) and min_length=1; T=1 and
        # top_p=1 add no warper (VCD blip2_vicuna_instruct.py:246-252, 385-401).
        names = set(processors[0])
        assert {"TopKLogitsWarper", "MinNewTokensLengthLogitsProcessor"} <= names
        assert not names & {"TemperatureLogitsWarper", "TopPLogitsWarper"}


def test_vcd_and_avisc_sample_without_top_k(tiny_models, dataset, tmp_path, spy):
    """The official LLaVA scripts pass top_k=None (VCD :113, AvisC :63): no top-k warper. Nor a
    temperature or top-p warper (T=1, top_p=1)."""
    calls, processors = spy
    for protocol in ("vcd", "avisc"):
        processors.clear()
        run_protocol(protocol, "pope", "llava", tiny_models, dataset, tmp_path / protocol)
        assert not set(processors[0]) & {"TopKLogitsWarper", "TemperatureLogitsWarper", "TopPLogitsWarper"}
    # Without a protocol's top_k, transformers 5 would add top-k 50 to the same sampling call.
    kwargs = {k: v for k, v in calls[0]["kwargs"].items() if k != "top_k"}
    model, processor = tiny_models("llava")
    processors.clear()
    veridical.generate(model, calls[0]["inputs"], **{**kwargs, "max_new_tokens": 1})
    assert "TopKLogitsWarper" in processors[0]


def test_the_method_is_built_with_the_protocols_values(tiny_models, dataset, tmp_path, spy):
    calls, _ = spy
    _, _, results, _ = run_protocol("vcd", "pope", "llava", tiny_models, dataset, tmp_path, methods=["vcd"])
    assert calls[0]["methods"] == [{"name": "vcd", "alpha": 1.0, "beta": 0.2, "noise_step": 500}]
    assert results["methods"][0]["beta"] == 0.2
    assert results["protocol"]["settings"]["vcd.beta"] == 0.2
    assert results["protocol"]["citations"]["vcd.beta"].endswith(
        "experiments/cd_scripts/llava1.5_pope.bash:6"
    )


# -- the command line ---------------------------------------------------------------------------------


def eval_args(model_dir, dataset, out, *extra):
    return [
        "eval",
        "pope",
        "--model",
        str(model_dir),
        "--questions",
        str(dataset / "pope.json"),
        "--images",
        str(dataset),
        "--output",
        str(out),
        "--limit",
        "2",
        "--no-progress",
        *extra,
    ]


def test_user_flags_override_the_protocol_and_are_recorded(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    extra = ["--protocol", "vcd", "--method", "vcd:beta=0.1", "--max-new-tokens", "3", "--rule", "llava"]
    assert main(eval_args(model_dir, dataset, out, *extra, "--question-suffix", " Yes or no?")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["generation"]["max_new_tokens"] == 3 and results["generation"]["do_sample"] is True
    assert results["methods"][0]["beta"] == 0.1 and results["methods"][0]["alpha"] == 1.0
    assert results["metrics"]["rule"] == "llava" and results["data"]["rule"] == "llava"
    assert results["protocol"]["overridden"] == {
        "max_new_tokens": {"protocol": 1024, "user": 3},
        "vcd.beta": {"protocol": 0.2, "user": 0.1},
        "rule": {"protocol": "vcd", "user": "llava"},
        "question_suffix": {"protocol": VCD_SUFFIX, "user": " Yes or no?"},
    }
    prompts = [json.loads(line)["prompt"] for line in (out / "samples.rank0.jsonl").read_text().splitlines()]
    assert all(p.startswith(HUMAN) and p.endswith("? Yes or no? ASSISTANT:") for p in prompts)
    # Another protocol into the same folder is another run; in its own folder it parses as OPERA does.
    opera = ("--protocol", "opera", "--max-new-tokens", "3")
    assert main(eval_args(model_dir, dataset, out, *opera)) == 2
    assert main(eval_args(model_dir, dataset, tmp_path / "opera", *opera)) == 0
    results = json.loads((tmp_path / "opera" / "results.json").read_text())
    assert results["metrics"]["rule"] == "opera" and results["generation"]["num_beams"] == 5


def test_a_chair_run_asks_the_scripts_request_with_the_methods_values(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "chair", "--model", str(model_dir), "--images", str(dataset), "--coco-annotations"]
    args += [str(dataset), "--num-images", "2", "--output", str(out), "--no-progress", "--protocol", "pai"]
    assert main([*args, "--method", "pai", "--max-new-tokens", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["prompt"] == HELP_REQUEST  # PAI chair_eval.py:94
    assert {k: results["methods"][0][k] for k in ("alpha", "gamma")} == {"alpha": 0.2, "gamma": 1.1}
    prompts = [json.loads(line)["prompt"] for line in (out / "samples.rank0.jsonl").read_text().splitlines()]
    assert prompts == [opera_style(HELP_REQUEST)] * 2


def test_a_default_run_records_the_default_protocol(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    assert main(eval_args(model_dir, dataset, out, "--max-new-tokens", "2")) == 0
    assert json.loads((out / "config.json").read_text())["protocol"] == "default"
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["name"] == "default" and results["metrics"]["rule"] == "llava"


@pytest.mark.parametrize(
    "protocol, message",
    [
        (
            "vdc",
            "unknown protocol 'vdc'; known protocols: avisc, deco, default, llava, memvr, opera, pai, paint, "
            "vaf, var, vcd, ",
        ),
        ("paint", "protocol 'paint' defines no pope setting"),
    ],
)
def test_bad_protocols_fail_before_loading_the_model(protocol, message, dataset, tmp_path, capsys):
    assert main(eval_args(tmp_path / "no-model", dataset, tmp_path / "o", "--protocol", protocol)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_protocols_command_lists_the_table_and_citations(capsys):
    assert main(["protocols"]) == 0
    table = capsys.readouterr().out
    for name in ("default", "llava", "vcd", "opera", "vista", "avisc", "pai", "paint", "var"):
        assert f"\n{name} " in "\n" + table
    assert main(["protocols", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| protocol | benchmark |")
    assert main(["protocols", "vista"]) == 0
    assert "LzVv123456/VISTA@dc62252 run_pope.sh:10" in capsys.readouterr().out
    assert main(["protocols", "nope"]) == 2


# -- sweeps -------------------------------------------------------------------------------------------


def test_sweeps_accept_a_protocol_or_a_list(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "models: [m]\nbenchmarks: {pope: {images: x, pope_set: coco/random}}\n"
        "methods: [[], vcd]\nprotocol: [llava, vcd]\n"
    )
    settings, cells = load_sweep(path)
    assert [(c.protocol, c.name) for c in cells] == [
        ("llava", "m__pope__vanilla__llava"),
        ("llava", "m__pope__vcd__llava"),
        ("vcd", "m__pope__vanilla__vcd"),
        ("vcd", "m__pope__vcd__vcd"),
    ]
    assert cell_request(settings, cells[3], tmp_path / "c").protocol == "vcd"
    path.write_text("models: [m]\nbenchmarks: {chair: {images: x, gt: y}}\nmethods: [vcd]\nprotocol: vcd\n")
    with pytest.raises(SweepError, match="'vcd' defines no chair setting"):
        load_sweep(path)


def test_readme_table_is_the_commands_output():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- protocols:start -->\n(.*?)<!-- protocols:end -->", readme, re.S)
    assert block, "README.md lost its protocols block"
    assert block.group(1) == protocols_table(markdown=True) + "\n"

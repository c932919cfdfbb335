"""Evaluation protocols: what each paper's official POPE / CHAIR script sets, under one name.

Most "I cannot reproduce your numbers" reports come from the protocol, not the method: the prompt
suffix, the conversation template, the answer length, the decoding and the answer parser. A protocol
fixes all of them as the official evaluation script does, so ``veridical eval pope --protocol vcd``
asks the question, decodes and parses the answer as ``DAMO-NLP-SG/VCD`` does, whatever methods run.

The registry below is data: per protocol and benchmark, a table of settings, each with the file and
line of the official code it comes from (``owner/repo@commit path:line``, the snapshot read), plus
per-family differences (the scripts run LLaVA-1.5 through its own conversation code and InstructBLIP
through LAVIS). Keys:

- ``question_suffix`` (POPE): text appended to the question file's question.
- ``instruction`` (CHAIR): the captioning request.
- ``template``: the whole prompt, ``{image}`` standing for the model's image placeholder and
  ``{question}`` for the question (with its suffix). Families without one use the processor's chat
  template, as the default protocol does: the official scripts only cover LLaVA-1.5 and InstructBLIP.
- ``max_new_tokens``, ``min_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
  ``num_beams``, ``repetition_penalty``: passed to ``generate()``. ``top_k=0`` means "no top-k": the
  official LLaVA-path scripts pass ``top_k=None``, which transformers 4.x took as "no top-k warper";
  transformers 5 adds top-k 50 to sampling unless ``top_k`` is ``None`` or ``0`` (checked in 5.24:
  ``_get_logits_processor`` adds ``TopKLogitsWarper`` only for ``top_k not in (None, 0)``), and ``0``
  also survives JSON and YAML round trips as "off".
- ``rule`` (POPE): the answer parser of :mod:`veridical.evals.pope`.
- ``<method>.<hyper-parameter>``: the method's value in that script; applied only when the method
  is in the stack.
- ``seed``: recorded, not applied. The scripts seed a global generator once and sample question after
  question; veridical seeds every batch from ``--seed`` (so results do not depend on the process
  split), so the scripts' random streams cannot be reproduced and the value is kept as a record.

Precedence, lowest first: the default protocol's settings, each method's paper decoding
(``generation_defaults``; default protocol only) and per-benchmark hyper-parameters
(``benchmark_hyperparameters``), the protocol's settings, then whatever the user passes explicitly
(``--max-new-tokens``, ``--gen``, ``--rule``, ``--prompt``, ``--question-suffix``,
``--prompt-template``, ``--method vcd:beta=...``). ``results.json`` records the protocol's name,
its resolved settings with their citations, and every protocol value the user overrode.

**The default protocol** (``default``, used without ``--protocol``) is documented here and only here:
the question file's question as written, through the processor's chat template; greedy decoding with
at most 128 new tokens on POPE and 512 on CHAIR, unless the first method of the stack has a paper
decoding (VCD and AvisC sample with temperature 1 and top-p 1, OPERA searches 5 beams); CHAIR asks
"Please describe this image in detail."; POPE answers are parsed with the official POPE / LLaVA rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from veridical.errors import VeridicalError
from veridical.evals.samples import CHAIR_PROMPT

BENCHMARKS = ("pope", "chair")
GENERATION_KEYS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "num_beams",
    "repetition_penalty",
)
#: Generation settings that only shape sampling.
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
PROMPT_KEYS = ("question_suffix", "instruction", "template")
#: Kept in ``results.json`` as a record of the script; not applied (see the module docstring).
RECORDED_KEYS = ("seed",)
#: The default CHAIR request (also OPERA's, ``chair_eval.py`` line 166).
DEFAULT_INSTRUCTION = CHAIR_PROMPT


class ProtocolError(VeridicalError):
    """An unknown protocol, or a protocol that does not define the requested benchmark."""


@dataclass(frozen=True)
class Setting:
    """One value of a protocol and where the official code sets it."""

    value: Any
    source: str


@dataclass(frozen=True)
class BenchmarkProtocol:
    settings: Mapping[str, Setting]
    #: ``model.config.model_type`` -> settings that replace or add to ``settings`` for that family.
    families: Mapping[str, Mapping[str, Setting]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    benchmarks: Mapping[str, BenchmarkProtocol]
    #: benchmark -> why the protocol does not define it.
    missing: Mapping[str, str] = field(default_factory=dict)
    #: Let each method's paper decoding (``generation_defaults``) fill the decoding (default only).
    method_generation: bool = False


@dataclass(frozen=True)
class _Repo:
    name: str
    commit: str

    def __call__(self, path: str, lines: str | int) -> str:
        return f"{self.name}@{self.commit} {path}:{lines}"


def _set(value: Any, source: str) -> Setting:
    return Setting(value, source)


# -- the official repositories (snapshot commits read) -------------------------------------------------

LLAVA = _Repo("haotian-liu/LLaVA", "c121f04")
VCD = _Repo("DAMO-NLP-SG/VCD", "d6568ff")
OPERA = _Repo("shikiw/OPERA", "61426ef")
VISTA = _Repo("LzVv123456/VISTA", "dc62252")
AVISC = _Repo("sangminwoo/AvisC", "772eba4")
PAI = _Repo("LALBJ/PAI", "9bbd8bd")
PAINT = _Repo("hasanar1f/PAINT", "2a9e8f8")
VAR = _Repo("seilk/VisAttnSink", "98e62d6")

#: transformers 4.x (which every script pins) samples with top-k 50 when ``top_k`` is not passed...
_TOPK_4X = OPERA("transformers-4.29.2/src/transformers/generation/configuration_utils.py", 242)
#: ... and with none when it is passed as None (``update`` sets it, the warper is skipped).
_NO_TOPK_4X = (
    "top_k=None: no top-k warper in transformers 4.x ("
    + OPERA("transformers-4.29.2/src/transformers/generation/configuration_utils.py", "709-711")
    + ", "
    + OPERA("transformers-4.29.2/src/transformers/generation/utils.py", 805)
    + ")"
)

# LLaVA-1.5's conversation formats, as the scripts' ``conv.get_prompt()`` renders them with one user
# message ``"<image>\n" + question`` (SeparatorStyle.TWO: system, " ", "USER: ", message, " ",
# "ASSISTANT:"; haotian-liu/LLaVA llava/conversation.py lines 54-63).
_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
#: ``vicuna_v1``: LLaVA's own POPE script and VAR.
_VICUNA_V1 = _SYSTEM_USER + " USER: {image}\n{question} ASSISTANT:"
#: ``llava_v1`` of the LLaVA copies inside VCD and AvisC (a "human" system message).
_LLAVA_V1 = _SYSTEM_HUMAN + " USER: {image}\n{question} ASSISTANT:"
#: OPERA's template, reused by VISTA, PAI and PAINT: the system message is concatenated without a
#: separator and the image is followed by a space, not a newline.
_OPERA_STYLE = _SYSTEM_USER + "USER: {image} {question} ASSISTANT:"
#: LAVIS InstructBLIP: the prompt is the text alone (the query tokens carry the image).
_TEXT_ONLY = "{image}{question}"


def _greedy(source_sample: str, source_beams: str, beams: int = 1) -> dict[str, Setting]:
    return {"do_sample": _set(False, source_sample), "num_beams": _set(beams, source_beams)}


# -- default ------------------------------------------------------------------------------------------

_VERIDICAL = "veridical default (veridical/evals/protocols.py)"

DEFAULT = Protocol(
    name="default",
    title="veridical's default (each method's paper decoding)",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "max_new_tokens": _set(128, _VERIDICAL),
                "do_sample": _set(False, _VERIDICAL),
                "rule": _set("llava", _VERIDICAL),
            }
        ),
        "chair": BenchmarkProtocol(
            {
                "instruction": _set(DEFAULT_INSTRUCTION, _VERIDICAL),
                "max_new_tokens": _set(512, _VERIDICAL),
                "do_sample": _set(False, _VERIDICAL),
            }
        ),
    },
    method_generation=True,
)

# -- LLaVA-1.5 ----------------------------------------------------------------------------------------

_LLAVA_LOADER = "llava/eval/model_vqa_loader.py"
LLAVA_PROTOCOL = Protocol(
    name="llava",
    title="LLaVA-1.5 (Liu et al., CVPR 2024), scripts/v1_5/eval/pope.sh",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                # The suffix lives in the question file llava_pope_test.jsonl (distributed outside the
                # repository); docs/Evaluation.md gives it as the short-answer format, and lmms-eval's
                # POPE task appends the same text.
                "question_suffix": _set(
                    "\nAnswer the question using a single word or phrase.",
                    LLAVA("docs/Evaluation.md", "13-18")
                    + "; "
                    + PAINT("lmms-eval/lmms_eval/tasks/pope/utils.py", 12),
                ),
                "max_new_tokens": _set(128, LLAVA(_LLAVA_LOADER, 141)),
                # --temperature 0 -> do_sample=False (greedy); top_p None, 1 beam.
                "do_sample": _set(
                    False, LLAVA("scripts/v1_5/eval/pope.sh", 8) + "; " + LLAVA(_LLAVA_LOADER, 109)
                ),
                "num_beams": _set(1, LLAVA(_LLAVA_LOADER, 140)),
                "rule": _set("llava", LLAVA("llava/eval/eval_pope.py", "11-20")),
            },
            families={
                "llava": {
                    "template": _set(
                        _VICUNA_V1,
                        LLAVA("scripts/v1_5/eval/pope.sh", 9)
                        + "; "
                        + LLAVA("llava/conversation.py", "242-251")
                        + "; "
                        + LLAVA(_LLAVA_LOADER, "46-51"),
                    )
                }
            },
            notes=("No seed is set (greedy decoding).",),
        )
    },
    missing={"chair": "haotian-liu/LLaVA ships no CHAIR evaluation"},
)

# -- VCD ----------------------------------------------------------------------------------------------

_VCD_LLAVA = "experiments/eval/object_hallucination_vqa_llava.py"
_VCD_BLIP = "experiments/eval/object_hallucination_vqa_instructblip.py"
_VCD_SH = "experiments/cd_scripts/llava1.5_pope.bash"
_VCD_LAVIS = "experiments/lavis/models/blip2_models/blip2_vicuna_instruct.py"
VCD_PROTOCOL = Protocol(
    name="vcd",
    title="VCD (Leng et al., CVPR 2024), experiments/cd_scripts/llava1.5_pope.bash",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "question_suffix": _set(" Please answer this question with one word.", VCD(_VCD_LLAVA, 50)),
                "max_new_tokens": _set(1024, VCD(_VCD_LLAVA, 79)),
                "do_sample": _set(True, VCD(_VCD_LLAVA, 75)),
                "temperature": _set(1.0, VCD(_VCD_LLAVA, 111)),
                "top_p": _set(1.0, VCD(_VCD_LLAVA, 112)),
                "top_k": _set(0, VCD(_VCD_LLAVA, 113) + "; " + _NO_TOPK_4X),
                "num_beams": _set(1, VCD(_VCD_LLAVA, "69-80") + " (not passed: 1)"),
                "rule": _set("vcd", VCD("experiments/eval/eval_pope.py", "39-50")),
                "vcd.alpha": _set(1.0, VCD(_VCD_SH, 5)),
                "vcd.beta": _set(0.2, VCD(_VCD_SH, 6)),
                "vcd.noise_step": _set(500, VCD(_VCD_SH, 7)),
                "seed": _set(55, VCD(_VCD_SH, 1) + "; set once: " + VCD(_VCD_LLAVA, 121)),
            },
            families={
                "llava": {
                    "template": _set(
                        _LLAVA_V1,
                        VCD(_VCD_LLAVA, "47-52")
                        + " (--conv-mode llava_v1, line 108); "
                        + VCD("experiments/llava/conversation.py", "335-345"),
                    )
                },
                # The InstructBLIP path goes through LAVIS's generate(); no script for it is shipped
                # at this commit (the one removed in 88a0a19 used other arguments), so the values are
                # the Python file's and LAVIS's defaults.
                "instructblip": {
                    "template": _set(_TEXT_ONLY, VCD(_VCD_BLIP, 49)),
                    "question_suffix": _set(
                        " Please answer this question with one word.", VCD(_VCD_BLIP, 49)
                    ),
                    "max_new_tokens": _set(256, VCD(_VCD_LAVIS, 246) + " (max_length over inputs_embeds)"),
                    "min_new_tokens": _set(1, VCD(_VCD_LAVIS, 247)),
                    "do_sample": _set(True, VCD(_VCD_BLIP, 62)),
                    "temperature": _set(1.0, VCD(_VCD_LAVIS, 252)),
                    "top_p": _set(1.0, VCD(_VCD_BLIP, 63) + " (--top_p 1, line 89)"),
                    "top_k": _set(50, VCD(_VCD_LAVIS, "385-401") + " passes no top_k; " + _TOPK_4X),
                    "num_beams": _set(1, VCD(_VCD_BLIP, 62)),
                    "repetition_penalty": _set(1.0, VCD(_VCD_BLIP, 63)),
                    "vcd.alpha": _set(
                        0.5,
                        VCD(_VCD_BLIP, "61-64")
                        + " passes no cd_alpha; "
                        + VCD("vcd_utils/vcd_sample.py", 142),
                    ),
                    "vcd.beta": _set(0.1, VCD(_VCD_BLIP, 95)),
                    "vcd.noise_step": _set(500, VCD(_VCD_BLIP, 92)),
                    "seed": _set(42, VCD(_VCD_BLIP, "96-98")),
                },
            },
        )
    },
    missing={"chair": "DAMO-NLP-SG/VCD ships no CHAIR evaluation"},
)

# -- OPERA --------------------------------------------------------------------------------------------

_OPERA_README_POPE = OPERA("README.md", 123)
_OPERA_README_CHAIR = OPERA("README.md", 152)
_OPERA_SYSTEM = (
    OPERA("pope_eval.py", 50)
    + "; system message "
    + OPERA("eval_configs/llava-1.5_eval.yaml", 13)
    + " prepended without a separator "
    + OPERA("minigpt4/models/llava.py", 172)
)


def _opera_method(source: str) -> dict[str, Setting]:
    return {
        "opera.scale": _set(50.0, source),
        "opera.threshold": _set(15, source),
        "opera.num_candidates": _set(5, source),
        "opera.penalty_weight": _set(1.0, source),
    }


_OPERA_BLIP = {
    "instructblip": {
        "template": _set(
            _TEXT_ONLY,
            OPERA("pope_eval.py", 47) + "; " + OPERA("minigpt4/models/blip2_vicuna_instruct.py", 281),
        ),
        "seed": _set(42, OPERA("eval_configs/instructblip_eval.yaml", 23)),
    }
}
OPERA_PROTOCOL = Protocol(
    name="opera",
    title="OPERA (Huang et al., CVPR 2024), README commands of pope_eval.py and chair_eval.py",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "question_suffix": _set(
                    "", OPERA("pope_loader.py", 21) + " (the question file's text alone)"
                ),
                "max_new_tokens": _set(10, OPERA("pope_eval.py", 204)),
                **_greedy(OPERA("pope_eval.py", 202) + " (--sample not passed)", _OPERA_README_POPE, beams=5),
                "rule": _set("opera", OPERA("pope_eval.py", "123-135")),
                **_opera_method(_OPERA_README_POPE),
                "seed": _set(
                    42, OPERA("eval_configs/llava-1.5_eval.yaml", 29) + "; " + OPERA("pope_eval.py", "81-86")
                ),
            },
            families={"llava": {"template": _set(_OPERA_STYLE, _OPERA_SYSTEM)}, **_OPERA_BLIP},
        ),
        "chair": BenchmarkProtocol(
            {
                "instruction": _set("Please describe this image in detail.", OPERA("chair_eval.py", 166)),
                "max_new_tokens": _set(512, OPERA("chair_eval.py", 176)),
                **_greedy(
                    OPERA("chair_eval.py", 174) + " (--sample not passed)", _OPERA_README_CHAIR, beams=5
                ),
                **_opera_method(_OPERA_README_CHAIR),
                "seed": _set(
                    42, OPERA("eval_configs/llava-1.5_eval.yaml", 29) + "; " + OPERA("chair_eval.py", "55-60")
                ),
            },
            families={
                "llava": {"template": _set(_OPERA_STYLE, OPERA("chair_eval.py", 51) + "; " + _OPERA_SYSTEM)},
                **_OPERA_BLIP,
            },
            notes=(
                "The 500 images are the first of os.listdir(val2014) shuffled with the seed "
                f"({OPERA('chair_eval.py', '123-124, 151')}); veridical draws 500 with --seed.",
            ),
        ),
    },
)

# -- VISTA --------------------------------------------------------------------------------------------

_VISTA_TEMPLATE = (
    VISTA("anchor.py", "15, 38")
    + "; "
    + VISTA("myutils.py", "30-34")
    + " (system message prepended without a separator)"
)
_VISTA_BLIP = {
    "instructblip": {
        "template": _set(_TEXT_ONLY, VISTA("anchor.py", 12) + "; " + VISTA("model_loader.py", "210-211")),
    }
}
VISTA_PROTOCOL = Protocol(
    name="vista",
    title="VISTA (Li et al., ICML 2025), run_pope.sh and run_chair.sh",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "question_suffix": _set(
                    "", VISTA("eval_data_loader.py", 43) + " (the question file's text alone)"
                ),
                "max_new_tokens": _set(32, VISTA("pope_eval.py", 40)),
                **_greedy(
                    VISTA("pope_eval.py", 41) + " (--do-sample not passed by run_pope.sh)",
                    VISTA("pope_eval.py", 42),
                ),
                "rule": _set("opera", VISTA("pope_ans.py", "11-24")),
                "vista.lam": _set(0.01, VISTA("run_pope.sh", 10)),
                "vista.logits_alpha": _set(0.3, VISTA("run_pope.sh", 12)),
                "seed": _set(1994, VISTA("pope_eval.py", 50) + "; " + VISTA("pope_eval.py", 67)),
            },
            families={"llava": {"template": _set(_OPERA_STYLE, _VISTA_TEMPLATE)}, **_VISTA_BLIP},
        ),
        "chair": BenchmarkProtocol(
            {
                "instruction": _set(
                    "Please help me describe the image in detail.", VISTA("chair_eval.py", 98)
                ),
                "max_new_tokens": _set(512, VISTA("chair_eval.py", 39)),
                **_greedy(
                    VISTA("chair_eval.py", 40) + " (--do-sample not passed by run_chair.sh)",
                    VISTA("chair_eval.py", 41),
                ),
                "vista.lam": _set(0.17, VISTA("run_chair.sh", 9)),
                "vista.logits_alpha": _set(0.3, VISTA("run_chair.sh", 11)),
                "seed": _set(1994, VISTA("chair_eval.py", 49) + "; " + VISTA("chair_eval.py", 64)),
            },
            families={"llava": {"template": _set(_OPERA_STYLE, _VISTA_TEMPLATE)}, **_VISTA_BLIP},
            notes=(
                "The 500 images are np.random.choice over the folder with the seed "
                f"({VISTA('chair_eval.py', '26, 83-85')}); veridical draws 500 with --seed.",
            ),
        ),
    },
)

# -- AvisC --------------------------------------------------------------------------------------------

_AVISC_SH = "eval_bench/scripts/pope_eval_batch.sh"
_AVISC_LLAVA = "eval_bench/pope_eval_llavab.py"
_AVISC_BLIP = "eval_bench/pope_eval_instructblipb.py"
_AVISC_LAVIS = "experiments/lavis/models/blip2_models/blip2_vicuna_instruct.py"
AVISC_PROTOCOL = Protocol(
    name="avisc",
    title="AvisC (Woo et al., 2024), eval_bench/scripts/pope_eval_batch.sh",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "question_suffix": _set(
                    "", AVISC(_AVISC_LLAVA, "207, 219") + " (the question file's text alone)"
                ),
                "max_new_tokens": _set(64, AVISC(_AVISC_SH, 15)),
                "do_sample": _set(True, AVISC(_AVISC_LLAVA, 268)),
                "temperature": _set(1.0, AVISC(_AVISC_LLAVA, 61)),
                "top_p": _set(1.0, AVISC(_AVISC_LLAVA, 62)),
                "top_k": _set(0, AVISC(_AVISC_LLAVA, 63) + "; " + _NO_TOPK_4X),
                "num_beams": _set(1, AVISC(_AVISC_LLAVA, "262-279") + " (not passed: 1)"),
                "rule": _set("opera", AVISC(_AVISC_LLAVA, "131-142")),
                "avisc.alpha": _set(1.0, AVISC(_AVISC_SH, 17)),
                "avisc.beta": _set(0.1, AVISC(_AVISC_SH, 18)),
                "avisc.gamma": _set(0.5, AVISC(_AVISC_SH, 11) + " (layer_gamma)"),
                "avisc.lam": _set(1.0, AVISC(_AVISC_SH, 13) + " (lamb)"),
                "seed": _set(
                    42, AVISC(_AVISC_SH, 6) + "; set once per rank: " + AVISC("utils/dist_util.py", "29-30")
                ),
            },
            families={
                "llava": {
                    "template": _set(
                        _LLAVA_V1,
                        AVISC(_AVISC_LLAVA, "219-227")
                        + " (--conv-mode default llava_v1, line 58); "
                        + AVISC("experiments/llava/conversation.py", "325-333"),
                    )
                },
                "instructblip": {
                    "template": _set(_TEXT_ONLY, AVISC(_AVISC_BLIP, "201, 215")),
                    "max_new_tokens": _set(64, AVISC(_AVISC_BLIP, 226) + " (max_length over inputs_embeds)"),
                    "min_new_tokens": _set(1, AVISC(_AVISC_LAVIS, 252)),
                    "temperature": _set(1.0, AVISC(_AVISC_LAVIS, 257)),
                    "top_p": _set(1.0, AVISC(_AVISC_BLIP, 218) + " (--top_p 1, line 63)"),
                    "top_k": _set(50, AVISC(_AVISC_LAVIS, "395-417") + " passes no top_k; " + _TOPK_4X),
                    "repetition_penalty": _set(1.0, AVISC(_AVISC_BLIP, 219)),
                },
            },
            notes=(
                "pope_eval_batch.sh as shipped cannot run: it passes variables it never sets (conv, "
                "batch_size, masking_method, use_cd, exp_description) and sets use_avisc=False "
                f"({AVISC(_AVISC_SH, '10, 35-42')}); its AvisC values are used.",
            ),
        )
    },
    missing={"chair": "sangminwoo/AvisC ships no CHAIR evaluation (POPE, MME and AMBER only)"},
)

# -- PAI and PAINT ------------------------------------------------------------------------------------

_PAI_TEMPLATE = PAI("constants.py", "14, 27") + "; " + PAI("pope_eval.py", "94-96") + " (no separator)"
_PAI_BLIP = {"instructblip": {"template": _set(_TEXT_ONLY, PAI("constants.py", 11))}}
PAI_PROTOCOL = Protocol(
    name="pai",
    title="PAI (Liu et al., ECCV 2024), README commands of pope_eval.py and chair_eval.py",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "question_suffix": _set(
                    "", PAI("eval_data_loader.py", 81) + " (the question file's text alone)"
                ),
                "max_new_tokens": _set(512, PAI("pope_eval.py", 56)),
                **_greedy(
                    PAI("pope_eval.py", 48) + " (--sample not passed, README.md line 65)",
                    PAI("pope_eval.py", 47),
                ),
                "rule": _set("opera", PAI("pope_ans.py", "11-24")),
                "pai.alpha": _set(0.2, PAI("README.md", 65)),
                "pai.gamma": _set(1.1, PAI("README.md", 65) + " (--use-cfg --gamma 1.1)"),
                "seed": _set(927, PAI("pope_eval.py", "18-23")),
            },
            families={
                "llava": {"template": _set(_OPERA_STYLE, _PAI_TEMPLATE)},
                **_PAI_BLIP,
            },
            notes=(
                "PAI's question files are its own pope_coco/chat sets (six questions per image, each "
                f"asked alone by pope_eval.py, {PAI('pope_eval.py', '65-70, 106-112')}).",
            ),
        ),
        "chair": BenchmarkProtocol(
            {
                "instruction": _set("Please help me describe the image in detail.", PAI("chair_eval.py", 94)),
                "max_new_tokens": _set(512, PAI("chair_eval.py", 56)),
                **_greedy(
                    PAI("chair_eval.py", 48) + " (--sample not passed, README.md line 82)",
                    PAI("chair_eval.py", 47),
                ),
                "pai.alpha": _set(0.2, PAI("README.md", 82)),
                "pai.gamma": _set(1.1, PAI("README.md", 82) + " (--use-cfg --gamma 1.1)"),
                "seed": _set(927, PAI("chair_eval.py", "18-23")),
            },
            families={
                "llava": {
                    "template": _set(
                        _OPERA_STYLE, PAI("constants.py", "14, 27") + "; " + PAI("chair_eval.py", "83-85")
                    )
                },
                **_PAI_BLIP,
            },
            notes=(
                "The 500 images are the first of os.listdir(val2014) shuffled with the seed "
                f"({PAI('eval_data_loader.py', '14-15')}, {PAI('chair_eval.py', '88-89')}); veridical "
                "draws 500 with --seed.",
            ),
        ),
    },
)

_PAINT_CHAIR = "modPAI/chair_eval.py"
PAINT_PROTOCOL = Protocol(
    name="paint",
    title="PAINT (Arif et al., 2025), modPAI/chair_eval.py",
    benchmarks={
        "chair": BenchmarkProtocol(
            {
                "instruction": _set("Please help me describe the image in detail.", PAINT(_PAINT_CHAIR, 100)),
                "max_new_tokens": _set(512, PAINT(_PAINT_CHAIR, 59)),
                **_greedy(PAINT(_PAINT_CHAIR, 48) + " (--sample not passed)", PAINT(_PAINT_CHAIR, 47)),
                "paint.local_alpha": _set(0.7, PAINT(_PAINT_CHAIR, 51) + " (--alpha)"),
                "paint.summary_alpha": _set(0.3, PAINT(_PAINT_CHAIR, 52) + " (--beta)"),
                "paint.local_ratio": _set(0.25, PAINT(_PAINT_CHAIR, 50) + " (--top_token_ratio)"),
                "paint.gamma": _set(1.1, PAINT("modPAI/README.md", 82) + " (--use-cfg --gamma 1.1)"),
                "seed": _set(927, PAINT(_PAINT_CHAIR, "18-23")),
            },
            families={
                "llava": {
                    "template": _set(
                        _OPERA_STYLE,
                        PAINT("modPAI/constants.py", "14, 27") + "; " + PAINT(_PAINT_CHAIR, "89-91"),
                    )
                }
            },
            notes=(
                "The only command shipped is PAI's README copied into modPAI/README.md; it also passes "
                "--alpha 0.2, which in PAINT's chair_eval.py would set the local-token boost: the "
                "script's own defaults (0.7 / 0.3 / 0.25) are used instead.",
            ),
        )
    },
    missing={
        "pope": "PAINT's modPAI/pope_eval.py is PAI's unchanged and calls llama_modify with 8 arguments "
        "against PAINT's 9-parameter signature (modPAI/pope_eval.py:113-122, modPAI/attention.py:184), "
        "so no runnable PAINT POPE script exists"
    },
)

# -- VAR ----------------------------------------------------------------------------------------------

_VAR_YML = "A_exps/lv1.5_7b.yml"
VAR_PROTOCOL = Protocol(
    name="var",
    title="VAR (Kang et al., ICLR 2025), B_scripts/launch.sh with A_exps/lv1.5_7b.yml",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "question_suffix": _set(
                    "", VAR("src/inference.py", 99) + " (the question file's text alone)"
                ),
                "max_new_tokens": _set(128, VAR(_VAR_YML, 17)),
                **_greedy(
                    VAR("src/inference.py", 132), VAR("src/inference.py", "125-135") + " (not passed: 1)"
                ),
                "rule": _set("llava", VAR("src/eval/quick_eval_pope.py", "23-35")),
                "var.tau": _set(20.0, VAR(_VAR_YML, 12)),
                "var.rho": _set(0.5, VAR(_VAR_YML, 13)),
                "var.p": _set(0.6, VAR(_VAR_YML, 14)),
                "var.summ": _set(0.2, VAR(_VAR_YML, 15)),
            },
            families={
                "llava": {
                    "template": _set(
                        _VICUNA_V1,
                        VAR(_VAR_YML, 9)
                        + "; "
                        + VAR("src/conversation.py", "247-256")
                        + "; "
                        + VAR("src/inference.py", "102-110"),
                    )
                }
            },
            notes=(
                "The question file is the user's (C_datasets/<name>/Questions); no suffix is added and "
                "no seed is set (greedy decoding).",
            ),
        )
    },
    missing={"chair": "seilk/VisAttnSink ships no CHAIR evaluation"},
)

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        DEFAULT,
        LLAVA_PROTOCOL,
        VCD_PROTOCOL,
        OPERA_PROTOCOL,
        VISTA_PROTOCOL,
        AVISC_PROTOCOL,
        PAI_PROTOCOL,
        PAINT_PROTOCOL,
        VAR_PROTOCOL,
    )
}
#: Methods whose official code has no POPE or CHAIR script, and why (listed by ``veridical protocols``).
WITHOUT_PROTOCOL = {
    "act": "GATECH-EIC/ACT evaluates text-only LLM tasks (scripts/evaluation.sh, utils/data_utils.py)",
    "m3id": "no official code",
    "vhr": "no official evaluation scripts",
}


# -- resolution ---------------------------------------------------------------------------------------


def protocol_names() -> list[str]:
    return sorted(PROTOCOLS)


def get_protocol(name: str | None) -> Protocol:
    """The protocol called ``name`` (``None``: the default); an unknown name is one clear error."""
    if name is None:
        return DEFAULT
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ProtocolError(
            f"unknown protocol {name!r}; known protocols: {', '.join(protocol_names())}"
        ) from None


def check_protocol(name: str | None, benchmark: str) -> Protocol:
    """``get_protocol`` that also requires the protocol to define ``benchmark``."""
    protocol = get_protocol(name)
    if benchmark not in protocol.benchmarks:
        having = [n for n in protocol_names() if benchmark in PROTOCOLS[n].benchmarks]
        why = protocol.missing.get(benchmark, "not defined")
        raise ProtocolError(
            f"protocol {protocol.name!r} defines no {benchmark} setting ({why}); "
            f"protocols with {benchmark}: {', '.join(having)}"
        )
    return protocol


def protocol_settings(name: str | None, benchmark: str, family: str | None = None) -> dict[str, Setting]:
    """The settings of a protocol for a benchmark and a model family (``model.config.model_type``)."""
    bench = check_protocol(name, benchmark).benchmarks[benchmark]
    return {**bench.settings, **bench.families.get(family or "", {})}


@dataclass
class ResolvedRun:
    """What a protocol and the user's explicit choices resolve into for one eval run."""

    generation: dict[str, Any]
    methods: list[Any]
    #: ``{"suffix": ..., "template": ...}`` (either may be absent) for :func:`render_prompt`.
    prompt: dict[str, str]
    instruction: str | None
    rule: str | None
    #: What ``results.json`` records under ``protocol``.
    record: dict[str, Any]


def resolve_run(
    name: str | None,
    benchmark: str,
    family: str | None,
    methods: Sequence[Any],
    generation: Mapping[str, Any] | None = None,
    rule: str | None = None,
    instruction: str | None = None,
    question_suffix: str | None = None,
    template: str | None = None,
) -> ResolvedRun:
    """Resolve protocol ``name`` for ``benchmark`` on a model of ``family`` with ``methods``.

    The keyword arguments are the user's explicit choices (``None``: not given); they win over the
    protocol, and every protocol value they replace is recorded under ``overridden``.
    """
    from veridical.evals.runner import method_name
    from veridical.registry import method_class

    protocol = get_protocol(name)
    settings = protocol_settings(name, benchmark, family)
    values = {k: s.value for k, s in settings.items()}
    overridden: dict[str, dict[str, Any]] = {}

    def choose(key: str, user: Any) -> Any:
        if user is not None and key in values:
            overridden[key] = {"protocol": values[key], "user": user}
        return user if user is not None else values.get(key)

    base = {k: v for k, v in values.items() if k in GENERATION_KEYS}
    if protocol.method_generation:
        for spec in reversed(list(methods)):
            base.update(getattr(method_class(method_name(spec)), "generation_defaults", {}))
    user_generation = dict(generation or {})
    for key, value in user_generation.items():
        if key in base:
            overridden[key] = {"protocol": base[key], "user": value}
    resolved_methods = []
    for spec in methods:
        name_ = method_name(spec)
        defaults = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f"{name_}.")}
        if not defaults or not isinstance(spec, (str, Mapping)):
            resolved_methods.append(spec)
            continue
        given = {k: v for k, v in spec.items() if k != "name"} if isinstance(spec, Mapping) else {}
        for key in set(given) & set(defaults):
            overridden[f"{name_}.{key}"] = {"protocol": defaults[key], "user": given[key]}
        resolved_methods.append({"name": name_, **defaults, **given})
    prompt = {}
    suffix = choose("question_suffix", question_suffix)
    if suffix:
        prompt["suffix"] = suffix
    chosen_template = choose("template", template)
    if chosen_template:
        if "{question}" not in chosen_template:
            raise ProtocolError(f"prompt template {chosen_template!r} has no {{question}} field")
        prompt["template"] = chosen_template
    record = {
        "name": protocol.name,
        "family": family,
        "settings": values,
        "citations": {k: s.source for k, s in settings.items()},
        "recorded_only": [k for k in values if k in RECORDED_KEYS],
        "overridden": overridden,
    }
    generation = {**base, **user_generation}
    if not generation.get("do_sample"):
        # A sampling default's warper settings mean nothing to greedy or beam search (transformers
        # warns that they are invalid there): keep only those the user asked for.
        generation = {k: v for k, v in generation.items() if k not in SAMPLING_KEYS or k in user_generation}
    return ResolvedRun(
        generation=generation,
        methods=resolved_methods,
        prompt=prompt,
        instruction=choose("instruction", instruction) if benchmark == "chair" else None,
        rule=choose("rule", rule) if benchmark == "pope" else None,
        record=record,
    )


_FIELD = re.compile(r"\{(image|question)\}")


def render_prompt(model, processor, question: str, prompt: Mapping[str, str] | None = None) -> str:
    """The text the processor receives: ``question`` plus the protocol's suffix, in the protocol's
    template for this family if it has one, else through the processor's chat template."""
    from veridical.adapters import get_adapter
    from veridical.evals.models import build_prompt

    prompt = prompt or {}
    text = question + prompt.get("suffix", "")
    template = prompt.get("template")
    if not template:
        return build_prompt(model, processor, text)
    fields = {"image": get_adapter(model).image_placeholder, "question": text}
    if fields["image"] and "{image}" not in template:
        raise ProtocolError(f"prompt template {template!r} has no {{image}} field for the image")
    return _FIELD.sub(lambda m: fields[m.group(1)], template)


# -- listing ------------------------------------------------------------------------------------------

_TEMPLATE_NAMES = {
    _VICUNA_V1: "LLaVA `vicuna_v1`: `<system user's questions.> USER: <image>\\n{q} ASSISTANT:`",
    _LLAVA_V1: "`llava_v1`: `<system human's questions.> USER: <image>\\n{q} ASSISTANT:`",
    _OPERA_STYLE: "OPERA's: `<system user's questions.>USER: <image> {q} ASSISTANT:`",
    _TEXT_ONLY: "the question alone (LAVIS)",
}
_CITED = re.compile(r"([\w.-]+/[\w.-]+)@(\w+) ([^\s:;]+):")


def _decoding(values: Mapping[str, Any]) -> str:
    if values.get("do_sample"):
        top_k = values.get("top_k")
        text = f"sampling, T={values.get('temperature', 1.0):g}, top-p={values.get('top_p', 1.0):g}, " + (
            "no top-k" if top_k in (0, None) else f"top-k={top_k}"
        )
    elif values.get("num_beams", 1) > 1:
        text = f"beam search, {values['num_beams']} beams"
    else:
        text = "greedy"
    extra = [f"{k}={values[k]:g}" for k in ("min_new_tokens", "repetition_penalty") if k in values]
    return ", ".join([text, *extra])


def _prompt(values: Mapping[str, Any], benchmark: str) -> str:
    if benchmark == "pope":
        suffix = values.get("question_suffix")
        ask = f"question + `{suffix!r}`" if suffix else "question as written"
    else:
        ask = f"`{values.get('instruction', DEFAULT_INSTRUCTION)}`"
    return f"{ask}; " + _TEMPLATE_NAMES.get(values.get("template"), "processor's chat template")


def _method_values(values: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items() if "." in k
    )


def _difference(base: Mapping[str, Any], values: Mapping[str, Any], benchmark: str) -> str:
    """What a family changes, in words."""
    parts = []
    if values.get("template") != base.get("template") or values.get("question_suffix") != base.get(
        "question_suffix"
    ):
        parts.append("prompt " + _prompt(values, benchmark))
    if values.get("max_new_tokens") != base.get("max_new_tokens"):
        parts.append(f"{values['max_new_tokens']} tokens")
    if _decoding(values) != _decoding(base):
        parts.append(_decoding(values))
    changed = {k: v for k, v in values.items() if "." in k and base.get(k) != v}
    if changed:
        parts.append(_method_values(changed))
    return "; ".join(parts)


def _sources(settings: Mapping[str, Setting]) -> str:
    files: dict[str, list[str]] = {}
    for setting in settings.values():
        for repo, commit, path in _CITED.findall(setting.source):
            found = files.setdefault(f"{repo}@{commit}", [])
            if path not in found:
                found.append(path)
    return "; ".join(f"{repo} " + ", ".join(paths) for repo, paths in files.items())


def _ordered() -> list[str]:
    return [DEFAULT.name, *(n for n in protocol_names() if n != DEFAULT.name)]


def protocol_rows() -> list[dict[str, str]]:
    """One row per protocol x benchmark: LLaVA-1.5's settings, and what other families change."""
    rows = []
    for name in _ordered():
        protocol = PROTOCOLS[name]
        for benchmark in BENCHMARKS:
            row = {"protocol": name, "benchmark": benchmark}
            if benchmark not in protocol.benchmarks:
                row["prompt"] = f"not defined: {protocol.missing.get(benchmark, '')}"
                rows.append(row)
                continue
            bench = protocol.benchmarks[benchmark]
            generic = {k: s.value for k, s in bench.settings.items()}
            llava = protocol_settings(name, benchmark, "llava")
            values = {k: s.value for k, s in llava.items()}
            decoding = _decoding(values)
            if protocol.method_generation:
                decoding += (
                    "; the first method's paper decoding if it has one (VCD, AvisC: sampling; OPERA: 5 beams)"
                )
            others = []
            for family in bench.families:
                if family != "llava":
                    family_values = {
                        k: s.value for k, s in protocol_settings(name, benchmark, family).items()
                    }
                    others.append(f"{family}: {_difference(values, family_values, benchmark)}")
            if bench.families:
                others.append(f"others: {_difference(values, generic, benchmark)}")
            row.update(
                prompt=_prompt(values, benchmark),
                tokens=str(values.get("max_new_tokens", "")),
                decoding=decoding,
                rule=str(values.get("rule", "")),
                methods=_method_values(values),
                seed=str(values.get("seed", "")),
                families="; ".join(others),
                source=_sources(llava),
            )
            rows.append(row)
    return rows


def protocols_table(markdown: bool = False) -> str:
    """The protocol table (``veridical protocols``); ``markdown`` for the README."""
    rows = protocol_rows()
    if markdown:
        columns = (
            "protocol",
            "benchmark",
            "prompt",
            "tokens",
            "decoding",
            "rule",
            "methods",
            "seed",
            "families",
            "source",
        )
        heads = (
            "protocol",
            "benchmark",
            "prompt (LLaVA-1.5)",
            "max new tokens",
            "decoding",
            "POPE parser",
            "method values",
            "seed (recorded)",
            "other families",
            "source (per-value lines: `veridical protocols NAME`)",
        )
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(r.get(c, "").replace("|", "\\|") for c in columns) + " |" for r in rows]
        return "\n".join(lines)
    lines = []
    for r in rows:
        head = f"{r['protocol']:8s} {r['benchmark']:6s}"
        if "tokens" not in r:
            lines.append(f"{head}{r['prompt']}")
            continue
        rule = f", rule {r['rule']}" if r["rule"] else ""
        lines.append(f"{head}{r['tokens']} tokens, {r['decoding']}{rule}")
        lines.append(f"{'':15s}prompt: {r['prompt']}")
        for key, label in (("methods", "methods"), ("families", "other families")):
            if r[key]:
                lines.append(f"{'':15s}{label}: {r[key]}")
    for method, why in WITHOUT_PROTOCOL.items():
        lines.append(f"(no protocol for {method}: {why})")
    return "\n".join(lines)


def protocol_details(name: str) -> str:
    """Every setting of one protocol with its citation (``veridical protocols NAME``)."""
    protocol = get_protocol(name)
    lines = [f"{protocol.name}: {protocol.title}"]
    for benchmark in BENCHMARKS:
        if benchmark not in protocol.benchmarks:
            lines.append(f"\n{benchmark}: not defined ({protocol.missing.get(benchmark, '')})")
            continue
        bench = protocol.benchmarks[benchmark]
        for family, settings in (("every family", bench.settings), *bench.families.items()):
            lines.append(f"\n{benchmark}, {family}:")
            for key, setting in settings.items():
                note = " (recorded, not applied)" if key in RECORDED_KEYS else ""
                lines.append(f"  {key} = {setting.value!r}{note}\n      {setting.source}")
        for note in bench.notes:
            lines.append(f"  note: {note}")
    return "\n".join(lines)

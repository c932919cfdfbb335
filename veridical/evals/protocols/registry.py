"""The protocols: what each paper's official POPE / CHAIR script sets, value by value with its source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from veridical.evals.protocols.spec import DEFAULT_INSTRUCTION, BenchmarkProtocol, Protocol, Setting


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
CLEARSIGHT = _Repo("ustc-hyin/ClearSight", "5466c94")
DECO = _Repo("zjunlp/Deco", "fee8d75")
MEMVR = _Repo("1zhou-Wang/MemVR", "de2e3cf")

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

_VERIDICAL = "veridical default (veridical/evals/protocols/__init__.py)"

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


_OPERA_LAVIS = "minigpt4/models/blip2_vicuna_instruct.py"
_OPERA_BLIP_PENALTY = (
    "InstructBLIP: LAVIS hands the language model embeddings only, so its repetition penalty 1.5 sees the "
    "generated tokens alone; transformers' InstructBLIP also passes the prompt's ids, so here the penalty "
    "covers the prompt's tokens too."
)
_OPERA_BLIP = {
    "instructblip": {
        "template": _set(
            _TEXT_ONLY,
            OPERA("pope_eval.py", 47) + "; " + OPERA(_OPERA_LAVIS, 281),
        ),
        # LAVIS's generate() passes its own defaults on to transformers' beam search.
        "min_new_tokens": _set(
            1, OPERA(_OPERA_LAVIS, "249, 387") + " (min_length over inputs_embeds: new tokens)"
        ),
        "repetition_penalty": _set(1.5, OPERA(_OPERA_LAVIS, "252, 390")),
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
            notes=(_OPERA_BLIP_PENALTY,),
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
                _OPERA_BLIP_PENALTY,
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
                _OPERA_BLIP_PENALTY,
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

# -- VAF (ClearSight) ---------------------------------------------------------------------------------

_VAF_INFER = "visaug/inference/infer_pope.py"
_VAF_SH = "visaug/inference/infer_pope.sh"
VAF_PROTOCOL = Protocol(
    name="vaf",
    title="VAF (Yin et al., CVPR 2025), visaug/inference/infer_pope.sh",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "question_suffix": _set(" Please just answer yes or no.", CLEARSIGHT(_VAF_INFER, 70)),
                "max_new_tokens": _set(1024, CLEARSIGHT(_VAF_INFER, 95)),
                # generate() gets no sampling or beam argument: transformers 4.31's defaults (greedy,
                # one beam) unless the checkpoint's generation_config.json says otherwise.
                **_greedy(
                    CLEARSIGHT(_VAF_INFER, "91-96") + " (no do_sample: transformers' default)",
                    CLEARSIGHT(_VAF_INFER, "91-96") + " (no num_beams)",
                ),
                # 'yes' in the answer for a yes question; 'no' or 'not' (so 'no') for a no question:
                # VCD's label-dependent rule.
                "rule": _set("vcd", CLEARSIGHT("visaug/inference/eval_pope.py", "24-33")),
                "vaf.enhance": _set(1.15, CLEARSIGHT(_VAF_SH, 7) + " (--enh-para)"),
                "vaf.suppress": _set(0.95, CLEARSIGHT(_VAF_SH, 8) + " (--sup-para)"),
            },
            families={
                "llava": {
                    "template": _set(
                        _VICUNA_V1,
                        CLEARSIGHT(_VAF_INFER, "37, 75-80")
                        + "; "
                        + LLAVA("llava/conversation.py", "242-251"),
                    )
                }
            },
            notes=("One question per forward (batch 1) and no seed (greedy decoding).",),
        )
    },
    missing={"chair": "ustc-hyin/ClearSight ships no CHAIR evaluation (POPE only)"},
)

# -- DeCo -----------------------------------------------------------------------------------------------

_DECO_LLAVA_V1 = DECO("llava/conversation.py", "335-345, 372") + " (llava_v1: a 'human' system message)"
DECO_PROTOCOL = Protocol(
    name="deco",
    title="DeCo (Wang et al., ICLR 2025), pope_llava.py and chair_llava.py",
    benchmarks={
        "pope": BenchmarkProtocol(
            {
                "question_suffix": _set("", DECO("pope_llava.py", 73) + " (the question file's text alone)"),
                "max_new_tokens": _set(5, DECO("pope_llava.py", 118)),
                **_greedy(
                    DECO("pope_llava.py", "114, 158") + " (--temperature -1: do_sample=False)",
                    DECO("pope_llava.py", "109-126") + " (no num_beams)",
                ),
                # 'yes' in a yes question's answer, 'no' in a no question's: VCD's label-dependent rule.
                "rule": _set("vcd", DECO("eval_tool/eval_pope.py", "39-50")),
                "deco.alpha": _set(0.6, DECO("pope_llava.py", 161) + " (line 120 reads args.aplha, a typo)"),
                "deco.top_p": _set(0.9, DECO("pope_llava.py", 162)),
                "deco.top_k": _set(20, DECO("pope_llava.py", 163)),
                "seed": _set(42, DECO("pope_llava.py", "168-170")),
            },
            families={
                "llava": {"template": _set(_LLAVA_V1, DECO("pope_llava.py", "81-93") + "; " + _DECO_LLAVA_V1)}
            },
        ),
        "chair": BenchmarkProtocol(
            {
                "instruction": _set("Please describe this image in detail.", DECO("chair_llava.py", 99)),
                "max_new_tokens": _set(512, DECO("chair_llava.py", 168)),
                **_greedy(
                    DECO("chair_llava.py", "124, 164") + " (--temperature -1: do_sample=False)",
                    DECO("chair_llava.py", "127, 167"),
                ),
                "deco.alpha": _set(0.6, DECO("chair_llava.py", 171)),
                "deco.top_p": _set(0.9, DECO("chair_llava.py", 172)),
                "deco.top_k": _set(20, DECO("chair_llava.py", 173)),
                "seed": _set(42, DECO("chair_llava.py", "176-179")),
            },
            families={
                "llava": {
                    "template": _set(
                        _LLAVA_V1, DECO("chair_llava.py", "101-110, 161") + "; " + _DECO_LLAVA_V1
                    )
                }
            },
            notes=(
                "The 500 images are the lines of a file the script reads (chair_llava.py:95); veridical "
                "draws 500 with --seed.",
            ),
        ),
    },
)

# -- MemVR ----------------------------------------------------------------------------------------------

_MEMVR_CHAIR = "eval/llava_model_vqa_loader_chair.py"
MEMVR_PROTOCOL = Protocol(
    name="memvr",
    title="MemVR (Zou et al., ICML 2025), eval_scripts/llava/chair.sh",
    benchmarks={
        "chair": BenchmarkProtocol(
            {
                "instruction": _set("Please describe this image in detail.", MEMVR(_MEMVR_CHAIR, 176)),
                "max_new_tokens": _set(1024, MEMVR("eval_scripts/llava/chair.sh", 15)),
                **_greedy(
                    MEMVR("eval_scripts/llava/chair.sh", 10) + "; " + MEMVR(_MEMVR_CHAIR, 192),
                    MEMVR(_MEMVR_CHAIR, 78),
                ),
                # The script hard-codes the ratio: chair.sh's --retracing-ratio 0.31 (line 13) is ignored.
                "memvr.retracing_ratio": _set(0.12, MEMVR(_MEMVR_CHAIR, "114-120")),
                "memvr.entropy_threshold": _set(0.75, MEMVR(_MEMVR_CHAIR, "114-120")),
            },
            families={"llava": {"template": _set(_VICUNA_V1, MEMVR(_MEMVR_CHAIR, "73, 177-181"))}},
            notes=(
                "The 500 images are the first lines of playground/data/eval/chair/shuffled_img_files.txt "
                f"({MEMVR(_MEMVR_CHAIR, '125-127')}), a file the repository does not ship; veridical "
                "draws 500 with --seed. No seed is set (greedy decoding).",
            ),
        )
    },
    missing={
        "pope": "1zhou-Wang/MemVR ships no POPE script at de2e3cf (the nearest is MME: "
        "eval_scripts/llava/mme.sh)"
    },
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
        VAF_PROTOCOL,
        DECO_PROTOCOL,
        MEMVR_PROTOCOL,
    )
}
#: Methods whose official code has no POPE or CHAIR script, and why (listed by ``veridical protocols``).
WITHOUT_PROTOCOL = {
    "act": "GATECH-EIC/ACT evaluates text-only LLM tasks (scripts/evaluation.sh, utils/data_utils.py)",
    "m3id": "no official code",
    "vhr": "no official evaluation scripts",
}

#: How the listing names each template.
TEMPLATE_NAMES = {
    _VICUNA_V1: "LLaVA `vicuna_v1`: `<system user's questions.> USER: <image>\\n{q} ASSISTANT:`",
    _LLAVA_V1: "`llava_v1`: `<system human's questions.> USER: <image>\\n{q} ASSISTANT:`",
    _OPERA_STYLE: "OPERA's: `<system user's questions.>USER: <image> {q} ASSISTANT:`",
    _TEXT_ONLY: "the question alone (LAVIS)",
}

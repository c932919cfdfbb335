"""The evals' command-line commands: ``score``, ``pope-build`` and ``eval``."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from veridical.evals.pope import PARSERS
from veridical.evals.request import EvalRequest


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser("score", help="score existing outputs").add_subparsers(
        dest="benchmark", required=True
    )
    chair = score.add_parser("chair", help="CHAIR of captions ({image_id, caption} JSON lines)")
    chair.add_argument("captions")
    _add_chair_truth(chair, required=True)
    chair.add_argument("--image-id-key", default="image_id")
    chair.add_argument("--caption-key", default="caption")
    chair.add_argument(
        "--bootstrap", type=nonnegative_int, default=1000, help="resamples for 95%% intervals (0: none)"
    )
    chair.add_argument("--seed", type=nonnegative_int, default=0)
    chair.add_argument("--details", help="write per-caption results to this JSON file")
    chair.add_argument("--json", action="store_true", help="print one JSON object")
    chair.set_defaults(run=score_chair)
    pope = score.add_parser("pope", help="POPE of answers ({question_id, text} JSON lines)")
    pope.add_argument("answers")
    pope.add_argument("--questions", required=True, help="POPE question file (JSON lines or array)")
    pope.add_argument("--rule", default="llava", choices=sorted(PARSERS), help="answer parsing rule")
    pope.add_argument("--json", action="store_true", help="print one JSON object")
    pope.set_defaults(run=score_pope)

    build = sub.add_parser("pope-build", help="build POPE question sets from COCO-format annotations")
    build.add_argument("instances", help="COCO instances_*.json")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--prefix", default="coco")
    build.add_argument("--strategy", action="append", choices=("random", "popular", "adversarial"))
    build.add_argument("--num-images", type=positive_int, default=500)
    build.add_argument("--seed", type=nonnegative_int, default=0)
    build.set_defaults(run=pope_build)

    ev = sub.add_parser("eval", help="run a model with methods over POPE or CHAIR and score it")
    ev.add_argument("benchmark", choices=("pope", "chair"))
    ev.add_argument("--model", required=True, help="hub id or local folder, e.g. llava-hf/llava-1.5-7b-hf")
    ev.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="method to apply, repeatable; a stack joins methods with '+': "
        "vcd | vcd:alpha=2,contrast=blank | var+vcd | vanilla | JSON object",
    )
    data = ev.add_argument_group("data")
    data.add_argument("--images", help="image folder (COCO val2014 for the COCO sets)")
    data.add_argument("--questions", help="POPE question file")
    data.add_argument(
        "--pope-set", help="a shipped POPE set, e.g. coco/random or coco_v2023_05_31/adversarial"
    )
    data.add_argument("--hf-dataset", help="Hugging Face POPE dataset with images, e.g. lmms-lab/POPE")
    data.add_argument("--hf-split", default="test")
    data.add_argument("--hf-category", help="random | popular | adversarial")
    _add_chair_truth(ev, required=False)
    data.add_argument(
        "--num-images", type=positive_int, default=500, help="CHAIR: images sampled with --seed"
    )
    data.add_argument("--limit", type=positive_int, help="only the first N samples (N >= 1)")
    ev.add_argument(
        "--protocol",
        metavar="NAME",
        help="an official evaluation script's prompt, decoding and answer parsing: "
        "llava | vcd | opera | vista | avisc | pai | paint | var (list: veridical protocols; "
        "default: 'default', documented in veridical.evals.protocols)",
    )
    prompt = ev.add_argument_group("prompt (defaults: the protocol's)")
    prompt.add_argument(
        "--prompt", help="CHAIR request (default protocol: 'Please describe this image in detail.')"
    )
    prompt.add_argument("--question-suffix", help="text appended to every question (CHAIR: to the request)")
    prompt.add_argument(
        "--prompt-template",
        help="the whole prompt, with {image} and {question}; '' uses the processor's chat template",
    )
    gen = ev.add_argument_group(
        "generation (defaults: the protocol's; default protocol: each method's paper setting)"
    )
    gen.add_argument("--max-new-tokens", type=positive_int)
    gen.add_argument("--num-beams", type=positive_int)
    gen.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    gen.add_argument("--temperature", type=finite_float)
    gen.add_argument("--top-p", type=finite_float)
    gen.add_argument("--gen", action="append", default=[], metavar="KEY=VALUE", help="any generate() setting")
    ev.add_argument(
        "--rule", choices=sorted(PARSERS), help="POPE answer parsing rule (default: the protocol's; llava)"
    )
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument("--seed", type=nonnegative_int, default=0)
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    ev.add_argument(
        "--output", help="output folder (default: runs/<benchmark>-<model>-<methods>[-<protocol>])"
    )
    ev.add_argument("--overwrite", action="store_true", help="delete the folder's earlier run and start over")
    ev.add_argument(
        "--dry-run",
        action="store_true",
        help="check every setting, load the model and build the methods on the first batch; write nothing",
    )
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(run=run_eval_command)

    cal = sub.add_parser(
        "calibrate",
        help="calibrate a method that needs it (act: its heads) on labelled POPE questions; write its file",
    )
    cal.add_argument("method", help="a method with a calibration: act")
    _add_calibration_data(cal)
    cal.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a calibration setting, repeatable (act: layers=[2,3], scale=0.4, threshold=0.1)",
    )
    cal.set_defaults(run=calibrate_command)

    act = sub.add_parser("calibrate-act", help="veridical calibrate act, with its settings as flags")
    _add_calibration_data(act)
    act.add_argument("--layers", help="comma-separated layers to search (default: ACT's scaled 2..30)")
    act.add_argument("--scale", type=finite_float, default=0.4)
    act.add_argument("--threshold", type=finite_float, default=0.1)
    act.set_defaults(run=calibrate_act_command)

    world = sub.add_parser("world", help="the synthetic world: train its model").add_subparsers(
        dest="world_command", required=True
    )
    train = world.add_parser("train", help="train a world model from a seed (reproduces the shipped ones)")
    train.add_argument("--output", required=True)
    train.add_argument("--steps", type=positive_int, default=3000)
    train.add_argument(
        "--pair-p", type=probability, default=0.9, help="co-occurrence of prior pairs (0: control)"
    )
    train.add_argument("--seed", type=nonnegative_int, default=0)
    train.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads; 1 reproduces the shipped checkpoints on a like machine (see README)",
    )
    train.set_defaults(run=world_train)
    weval = world.add_parser(
        "eval", help="vanilla and methods on the world: CHAIR, partner rate, POPE splits"
    )
    weval.add_argument(
        "--model", action="append", help="world (default), world-noprior or a folder; repeatable"
    )
    weval.add_argument(
        "--method",
        action="append",
        metavar="STACK",
        help="a method stack, methods joined by '+': vcd | vcd:contrast=blank | var+vcd; "
        "repeatable (default: vanilla, every VCD contrast and every other method)",
    )
    weval.add_argument("--probes", type=positive_int, default=400)
    weval.add_argument(
        "--num-beams", type=positive_int, default=1, help="beams for every stack (OPERA keeps its own)"
    )
    weval.add_argument("--seed", type=nonnegative_int, default=1000)
    weval.add_argument("--output", default="runs/world")
    weval.add_argument("--report", help="also write the table to this Markdown file")
    weval.add_argument("--no-progress", action="store_true")
    weval.set_defaults(run=world_eval)

    protocols = sub.add_parser(
        "protocols", help="list the evaluation protocols (official scripts' settings) for eval --protocol"
    )
    protocols.add_argument("name", nargs="?", help="print every setting of one protocol with its citation")
    protocols.add_argument("--markdown", action="store_true", help="the table as Markdown (README)")
    protocols.set_defaults(run=protocols_command)

    sweep = sub.add_parser("sweep", help="run a YAML grid of models, benchmarks and method stacks")
    sweep.add_argument("config", help="sweep YAML, e.g. configs/ablation_vcd.yaml")
    sweep.add_argument("--output", help="output folder (default: the file's `output` or runs/sweeps/<name>)")
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="check each cell as its run would (model loaded, methods built on the first batch); run nothing",
    )
    sweep.add_argument("--compile", action="store_true", help=COMPILE_HELP + " in every cell")
    sweep.set_defaults(run=sweep_command)


COMPILE_HELP = (
    "decode with a static cache and a compiled decoding step (the same tokens; OPERA stays eager); "
    "the first batches pay for compilation"
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan or inf)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _add_chair_truth(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--gt", help="CHAIR ground truth JSON (image id -> objects), .json or .json.gz")
    group.add_argument("--coco-annotations", help="folder with COCO instances_*.json and captions_*.json")
    parser.add_argument(
        "--synonyms", help="CHAIR synonym list (default: the COCO list shipped with veridical)"
    )


def _chair(args: argparse.Namespace):
    from veridical.evals.chair import load_chair

    return load_chair(args.gt, args.coco_annotations, args.synonyms)


def score_chair(args: argparse.Namespace) -> int:
    from veridical.evals.chair import read_captions

    captions = read_captions(args.captions, args.image_id_key, args.caption_key)
    result = _chair(args).score(captions, bootstrap=args.bootstrap, seed=args.seed)
    if args.details:
        Path(args.details).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    print_metrics(result.metrics, len(captions), args.json, intervals=result.intervals)
    return 0


def score_pope(args: argparse.Namespace) -> int:
    from veridical.evals.pope import read_answers, read_questions
    from veridical.evals.pope import score_pope as score

    result = score(read_questions(args.questions), read_answers(args.answers), rule=args.rule)
    print_metrics(result.metrics, sum(result.confusion.values()), args.json, extra=result.confusion)
    return 0


def pope_build(args: argparse.Namespace) -> int:
    from veridical.evals.pope_build import STRATEGIES, build_pope, coco_image_objects, write_questions

    objects = coco_image_objects(args.instances)
    for strategy in args.strategy or STRATEGIES:
        questions = build_pope(objects, strategy, num_images=args.num_images, seed=args.seed)
        path = Path(args.out) / f"{args.prefix}_pope_{strategy}.json"
        write_questions(questions, path)
        print(f"{strategy}: {len(questions)} questions -> {path}")
    return 0


def print_metrics(
    metrics: dict, n: int, as_json: bool, intervals: dict | None = None, extra: dict | None = None
) -> None:
    intervals = intervals or {}
    if as_json:
        ci = {k: list(v) for k, v in intervals.items()}
        print(json.dumps({**metrics, "n": n, **(extra or {}), "ci95": ci}))
        return
    for name, value in metrics.items():
        ci = f"  (95% CI {intervals[name][0]:.1f}-{intervals[name][1]:.1f})" if name in intervals else ""
        print(f"{name:10s} {value:6.1f}{ci}")
    print(f"{'n':10s} {n:6d}" + (f"  {extra}" if extra else ""))


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from veridical.errors import VeridicalError

    overrides = {
        k: v
        for k, v in {
            "max_new_tokens": args.max_new_tokens,
            "num_beams": args.num_beams,
            "do_sample": args.do_sample,
            "temperature": args.temperature,
            "top_p": args.top_p,
        }.items()
        if v is not None
    }
    for item in args.gen:
        key, sep, value = item.partition("=")
        if not sep:
            raise VeridicalError(f"--gen expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _samples(args: EvalRequest):
    from veridical.errors import VeridicalError
    from veridical.evals import samples as S

    if args.benchmark == "pope":
        if args.hf_dataset:
            return S.pope_hf_samples(args.hf_dataset, args.hf_split, args.hf_category), {
                "hf_dataset": args.hf_dataset,
                "split": args.hf_split,
                "category": args.hf_category,
            }
        questions = args.questions or (S.shipped_pope_file(args.pope_set) if args.pope_set else None)
        if not questions or not args.images:
            raise VeridicalError("POPE needs --images with --questions or --pope-set, or --hf-dataset")
        return S.pope_samples(questions, args.images), {"questions": str(questions), "images": args.images}
    if not args.images or not (args.gt or args.coco_annotations):
        raise VeridicalError("CHAIR needs --images and --gt or --coco-annotations")
    return None, {
        "images": args.images,
        "gt": args.gt,
        "coco_annotations": args.coco_annotations,
        "num_images": args.num_images,
    }


def _resolve(args: EvalRequest, methods: list, family: str | None):
    """The protocol resolved with the user's explicit flags (which win, and are recorded)."""
    from veridical.evals.protocols import resolve_run

    return resolve_run(
        args.protocol,
        args.benchmark,
        family,
        methods,
        generation=args.generation,
        rule=args.rule,
        instruction=args.prompt,
        question_suffix=args.question_suffix,
        template=args.prompt_template,
    )


@dataclass
class EvalPlan:
    """An eval run checked down to the first batch's method construction, not yet started."""

    config: Any
    model: Any
    processor: Any
    samples: list
    scorer: Any
    output: Path
    label: str
    protocol: str
    #: ``new``, ``resume``, ``takeover`` (a folder without finished samples) or ``overwrite``.
    status: str


def plan_eval(request: EvalRequest) -> EvalPlan:
    """Validate every setting of an eval, load the model and build its methods on the first batch.

    Nothing is written: a mistake found here leaves no folder behind to block the corrected run.
    """
    args = request.check()
    from veridical.evals.chair import ChairScorer
    from veridical.evals.models import check_device, load_model
    from veridical.evals.pope import PopeScorer
    from veridical.evals.protocols import check_protocol
    from veridical.evals.runner import EvalConfig, check_methods, prepare_output
    from veridical.evals.samples import chair_samples
    from veridical.evals.settings import check_generation
    from veridical.registry import validate_spec

    methods = list(args.methods)
    for spec in methods:
        if isinstance(spec, (str, dict)):
            validate_spec(spec)
    protocol = check_protocol(args.protocol, args.benchmark)
    check_generation(args.generation, source="the generation settings given")
    check_device(args.device)
    # What does not depend on the model family (request, parser) is resolved before the model loads,
    # so that bad data fail fast; the rest once the family is known.
    early = _resolve(args, methods, None)
    samples, data = _samples(args)
    if args.benchmark == "chair":
        chair = _chair(args)
        data["synonyms"] = chair.vocabulary.source  # the records' objects depend on it
        data["prompt"] = early.instruction
        samples = chair_samples(
            args.images, list(chair.ground_truth), args.num_images, args.seed, data["prompt"]
        )
        scorer = ChairScorer(chair, seed=args.seed)
    else:
        scorer = PopeScorer(early.rule)
        data["rule"] = early.rule
    if args.limit is not None:
        samples = samples[: args.limit]
        data["limit"] = args.limit
    label = "+".join(method_label(m) for m in methods) or "vanilla"
    suffix = "" if protocol.name == "default" else f"-{protocol.name}"
    output = Path(args.output or f"runs/{args.benchmark}-{Path(args.model).name}-{label}{suffix}")
    model, processor = load_model(args.model, args.dtype, args.device)
    run = _resolve(args, methods, getattr(model.config, "model_type", None))
    check_generation(run.generation, source="the resolved generation settings")
    config = EvalConfig(
        args.benchmark,
        args.model,
        run.methods,
        data,
        run.generation,
        args.batch_size,
        args.seed,
        prompt=run.prompt,
        protocol=run.record,
        compile=args.compile,
    )
    status = prepare_output(config, output, args.overwrite)
    check_methods(config, model, processor, samples)
    return EvalPlan(config, model, processor, samples, scorer, output, label, protocol.name, status)


def run_eval_command(args: argparse.Namespace) -> int:
    return run_eval_request(eval_request(args))


def eval_request(args: argparse.Namespace) -> EvalRequest:
    """The request of a ``veridical eval`` command line: its options, methods parsed, generation flags
    and ``--gen`` values in one mapping."""
    options = {f.name: getattr(args, f.name) for f in fields(EvalRequest) if hasattr(args, f.name)}
    options["methods"] = parse_methods(args.method)
    options["generation"] = generation_overrides(args)
    options["progress"] = not args.no_progress
    return EvalRequest(**options)


def run_eval_request(request: EvalRequest) -> int:
    """Plan, then run (or only check, for a dry run) one eval, printing what it does and its metrics."""
    from veridical.evals.runner import compiles, run_eval

    args = request
    plan = plan_eval(request)
    record = plan.config.protocol or {}
    overridden = f", overridden {sorted(record['overridden'])}" if record.get("overridden") else ""
    what = {"new": "", "resume": " (resuming)", "takeover": " (taking over a folder with no finished sample)"}
    print(
        f"{args.benchmark}: {len(plan.samples)} samples, methods [{plan.label}], protocol {plan.protocol}"
        f"{overridden}, generation {plan.config.generation} -> {plan.output}"
        + what.get(plan.status, " (overwriting)")
    )
    if args.compile:
        print(
            "compiled decoding: static cache, one compiled graph per decoding step"
            if compiles(plan.config)
            else "compiled decoding not used: OPERA runs its own eager beam loop"
        )
    if args.dry_run:
        print("dry run: every setting checked and the methods built on the first batch; nothing written")
        return 0
    results = run_eval(
        plan.config,
        plan.model,
        plan.processor,
        plan.samples,
        plan.scorer,
        plan.output,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    if results is not None:
        metrics = {k: v for k, v in results["metrics"].items() if isinstance(v, float)}
        print_metrics(metrics, len(plan.samples), as_json=False)
        print(f"results: {plan.output / 'results.json'}")
    return 0


def parse_methods(texts: list[str]) -> list:
    """The methods of repeated ``--method`` values, each a stack (``vanilla``, ``var+vcd:alpha=2``)."""
    from veridical.registry import parse_method_stack, validate_spec

    methods = [spec for text in texts for spec in parse_method_stack(text)]
    for spec in methods:
        validate_spec(spec)
    return methods


def method_label(spec: Any) -> str:
    """A method in a folder name, with the hyper-parameters that differ from its defaults:
    ``vcd``, ``vcd-contrast=blank``, ``act-heads=configs_act_heads_world.json``."""
    from veridical.registry import hyperparameters, method_class

    if isinstance(spec, str):
        return spec
    defaults = hyperparameters(method_class(spec["name"]))
    changed = [f"{k}={v}" for k, v in spec.items() if k != "name" and defaults.get(k) != v]
    text = "-".join([spec["name"], *changed])
    return re.sub(r"[^\w.=,+-]", "_", text.replace("/", "_"))


def protocols_command(args: argparse.Namespace) -> int:
    from veridical.evals.protocols import protocol_details, protocols_table

    print(protocol_details(args.name) if args.name else protocols_table(markdown=args.markdown))
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from veridical.evals.sweep import failed_cells, run_sweep

    rows = run_sweep(args.config, args.output, dry_run=args.dry_run, compile=args.compile)
    return 1 if failed_cells(rows) else 0


def world_train(args: argparse.Namespace) -> int:
    from veridical.evals.world.train import TrainConfig, train_world

    config = TrainConfig(steps=args.steps, pair_p=args.pair_p, seed=args.seed, threads=args.threads)
    train_world(args.output, config)
    print(f"saved to {args.output}")
    return 0


def world_eval(args: argparse.Namespace) -> int:
    import time

    from veridical.evals.world.evaluate import DEFAULT_METHODS, evaluate_world, markdown_table

    stacks = [parse_methods([text]) for text in args.method] if args.method else DEFAULT_METHODS
    start, rows = time.perf_counter(), []
    for model in args.model or ["world"]:
        rows += evaluate_world(
            model,
            stacks,
            args.probes,
            args.seed,
            args.output,
            progress=not args.no_progress,
            num_beams=args.num_beams,
        )
    table = markdown_table(rows)
    print(table)
    elapsed = time.perf_counter() - start
    print(f"({args.probes} probe scenes, seed {args.seed}, {_decoding(args)}; {elapsed:.0f} s)")
    if args.report:
        Path(args.report).write_text(_world_report(args, table), encoding="utf-8")
    return 0


WORLD_REPORT_HEADER = """# The synthetic world: every method, measured

Generated by `{command}`: {probes} probe scenes, data seed {seed}, {decoding}; checkpoints `world`
(trained with the co-occurrence prior) and `world-noprior` (the control trained without it).
`partner %`: probe captions naming the absent partner of the scene's one prior-pair member;
`given member`: the same among captions that name the member. POPE: accuracy and F1 per split.

"""


def _world_report(args: argparse.Namespace, table: str) -> str:
    import shlex
    import sys

    command = (
        "veridical " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["world"] else "veridical world eval"
    )
    header = WORLD_REPORT_HEADER.format(
        command=command, probes=args.probes, seed=args.seed, decoding=_decoding(args)
    )
    return header + table + "\n"


#: World calibration data use their own seed, disjoint from the evaluation scenes (seed 1000).
WORLD_CALIBRATION_SEED = 2000


def _add_calibration_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id, local folder, world or world-noprior")
    parser.add_argument(
        "--questions", help="POPE question file (default for world models: a fresh world set)"
    )
    parser.add_argument("--images", help="image folder of the questions")
    parser.add_argument("--samples", type=positive_int, default=32, help="questions drawn with --seed")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", required=True, help="the file to write (JSON)")
    parser.add_argument("--no-progress", action="store_true")


def calibrate_command(args: argparse.Namespace) -> int:
    from veridical.registry import parse_method_spec

    spec = parse_method_spec(f"{args.method}:{','.join(args.option)}" if args.option else args.method)
    name = spec if isinstance(spec, str) else spec.pop("name")
    return run_calibration(args, name, {} if isinstance(spec, str) else spec)


def calibrate_act_command(args: argparse.Namespace) -> int:
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    options = {"scale": args.scale, "threshold": args.threshold}
    return run_calibration(args, "act", options if layers is None else {"layers": layers, **options})


def run_calibration(args: argparse.Namespace, name: str, options: dict[str, Any]) -> int:
    """Calibrate method ``name`` with ``options`` (checked against its ``calibration_rules``) on POPE
    questions (for a world model without ``--questions``: a fresh world set) and write its file."""
    from veridical.errors import MethodSpecError
    from veridical.evals.calibration import pope_calibration_samples
    from veridical.evals.models import load_model
    from veridical.evals.world.evaluate import write_world_data
    from veridical.evals.world.shipped import WORLD_MODELS, model_path
    from veridical.params import check_values
    from veridical.registry import list_methods, method_class

    cls = method_class(name)
    if not hasattr(cls, "calibrate"):
        having = [m for m in list_methods() if hasattr(method_class(m), "calibrate")]
        raise MethodSpecError(f"{name} has no calibration; methods with one: {', '.join(having)}")
    rules = getattr(cls, "calibration_rules", {})
    unknown = sorted(set(options) - set(rules))
    if unknown:
        raise MethodSpecError(f"{name} calibration has no setting(s) {unknown}; settings: {sorted(rules)}")
    check_values(name, rules, options)
    questions, images = args.questions, args.images
    if questions is None:
        if args.model not in WORLD_MODELS:
            raise SystemExit(f"calibrate {name}: --questions and --images are required for non-world models")
        data = write_world_data(
            Path("runs/world") / f"calibration-{WORLD_CALIBRATION_SEED}",
            4 * args.samples,
            WORLD_CALIBRATION_SEED,
        )
        questions, images = data / "world_pope_random.json", data / "pope"
    elif images is None:
        raise SystemExit(f"calibrate {name}: --images is required with --questions")
    model, processor = load_model(model_path(args.model), args.dtype, args.device)
    samples = pope_calibration_samples(model, processor, questions, images, args.samples, args.seed)
    meta = {"model": args.model, "questions": str(questions), "samples": len(samples)}
    summary = cls.calibrate(model, samples, args.output, progress=not args.no_progress, meta=meta, **options)
    print(f"{summary}; written to {args.output}")
    return 0


def _decoding(args: argparse.Namespace) -> str:
    if args.num_beams > 1:
        return f"beam search ({args.num_beams} beams)"
    return "greedy decoding (OPERA: 5 beams)"

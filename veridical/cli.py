"""The ``veridical`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from veridical.errors import VeridicalError

PARSER_NAMES = ("llava", "opera", "vcd")


def _demo(args: argparse.Namespace) -> int:
    import torch

    import veridical
    from veridical.tiny import tiny_inputs, tiny_model

    torch.manual_seed(args.seed)
    model, processor = tiny_model(args.family)
    questions = ["describe this image in detail please", "what is in the picture ?"]
    inputs = tiny_inputs(args.family, processor, questions, seed=args.seed)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    print(
        f"tiny random-weight {args.family} model (greedy, {args.max_new_tokens} new tokens); "
        "its words are noise, the mechanics are real\n"
    )
    for label, methods in (("vanilla", []), ("vcd", [{"name": "vcd", "seed": args.seed}])):
        out = veridical.generate(model, inputs, methods=methods, **settings)
        for question, row in zip(questions, out[:, prompt_len:], strict=True):
            print(
                f"{label:8s} | {question:40s} | {processor.tokenizer.decode(row, skip_special_tokens=True)}"
            )
    return 0


def _methods(args: argparse.Namespace) -> int:
    import veridical
    from veridical.registry import hyperparameters, method_class

    for name in veridical.list_methods():
        params = ", ".join(f"{k}={v!r}" for k, v in hyperparameters(method_class(name)).items())
        print(f"{name}: {params}")
    return 0


def _score_chair(args: argparse.Namespace) -> int:
    from veridical.evals.chair import Chair, ChairVocabulary, GroundTruth, read_captions

    vocabulary = ChairVocabulary.from_file(args.synonyms)
    if args.coco_annotations:
        ground_truth = GroundTruth.from_coco(args.coco_annotations, vocabulary)
    else:
        ground_truth = GroundTruth.from_json(args.gt)
    captions = read_captions(args.captions, args.image_id_key, args.caption_key)
    result = Chair(ground_truth, vocabulary).score(captions, bootstrap=args.bootstrap, seed=args.seed)
    if args.details:
        Path(args.details).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    _print_metrics(result.metrics, result.intervals, len(captions), args.json)
    return 0


def _score_pope(args: argparse.Namespace) -> int:
    from veridical.evals.pope import read_answers, read_questions, score_pope

    result = score_pope(read_questions(args.questions), read_answers(args.answers), rule=args.rule)
    _print_metrics(result.metrics, {}, sum(result.confusion.values()), args.json, extra=result.confusion)
    return 0


def _pope_build(args: argparse.Namespace) -> int:
    from veridical.evals.pope_build import STRATEGIES, build_pope, coco_image_objects, write_questions

    objects = coco_image_objects(args.instances)
    for strategy in args.strategy or STRATEGIES:
        questions = build_pope(objects, strategy, num_images=args.num_images, seed=args.seed)
        path = Path(args.out) / f"{args.prefix}_pope_{strategy}.json"
        write_questions(questions, path)
        print(f"{strategy}: {len(questions)} questions -> {path}")
    return 0


def _print_metrics(metrics: dict, intervals: dict, n: int, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        print(
            json.dumps(
                {**metrics, "n": n, **(extra or {}), "ci95": {k: list(v) for k, v in intervals.items()}}
            )
        )
        return
    for name, value in metrics.items():
        ci = f"  (95% CI {intervals[name][0]:.1f}-{intervals[name][1]:.1f})" if name in intervals else ""
        print(f"{name:10s} {value:6.1f}{ci}")
    print(f"{'n':10s} {n:6d}" + (f"  {extra}" if extra else ""))


def build_parser() -> argparse.ArgumentParser:
    from veridical.tiny import FAMILIES

    parser = argparse.ArgumentParser(prog="veridical", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate with and without VCD on a tiny built-in model")
    demo.add_argument("--family", choices=FAMILIES, default="llava")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    methods = sub.add_parser("methods", help="list the registered methods and their defaults")
    methods.set_defaults(run=_methods)

    score = sub.add_parser("score", help="score existing outputs").add_subparsers(
        dest="benchmark", required=True
    )
    chair = score.add_parser("chair", help="CHAIR of captions ({image_id, caption} JSON lines)")
    chair.add_argument("captions")
    gt = chair.add_mutually_exclusive_group(required=True)
    gt.add_argument("--gt", help="prepared ground truth JSON (image id -> objects), .json or .json.gz")
    gt.add_argument("--coco-annotations", help="folder with COCO instances_*.json and captions_*.json")
    chair.add_argument(
        "--synonyms", help="CHAIR synonym list (default: the COCO list shipped with veridical)"
    )
    chair.add_argument("--image-id-key", default="image_id")
    chair.add_argument("--caption-key", default="caption")
    chair.add_argument("--bootstrap", type=int, default=1000, help="resamples for 95%% intervals (0: none)")
    chair.add_argument("--seed", type=int, default=0)
    chair.add_argument("--details", help="write per-caption results to this JSON file")
    chair.add_argument("--json", action="store_true", help="print one JSON object")
    chair.set_defaults(run=_score_chair)
    pope = score.add_parser("pope", help="POPE of answers ({question_id, text} JSON lines)")
    pope.add_argument("answers")
    pope.add_argument("--questions", required=True, help="POPE question file (JSON lines or array)")
    pope.add_argument("--rule", default="llava", choices=sorted(PARSER_NAMES), help="answer parsing rule")
    pope.add_argument("--json", action="store_true", help="print one JSON object")
    pope.set_defaults(run=_score_pope)

    build = sub.add_parser("pope-build", help="build POPE question sets from COCO-format annotations")
    build.add_argument("instances", help="COCO instances_*.json")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--prefix", default="coco")
    build.add_argument("--strategy", action="append", choices=("random", "popular", "adversarial"))
    build.add_argument("--num-images", type=int, default=500)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(run=_pope_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VeridicalError as err:
        print(f"veridical: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``veridical`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from veridical.errors import VeridicalError
from veridical.evals.commands import add_eval_commands


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
    stacks = (
        ("vanilla", []),
        ("vcd", [{"name": "vcd", "seed": args.seed}]),
        ("pai", ["pai"]),
        ("vhr+vcd", ["vhr", {"name": "vcd", "seed": args.seed}]),
    )
    for label, methods in stacks:
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


def build_parser() -> argparse.ArgumentParser:
    from veridical.tiny import FAMILIES

    parser = argparse.ArgumentParser(prog="veridical", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate with a few method stacks on a tiny built-in model")
    demo.add_argument("--family", choices=FAMILIES, default="llava")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    methods = sub.add_parser("methods", help="list the registered methods and their defaults")
    methods.set_defaults(run=_methods)

    add_eval_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VeridicalError as err:
        print(f"veridical: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``veridical`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from veridical.errors import VeridicalError
from veridical.evals.commands import add_eval_commands


def _demo(args: argparse.Namespace) -> int:
    import torch

    import veridical
    from veridical.tiny import FAMILIES, tiny_inputs, tiny_model

    if args.family not in FAMILIES:
        raise VeridicalError(f"--family {args.family!r}: choose one of {', '.join(FAMILIES)}")

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
    from veridical.catalog import format_methods

    print(format_methods())
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line, like every other error (``veridical: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("veridical").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"veridical: error: {where}{message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from veridical import __version__
    from veridical.evals.commands import nonnegative_int, positive_int

    parser = _Parser(prog="veridical", description=__doc__)
    parser.add_argument("--version", action="version", version=f"veridical {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate with a few method stacks on a tiny built-in model")
    demo.add_argument(
        "--family", default="llava", help="llava | llava_next | qwen2_vl | qwen2_5_vl | instructblip"
    )
    demo.add_argument("--max-new-tokens", type=positive_int, default=12)
    demo.add_argument("--seed", type=nonnegative_int, default=0)
    demo.set_defaults(run=_demo)
    methods = sub.add_parser(
        "methods", help="list the registered methods, their hyper-parameters, defaults and ranges"
    )
    methods.set_defaults(run=_methods)

    add_eval_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user's mistake ends in one ``veridical: error:`` line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VeridicalError as err:
        print(f"veridical: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that cannot be read or written, a full disk, ...
        if isinstance(err, BrokenPipeError):  # output piped into `head` and closed early
            sys.stderr.close()
            return 0
        print(f"veridical: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if not str(err):  # stopped outside a run: nothing to resume
            print("veridical: interrupted", file=sys.stderr)
            return 130
        command = "veridical " + shlex.join(sys.argv[1:] if argv is None else argv)
        print(f"veridical: interrupted: {err}; resume with: {command}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

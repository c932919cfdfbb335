"""CHAIR of the twelve caption sets OPERA released (4 models x greedy / beam 5 / OPERA, 500 COCO images each).

Scores every set with ``veridical score chair`` (max_new_tokens 512 captions, the ground truth OPERA
released with them) and prints the Markdown table; ``--update-readme`` writes it into README.md between
its ``chair-released`` markers. ``tests/test_chair_oracle.py`` checks the README's table against this
command and each row against the reference pipeline (NLTK itself).

    python benchmarks/chair_released.py --update-readme
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "tests" / "data" / "chair" / "opera_logs"
MODELS = {
    "llava-1.5": "LLaVA-1.5-7B",
    "instructblip": "InstructBLIP-7B",
    "minigpt4": "MiniGPT-4",
    "shikra": "Shikra-7B",
}
DECODINGS = {"greedy": "greedy", "beam5": "beam 5", "ours": "OPERA"}
README_BLOCK = re.compile(r"(<!-- chair-released:start -->\n)(.*?)(<!-- chair-released:end -->)", re.S)


def ground_truth_file(model: str) -> Path:
    return LOGS / (
        "gt_objects_500_instructblip.json"
        if model == "instructblip"
        else "gt_objects_500_llava_minigpt4_shikra.json"
    )


def released_sets() -> list[tuple[str, str, Path]]:
    """``(model, decoding, captions file)`` of every released set, in table order."""
    return [(m, d, LOGS / m / f"{d}.jsonl") for m in MODELS for d in DECODINGS]


def score(captions: Path, ground_truth: Path) -> dict:
    """The metrics ``veridical score chair --json`` prints for one set."""
    import contextlib
    import io

    from veridical.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(
            ["score", "chair", str(captions), "--gt", str(ground_truth), "--json", "--bootstrap", "0"]
        )
    if status != 0:
        raise SystemExit(f"veridical score chair failed on {captions}")
    return json.loads(out.getvalue())


def rows() -> list[tuple[str, str, dict]]:
    """``(model, decoding, metrics)`` of every released set, scored by ``veridical score chair``."""
    return [
        (model, decoding, score(path, ground_truth_file(model))) for model, decoding, path in released_sets()
    ]


def table(scored: list[tuple[str, str, dict]]) -> str:
    lines = [
        "| model | decoding | CHAIR_s | CHAIR_i | Recall | Len |",
        "|---|---|---|---|---|---|",
    ]
    for model, decoding, m in scored:
        lines.append(
            f"| {MODELS[model]} | {DECODINGS[decoding]} | {m['CHAIRs']:.1f} | {m['CHAIRi']:.1f} | "
            f"{m['Recall']:.1f} | {m['Len']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    text = table(rows())
    if args.update_readme:
        readme = ROOT / "README.md"
        content = readme.read_text(encoding="utf-8")
        if not README_BLOCK.search(content):
            sys.exit("README.md has no <!-- chair-released:start --> ... <!-- chair-released:end --> block")
        readme.write_text(
            README_BLOCK.sub(lambda m: m.group(1) + text + m.group(3), content), encoding="utf-8"
        )
    sys.stdout.write(text)


if __name__ == "__main__":
    main()

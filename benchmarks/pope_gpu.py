"""``veridical eval pope`` throughput (samples/s) on generated questions, eager and with ``--compile``.

    python benchmarks/pope_gpu.py --model llava-1.5-7b --out-dir OUT                  # GPU
    python benchmarks/pope_gpu.py --model tiny-llava --compile-backend eager --out-dir OUT   # CPU check

The model is built in this process with random weights (``benchmarks/overhead.py``'s builders) and handed
to the CLI by replacing its loader, ``veridical.evals.models.load_model``, for the run: ``veridical eval``
loads by path, and writing 14 GB of random float16 weights to disk and reading them back would take longer
than the measurement. Everything else is the CLI's own path (``veridical.cli.main``): arguments, protocol,
data files, batching, the run folder, scoring. The questions ("Is there a <COCO object> in the image?",
half yes) are written beside noise images of COCO's usual size (640x480 JPEG); object names of one to
three words give prompts of several lengths, as real POPE files do. Random weights rarely emit the end
token, so nearly every answer is ``--max-new-tokens`` long. Throughput is the run's own record
(``results.json``, ``run``: samples over generation time, compilation included); a second compiled run in
the same process shows the rate once the graphs exist.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

#: COCO object names of one to three words (prompt lengths vary as in POPE's files).
OBJECTS = (
    "person car chair cup dog cat bottle book bowl truck bench bird boat clock vase umbrella "
    "dining_table traffic_light cell_phone tennis_racket fire_hydrant stop_sign sports_ball hair_drier "
    "baseball_bat teddy_bear potted_plant wine_glass hot_dog parking_meter baseball_glove"
).split()


def write_pope_data(root: Path, questions: int = 200, images: int = 34, seed: int = 0) -> tuple[Path, Path]:
    """A POPE question file (JSON lines) and its image folder under ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    picks = random.Random(seed)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"COCO_val2014_{i + 1:012d}.jpg" for i in range(images)]
    for name in names:
        pixels = (rng.random((480, 640, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / name, quality=90)
    lines = []
    for i in range(questions):
        obj = picks.choice(OBJECTS).replace("_", " ")
        record = {
            "question_id": i + 1,
            "image": names[i % images],
            "text": f"Is there a {obj} in the image?",
            "label": "yes" if i % 2 == 0 else "no",
        }
        lines.append(json.dumps(record))
    path = root / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, folder


def run_cli(argv: list[str], model, processor) -> tuple[int, str]:
    """``veridical.cli.main(argv)`` with its loader returning ``(model, processor)``; (status, output)."""
    import veridical.evals.models as models
    from veridical.cli import main

    out = io.StringIO()
    with (
        mock.patch.object(models, "load_model", lambda *a, **k: (model, processor)),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out),
    ):
        try:
            status = main(argv)
        except SystemExit as err:  # argparse: an unknown flag (e.g. no --compile in this checkout)
            status = err.code if isinstance(err.code, int) else 2
    return status, out.getvalue()


def run_summary(folder: Path) -> dict:
    """The run's time and sample counts: from results.json, else (a run cut short) from its parts."""
    results = folder / "results.json"
    if results.is_file():
        return json.loads(results.read_text(encoding="utf-8"))["run"]
    parts = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("parts/*.json"))]
    return {
        "wall_time_s": sum(p.get("wall_time_s", 0.0) for p in parts),
        "samples_generated": sum(p.get("samples_generated", 0) for p in parts),
        "generated_tokens": sum(p.get("generated_tokens", 0) for p in parts),
    }


def pope_run(
    model_name: str,
    model,
    processor,
    data: tuple[Path, Path],
    out: Path,
    device: str,
    compiled: bool,
    tokens: int,
    batch: int,
) -> dict:
    """One ``veridical eval pope`` run; returns samples, generation seconds, samples/s and a note."""
    questions, images = data
    argv = ["eval", "pope", "--model", model_name, "--questions", str(questions), "--images", str(images)]
    argv += ["--output", str(out), "--batch-size", str(batch), "--no-progress", "--overwrite"]
    argv += ["--max-new-tokens", str(tokens), "--no-do-sample", "--device", device]
    argv += ["--compile"] if compiled else []
    start = time.perf_counter()
    status, text = run_cli(argv, model, processor)
    wall = time.perf_counter() - start
    if status != 0:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        last = (lines[-1] if lines else f"exit status {status}").replace("|", "/")[:200]
        if compiled and "--compile" in text and "unrecognized" in text:
            last = "`veridical eval --compile` does not exist in this checkout"
        return {"error": last, "cli_s": wall}
    run = run_summary(out)
    samples, seconds = run["samples_generated"], run["wall_time_s"]
    return {
        "samples": samples,
        "generation_s": seconds,
        "samples_per_s": samples / seconds if seconds else 0.0,
        "tokens_per_sample": run["generated_tokens"] / samples if samples else 0.0,
        "cli_s": wall,
    }


def run_pope_item(model_name: str, settings, budget, report, load: Callable) -> str | None:
    """The ``pope:MODEL`` item of overhead.py's plan: eager, compiled, compiled again, each only when its
    estimated time fits before the deadline; returns why the item was skipped (None when it ran)."""
    import torch
    import torch._dynamo
    from overhead import BudgetExceeded, Config

    n_batches = -(-settings.pope_questions // settings.pope_batch)
    per_batch = budget.call_estimate(model_name, settings.pope_batch, Config("vanilla", 1, False))
    eager_cost = n_batches * (per_batch * (settings.pope_tokens + 2) / (settings.tokens + 2) + 0.2)
    eager_cost += budget.build_estimate(model_name) + 5.0
    if eager_cost > budget.left():
        return f"needs about {eager_cost:.0f} s, {max(budget.left(), 0):.0f} s left"
    report.mark(f"pope {model_name}: building / writing data")
    model, processor = load(model_name, settings.device)
    work = Path(tempfile.mkdtemp(prefix="veridical-pope-gpu-"))
    data = write_pope_data(work / "data", settings.pope_questions)
    common = dict(device=settings.device, tokens=settings.pope_tokens, batch=settings.pope_batch)
    runs = [
        ("eager", False, "", 0.0),
        ("compiled, first run", True, "compilation included", 2.0),
        ("compiled again", True, "same process, graphs exist", 0.0),
    ]
    eager_s = None
    for label, compiled, note, compiles in runs:
        cost = (eager_s or eager_cost) + compiles * budget.compile_estimate()
        if cost > budget.left():
            report.pope_row(
                [
                    model_name,
                    label,
                    "-",
                    "-",
                    "-",
                    "-",
                    f"skipped: needs about {cost:.0f} s, {budget.left():.0f} s left",
                ],
                {"pope": label, "skipped": True},
            )
            continue
        report.mark(f"pope {model_name}: {label}")
        out = work / label.replace(" ", "-").replace(",", "")
        # A compiled run starts as a fresh process would (no graphs yet; dynamo's default shape policy); the
        # second compiled run keeps the first one's graphs.
        if compiled and compiles:
            fresh_process(model)
            budget.compiled_now.clear()
        patch = (
            torch._dynamo.config.patch(automatic_dynamic_shapes=True)
            if compiled
            else contextlib.nullcontext()
        )
        try:
            with patch:
                found = pope_run(model_name, model, processor, data, out, compiled=compiled, **common)
        except BudgetExceeded:
            run = run_summary(out)
            report.pope_row(
                [
                    model_name,
                    label,
                    run["samples_generated"],
                    "-",
                    f"{run['wall_time_s']:.1f}",
                    "-",
                    "stopped at the deadline",
                ],
                {"pope": label, "stopped": True, **run},
            )
            raise
        if "error" in found:
            report.pope_row(
                [model_name, label, "-", "-", "-", "-", f"failed: {found['error']}"], {"pope": label, **found}
            )
            if compiled:
                break
            continue
        if not compiled:
            eager_s = found["cli_s"]
        extra = f"; CLI call {found['cli_s']:.1f} s" + (f"; {note}" if note else "")
        report.pope_row(
            [
                model_name,
                label,
                found["samples"],
                f"{found['tokens_per_sample']:.1f}",
                f"{found['generation_s']:.1f}",
                f"{found['samples_per_s']:.2f}",
                f"batch {settings.pope_batch}{extra}",
            ],
            {"pope": label, **found},
        )
    fresh_process(model)  # the stack items that follow compile their own graphs, as before
    budget.compiled_now.clear()
    return None


def fresh_process(model) -> None:
    """Forget compiled graphs and the static cache length that generate() keeps on the model (it sizes a
    new static cache to the longest seen, to avoid recompiling): as in a new process."""
    import torch._dynamo

    torch._dynamo.reset()
    if hasattr(model, "_previous_max_cache_length"):
        del model._previous_max_cache_length


def main() -> None:
    import overhead

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llava-1.5-7b", choices=sorted(overhead.MODELS))
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    overhead.use_compile_backend(args.compile_backend)
    settings = overhead.Settings(
        device=device,
        tokens=32,
        compile_backend=args.compile_backend,
        pope_questions=args.questions,
        pope_tokens=args.tokens,
        pope_batch=args.batch,
    )
    report = overhead.Report(Path(args.out_dir), f"# POPE throughput\n\n`{' '.join(sys.argv)}`\n")
    run_pope_item(args.model, settings, overhead.Budget(settings), report, overhead.load)


if __name__ == "__main__":
    main()

"""Time per token and peak memory of every method, relative to vanilla ``generate()`` in the same run.

    python benchmarks/overhead.py --report benchmarks/overhead.md

For each model and batch size, every stack generates the same number of tokens from the same prompts
(greedy, ``min_new_tokens = max_new_tokens``); stacks run round-robin, ``--repeats`` times, and the
median wall time is divided by vanilla's median. Setup done inside ``veridical.generate`` (VHR's head
choice, PAINT's token choice, VAR's sink detection) is counted.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import veridical
from veridical.evals.runner import stack_label
from veridical.registry import parse_method_spec

#: Stacks measured on every model, with their beam count; VAR gets a threshold under which these
#: small models have sinks. Each ratio is against vanilla with the same number of beams.
COMMON = [
    ("vanilla", 1),
    ("pai", 1),
    ("paint", 1),
    ("vhr", 1),
    ("act", 1),
    ("vcd", 1),
    ("m3id", 1),
    ("avisc", 1),
    ("vista", 1),
    ("pai+vcd", 1),
    ("vanilla", 5),
    ("opera", 5),
    ("opera:preset=fast", 5),
]
STACKS = {
    "tiny-llava": [*COMMON, ("var:sink_dims=[0,1],tau=1.5", 1), ("var:sink_dims=[0,1],tau=1.5+vcd", 1)],
    # Random weights have no massive activations to find: VAR gets LLaMA-2's known sink dimensions.
    "llava-1.5-7b": [*COMMON, ("var", 1), ("var+vcd", 1)],
    "world": [
        *COMMON,
        ("var:sink_dims=auto,sink_ratio=2.0,tau=3.0", 1),
        ("var:sink_dims=auto,sink_ratio=2.0,tau=3.0+vcd", 1),
    ],
}


QUESTIONS = ["describe this image in detail please", "what is this ?"]


def tiny_llava(batch: int, device: str):
    from veridical.tiny import tiny_inputs, tiny_model

    model, processor = tiny_model("llava")
    inputs = tiny_inputs("llava", processor, [QUESTIONS[i % 2] for i in range(batch)])
    return model.to(device), inputs.to(device)


def world(batch: int, device: str):
    from veridical.evals.models import build_prompt, load_model
    from veridical.evals.samples import CHAIR_PROMPT
    from veridical.evals.world.shipped import WORLD_MODELS
    from veridical.evals.world.scenes import probe_scenes

    model, processor = load_model(str(WORLD_MODELS["world"]), "float32", device)
    prompt = build_prompt(model, processor, CHAIR_PROMPT)
    images = [scene.image for scene in probe_scenes(batch, 7)]
    inputs = processor(images=images, text=[prompt] * batch, return_tensors="pt", padding=True)
    return model, inputs.to(device)


def llava_7b(batch: int, device: str):
    """LLaVA-1.5-7B's shapes with random weights in float16: 576 image tokens per prompt (GPU only)."""
    from veridical.tiny import full_size_llava, random_images

    model, processor = full_size_llava(device=device)
    texts = [f"USER: <image>\n{QUESTIONS[i % 2]} ASSISTANT:" for i in range(batch)]
    images = random_images(batch, sizes=((336, 336),))
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].half()
    return model, inputs


MODELS: dict[str, Callable] = {"tiny-llava": tiny_llava, "world": world, "llava-1.5-7b": llava_7b}
#: Models too large for a CPU run: measured (by default) only when a GPU is present.
GPU_ONLY = {"llava-1.5-7b"}


def parse_stack(text: str) -> list:
    return [] if text == "vanilla" else [parse_method_spec(part) for part in text.split("+")]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb(run: Callable[[], object]) -> float:
    """Peak of the tensor memory allocated during ``run()`` (model weights excluded).

    On CUDA from the allocator's peak; on CPU from the profiler's allocation and free events, replayed
    in time order (one extra, slower run).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def measure(
    model_name: str, batch: int, tokens: int, repeats: int, device: str
) -> list[tuple[str, int, float, float, float]]:
    """Per stack: label, beams, ms per token, time and peak memory relative to vanilla (same beams)."""
    model, inputs = MODELS[model_name](batch, device)
    stacks = [(parse_stack(text), beams) for text, beams in STACKS[model_name]]
    times: list[list[float]] = [[] for _ in stacks]

    def run(stack, beams) -> float:
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            veridical.generate(
                model,
                inputs,
                methods=stack,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                num_beams=beams,
            )
        synchronize()
        return time.perf_counter() - start

    for stack, beams in stacks:  # warm-up: first-call costs (kernels, caches) stay out of the medians
        run(stack, beams)
    for _ in range(repeats):
        for i, (stack, beams) in enumerate(stacks):
            times[i].append(run(stack, beams))
    medians = [statistics.median(t) for t in times]
    memory = [peak_memory_mb(lambda s=stack, b=beams: run(s, b)) for stack, beams in stacks]
    vanilla = {beams: i for i, (stack, beams) in enumerate(stacks) if not stack}
    return [
        (
            stack_label(stack),
            beams,
            1000 * medians[i] / tokens,
            medians[i] / medians[vanilla[beams]],
            memory[i] / max(memory[vanilla[beams]], 1e-9),
        )
        for i, (stack, beams) in enumerate(stacks)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS))
    parser.add_argument("--batch", action="append", type=int)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", help="write the Markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = args.model or sorted(name for name in MODELS if device == "cuda" or name not in GPU_ONLY)
    if device == "cpu" and GPU_ONLY & set(models):
        parser.error(f"{', '.join(sorted(GPU_ONLY & set(models)))} needs a GPU (about 14 GB in float16)")
    lines = [
        "| model | batch | beams | methods | ms / token | time x vanilla | peak memory x vanilla |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name in models:
        for batch in args.batch or [1, 8]:
            for label, beams, per_token, ratio, memory in measure(
                model_name, batch, args.tokens, args.repeats, device
            ):
                cells = [model_name, batch, beams, label, f"{per_token:.2f}", f"{ratio:.2f}", f"{memory:.2f}"]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
                print(lines[-1], flush=True)
    if args.report:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"
        header = (
            "# Overhead of each method against vanilla sdpa generate()\n\n"
            f"Generated by `python {shlex.join(sys.argv)}` on {device}: "
            f"{args.tokens} new tokens, greedy, median of {args.repeats} round-robin repeats after a "
            "warm-up; OPERA against beam search with the same beams. Peak memory: tensors allocated during "
            "one generate() call (weights excluded), from the profiler on CPU.\n\n"
        )
        Path(args.report).write_text(header + "\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

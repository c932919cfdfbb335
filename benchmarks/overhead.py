"""Time per token and peak memory of every method, relative to vanilla ``generate()`` in the same run.

    python benchmarks/overhead.py --report benchmarks/overhead.md

For each model and batch size, every stack generates the same number of tokens from the same prompts
(greedy, ``min_new_tokens = max_new_tokens``); stacks run round-robin, ``--repeats`` times, and the
median wall time is divided by vanilla's median. Setup done inside ``veridical.generate`` (VHR's head
choice, PAINT's token choice, VAR's sink detection) is counted. ``--compile`` runs every stack (OPERA's
own loop excepted) through ``veridical.generate(compile=True)``; ``--stacks pai,opera`` restricts the
stacks (vanilla with the same beams is added as the reference).

    python benchmarks/overhead.py --plan default --out-dir OUT --budget-s 430      # GPU (benchmarks/gpu.sh)
    python benchmarks/overhead.py --plan default --smoke --compile-backend eager --tokens 2 --out-dir OUT

Plan mode measures eager against compiled decoding item by item (see ``default_plan``): each item in two
interleaved rounds, the table written row by row, under a deadline that skips what does not fit and says
so. ``--smoke`` swaps the real-size models for tiny ones (a CPU check of every path).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    ("vaf", 1),
    ("deco", 1),
    ("memvr", 1),
    ("pai+vcd", 1),
    ("vanilla", 5),
    ("opera", 5),
    ("opera:preset=fast", 5),
]
STACKS = {
    "tiny-llava": [*COMMON, ("var:sink_dims=[0,1],tau=1.5", 1), ("var:sink_dims=[0,1],tau=1.5+vcd", 1)],
    # Random weights have no massive activations to find: VAR gets LLaMA-2's known sink dimensions.
    "llava-1.5-7b": [*COMMON, ("var", 1), ("var+vcd", 1)],
    # Random weights: no massive activations, no published Qwen2 sink dimensions in VAR; two
    # dimensions and a threshold under which random hidden states have sinks, so VAR's edits run.
    "tiny-qwen2.5-vl": [*COMMON, ("var:sink_dims=[0,1],tau=1.5", 1), ("var:sink_dims=[0,1],tau=1.5+vcd", 1)],
    "qwen2.5-vl-7b": [*COMMON, ("var:sink_dims=[0,1],tau=1.5", 1), ("var:sink_dims=[0,1],tau=1.5+vcd", 1)],
    "world": [
        *COMMON,
        ("var:sink_dims=auto,sink_ratio=2.0,tau=3.0", 1),
        ("var:sink_dims=auto,sink_ratio=2.0,tau=3.0+vcd", 1),
    ],
}


QUESTIONS = ["describe this image in detail please", "what is this ?"]


def _tiny(family: str):
    def build(device: str):
        from veridical.tiny import tiny_model

        model, processor = tiny_model(family)
        return model.to(device), processor

    def inputs(model, processor, batch: int, device: str):
        from veridical.tiny import tiny_inputs

        return tiny_inputs(family, processor, [QUESTIONS[i % 2] for i in range(batch)]).to(device)

    return build, inputs


def _world_build(device: str):
    from veridical.evals.models import load_model
    from veridical.evals.world.shipped import WORLD_MODELS

    return load_model(str(WORLD_MODELS["world"]), "float32", device)


def _world_inputs(model, processor, batch: int, device: str):
    from veridical.evals.models import build_prompt
    from veridical.evals.samples import CHAIR_PROMPT
    from veridical.evals.world.scenes import probe_scenes

    prompt = build_prompt(model, processor, CHAIR_PROMPT)
    images = [scene.image for scene in probe_scenes(batch, 7)]
    return processor(images=images, text=[prompt] * batch, return_tensors="pt", padding=True).to(device)


def _llava_7b_build(device: str):
    """LLaVA-1.5-7B's shapes with random weights in float16: 576 image tokens per prompt (GPU only)."""
    from veridical.tiny import full_size_llava

    return full_size_llava(device=device)


def _llava_7b_inputs(model, processor, batch: int, device: str):
    from veridical.tiny import random_images

    texts = [f"USER: <image>\n{QUESTIONS[i % 2]} ASSISTANT:" for i in range(batch)]
    images = random_images(batch, sizes=((336, 336),))
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _qwen_7b_build(device: str):
    """Qwen2.5-VL-7B's shapes with random weights in float16 (GPU only)."""
    from veridical.tiny import full_size_qwen2_5_vl

    return full_size_qwen2_5_vl(device=device)


def _qwen_7b_inputs(model, processor, batch: int, device: str):
    """672x672 images: 576 image tokens per prompt, as many as LLaVA-1.5's."""
    from veridical.tiny import random_images

    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % 2]}]}],
            add_generation_prompt=True,
        )
        for i in range(batch)
    ]
    images = random_images(batch, sizes=((672, 672),))
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


#: name -> (build(device) -> (model, processor), inputs(model, processor, batch, device) -> inputs).
MODELS: dict[str, tuple[Callable, Callable]] = {
    "tiny-llava": _tiny("llava"),
    "tiny-qwen2.5-vl": _tiny("qwen2_5_vl"),
    "world": (_world_build, _world_inputs),
    "llava-1.5-7b": (_llava_7b_build, _llava_7b_inputs),
    "qwen2.5-vl-7b": (_qwen_7b_build, _qwen_7b_inputs),
}
#: Models too large for a CPU run: measured (by default) only when a GPU is present.
GPU_ONLY = {"llava-1.5-7b", "qwen2.5-vl-7b"}
#: The tiny stand-in of each real-size model in a CPU smoke run (``--smoke``).
SMOKE_MODELS = {"llava-1.5-7b": "tiny-llava", "qwen2.5-vl-7b": "tiny-qwen2.5-vl"}
_LOADED: dict[tuple[str, str], tuple] = {}


_FAILED: dict[tuple[str, str], str] = {}


def load(model_name: str, device: str) -> tuple:
    """``(model, processor)`` of ``model_name``, built once per process (a failed build is not retried:
    every later item of that model fails at once with the first error)."""
    key = (model_name, device)
    if key in _FAILED:
        raise RuntimeError(f"{model_name} could not be built: {_FAILED[key]}")
    if key not in _LOADED:
        try:
            _LOADED[key] = MODELS[model_name][0](device)
        except Exception as err:
            lines = str(err).strip().splitlines()
            _FAILED[key] = f"{type(err).__name__}: {lines[0] if lines else ''}"
            raise
    return _LOADED[key]


def model_inputs(model_name: str, batch: int, device: str):
    model, processor = load(model_name, device)
    return MODELS[model_name][1](model, processor, batch, device)


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
    model_name: str,
    batch: int,
    tokens: int,
    repeats: int,
    device: str,
    compiled: bool = False,
    stacks: list[str] | None = None,
) -> list[tuple[str, int, float, float, float]]:
    """Per stack: label, beams, ms per token, time and peak memory relative to vanilla (same beams).

    ``compiled``: every stack but OPERA's own loop through ``veridical.generate(compile=True)``;
    ``stacks``: only these short names (``vanilla``, ``pai``, ``beam5``, ``opera``), with vanilla of
    every beam count they use added as the reference."""
    model, _ = load(model_name, device)
    inputs = model_inputs(model_name, batch, device)
    chosen = STACKS[model_name]
    if stacks is not None:
        beams_used = {find_stack(model_name, name)[1] for name in stacks}
        wanted = set(stacks) | {short_name("vanilla", b) for b in beams_used}
        chosen = [(t, b) for t, b in chosen if short_name(t, b) in wanted]
    texts = [(text, beams) for text, beams in chosen]
    stacks = [(parse_stack(text), beams) for text, beams in texts]
    compile_flags = [compiled and not own_loop(text) for text, _ in texts]
    times: list[list[float]] = [[] for _ in stacks]

    flags = {id(stack): flag for (stack, _), flag in zip(stacks, compile_flags, strict=True)}

    def run(stack, beams) -> float:
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            veridical.generate(
                model,
                inputs,
                methods=stack,
                compile=flags[id(stack)],
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


# --- Eager against compiled decoding, in interleaved rounds, under a deadline (``--plan``) ---
#
# A plan is a list of items, measured in order: ``MODEL:BATCH:STACK[:eager|:compiled]`` (both modes by
# default) or ``pope:MODEL`` (``veridical eval pope`` throughput, see pope_gpu.py). STACK is a short name:
# ``vanilla``, ``beam5`` (vanilla, 5 beams), a method (``pai``), a stack (``pai+vcd``) or ``opera`` (5
# beams). An item measures its stack and its reference (vanilla with the same beams) together: every
# configuration is warmed up once (for a compiled one: compilation and CUDA-graph recording), then timed
# in ``rounds`` rounds, each round running every configuration of the item in turn, so each ratio is
# taken within one round and the table shows one value per round. An item whose estimated time does not
# fit before the deadline runs eager only, or is skipped and listed; an alarm stops an item that overruns.

#: Stacks whose targets (issue 15) are ratios to compiled vanilla with the same beams.
HEAD_METHODS = ("pai", "paint", "vhr", "act", "var")
TWO_BRANCH = ("vcd", "m3id", "avisc", "pai+vcd", "var+vcd")
TARGETS = {
    **{name: 1.10 for name in HEAD_METHODS},
    **{name: 1.3 for name in TWO_BRANCH},
    "vista": 1.3,
}
OPERA_TARGET = 1.5  # OPERA (eager) against compiled beam search with the same beams
SPEEDUP_TARGET = 3.0  # compiled vanilla against eager vanilla, batch 1
KEY_METHODS = ["pai", "vcd", "vista", "opera"]
OTHER_METHODS = ["paint", "vhr", "act", "var", "m3id", "avisc", "vaf", "deco", "memvr", "pai+vcd"]


def default_plan(llava: str = "llava-1.5-7b", qwen: str = "qwen2.5-vl-7b") -> list[str]:
    """Most important first: LLaVA batch 1 vanilla eager vs compiled, one stack of each kind, the eager
    cost of the other methods, POPE throughput, Qwen2.5-VL vanilla, batch 8, then everything else."""
    plan = [f"{llava}:1:vanilla", *(f"{llava}:1:{m}" for m in KEY_METHODS)]
    plan += [f"{llava}:1:{m}:eager" for m in OTHER_METHODS]
    plan += [f"pope:{llava}", f"{qwen}:1:vanilla", f"{llava}:8:vanilla"]
    plan += [f"{llava}:1:{m}:compiled" for m in OTHER_METHODS]
    plan += [f"{llava}:8:{m}" for m in KEY_METHODS + OTHER_METHODS]
    qwen_methods = [m for m in KEY_METHODS + OTHER_METHODS if m != "paint"]  # PAINT: LLaVA only
    plan += [f"{qwen}:1:{m}" for m in qwen_methods]
    plan += [f"{qwen}:8:{m}" for m in ["vanilla", *qwen_methods]]
    return plan


class BudgetExceeded(BaseException):
    """The plan's deadline passed (raised from an alarm signal, wherever the run was)."""


def short_name(text: str, beams: int) -> str:
    """``vanilla``, ``beam5``, ``pai``, ``var+vcd``, ``opera``, ``opera-fast`` for a STACKS entry."""
    if text == "vanilla":
        return "vanilla" if beams == 1 else f"beam{beams}"
    name = "+".join(part.split(":")[0] for part in text.split("+"))
    return name + ("-fast" if "preset=fast" in text else "")


def find_stack(model_name: str, name: str) -> tuple[str, int]:
    for text, beams in STACKS[model_name]:
        if short_name(text, beams) == name:
            return text, beams
    known = ", ".join(short_name(t, b) for t, b in STACKS[model_name])
    raise ValueError(f"no stack {name!r} for {model_name}; known: {known}")


def own_loop(text: str) -> bool:
    """Whether the stack runs its own generation loop (OPERA), which stays eager."""
    return any(part.split(":")[0] == "opera" for part in text.split("+"))


@dataclass(frozen=True)
class Config:
    stack: str  # the STACKS text
    beams: int
    compiled: bool

    @property
    def label(self) -> str:
        return f"{short_name(self.stack, self.beams)} {'compiled' if self.compiled else 'eager'}"


@dataclass
class Item:
    kind: str  # "stack" or "pope"
    model: str
    batch: int = 1
    stack: str = ""
    modes: tuple[str, ...] = ("eager", "compiled")

    @property
    def label(self) -> str:
        if self.kind == "pope":
            return f"pope:{self.model}"
        suffix = "" if len(self.modes) == 2 else f":{self.modes[0]}"
        return f"{self.model}:{self.batch}:{self.stack}{suffix}"


def parse_plan(entries: list[str], smoke: bool = False) -> list[Item]:
    """Plan entries as items; ``smoke`` replaces each real-size model by its tiny stand-in."""
    items = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        parts = entry.split(":")
        if parts[0] == "pope" and len(parts) == 2:
            model = SMOKE_MODELS.get(parts[1], parts[1]) if smoke else parts[1]
            items.append(Item("pope", model))
            continue
        if len(parts) not in (3, 4) or not parts[1].isdigit():
            raise ValueError(
                f"plan entry {entry!r}: expected MODEL:BATCH:STACK[:eager|:compiled] or pope:MODEL"
            )
        model = SMOKE_MODELS.get(parts[0], parts[0]) if smoke else parts[0]
        if model not in MODELS:
            raise ValueError(f"plan entry {entry!r}: unknown model {model!r}; known: {', '.join(MODELS)}")
        find_stack(model, parts[2])
        modes = ("eager", "compiled") if len(parts) == 3 else (parts[3],)
        if any(m not in ("eager", "compiled") for m in modes):
            raise ValueError(f"plan entry {entry!r}: the mode is eager or compiled")
        items.append(Item("stack", model, int(parts[1]), parts[2], modes))
    return items


def item_configs(item: Item) -> tuple[list[Config], list[Config]]:
    """The item's own configurations and its references (vanilla with the same beams, each mode measured)."""
    text, beams = find_stack(item.model, item.stack)
    eager, compiled = "eager" in item.modes, "compiled" in item.modes
    if text == "vanilla":
        return [Config(text, beams, False)] * eager + [Config(text, beams, True)] * compiled, []
    if own_loop(text):  # OPERA stays eager; its reference is beam search, eager and compiled
        refs = [Config("vanilla", beams, False)] * eager + [Config("vanilla", beams, True)] * compiled
        return [Config(text, beams, False)], refs
    own = [Config(text, beams, False)] * eager + [Config(text, beams, True)] * compiled
    refs = [Config("vanilla", beams, False)] * eager + [Config("vanilla", beams, True)] * compiled
    return own, refs


@dataclass
class Settings:
    device: str
    tokens: int
    rounds: int = 2
    compiled_calls: int = 2  # timed calls per round of a compiled configuration (the fastest counts)
    deadline: float | None = None  # time.time() after which nothing starts; an alarm stops what runs
    margin_s: float = 15.0  # kept free before the deadline for the summary
    compile_backend: str = "inductor"
    pope_questions: int = 200
    pope_tokens: int = 8
    pope_batch: int = 8


@dataclass
class Budget:
    """What things cost so far, to decide what still fits before the deadline."""

    settings: Settings
    compile_s: list[float] = field(default_factory=list)
    call_s: dict[tuple, float] = field(default_factory=dict)
    build_s: dict[str, float] = field(default_factory=dict)
    compiled_now: set = field(default_factory=set)  # compiled since the last dynamo reset

    def left(self) -> float:
        if self.settings.deadline is None:
            return float("inf")
        return self.settings.deadline - self.settings.margin_s - time.time()

    def compile_estimate(self) -> float:
        """The first compilation of a process pays for cold caches (kernels, the compile workers): later
        ones are estimated from the later ones seen, with a margin."""
        seen = [s for s in self.compile_s if s > 0.5]
        if len(seen) >= 2:
            return 1.25 * max(seen[1:])
        if seen:
            return 1.25 * seen[0]
        return 150.0 if self.settings.device == "cuda" else 60.0

    def call_estimate(self, model: str, batch: int, config: Config) -> float:
        key = (model, batch, config)
        if key in self.call_s:
            return self.call_s[key]
        factor = 4.0 if own_loop(config.stack) else (1.0 if config.stack == "vanilla" else 2.5)
        for ref in (Config("vanilla", config.beams, config.compiled), Config("vanilla", 1, False)):
            if (model, batch, ref) in self.call_s:
                return factor * self.call_s[(model, batch, ref)]
        for (m, b, ref), seconds in self.call_s.items():
            if m == model and ref == Config("vanilla", 1, False):
                return factor * seconds * max(1.0, batch / b / 2)
        return factor * (3.0 if self.settings.device == "cuda" else 1.0)

    def config_estimate(self, model: str, batch: int, config: Config) -> float:
        s = self.settings
        call = self.call_estimate(model, batch, config)
        # transformers' beam search never compiles its forward (generation/utils.py, _beam_search calls
        # self(**model_inputs)): compile=True with beams is a static cache, no compilation.
        compiles = config.compiled and config.beams == 1 and (model, batch, config) not in self.compiled_now
        warm = call + (self.compile_estimate() if compiles else 0)
        return warm + s.rounds * (s.compiled_calls if config.compiled else 1) * call

    def build_estimate(self, model: str) -> float:
        if model in self.build_s or (model, self.settings.device) in _LOADED:
            return 0.0
        return 90.0 if model in GPU_ONLY else 5.0


class Report:
    """The Markdown table, written row by row as items finish; raw numbers as JSON lines beside it."""

    COLUMNS = (
        "| model | batch | methods | eager ms/token (r1, r2) | compiled ms/token (r1, r2) | eager x ref | "
        "compiled x ref | compile s | target: value per round | met | notes |"
    )

    def __init__(self, out_dir: Path, header: str):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.md = out_dir / "gpu.md"
        self.raw = out_dir / "gpu.jsonl"
        self.progress = out_dir / "progress.txt"
        self.md.write_text(header, encoding="utf-8")
        self.raw.write_text("", encoding="utf-8")
        self.table_open = False
        self.pope_open = False

    def write(self, text: str) -> None:
        print(text, flush=True)
        with self.md.open("a", encoding="utf-8") as f:
            f.write(text + "\n")

    def row(self, cells: list, record: dict) -> None:
        if not self.table_open:
            self.write("\n" + self.COLUMNS + "\n|" + "---|" * (self.COLUMNS.count("|") - 1))
            self.table_open = True
        self.write("| " + " | ".join(str(c) for c in cells) + " |")
        self.record(record)

    def pope_row(self, cells: list, record: dict) -> None:
        if not self.pope_open:
            self.write(
                "\n`veridical eval pope` throughput (in-process CLI, see pope_gpu.py):\n\n"
                "| model | run | samples | new tokens / sample | generation s | samples / s | notes |\n"
                "|---|---|---|---|---|---|---|"
            )
            self.pope_open = True
            self.table_open = False  # a later stack row starts a new table
        self.write("| " + " | ".join(str(c) for c in cells) + " |")
        self.record(record)

    def record(self, record: dict) -> None:
        import json

        with self.raw.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def mark(self, text: str) -> None:
        self.progress.write_text(f"{time.strftime('%H:%M:%S')} {text}\n", encoding="utf-8")


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def counting_compiled_steps(model):
    """Count the calls of the compiled forward that transformers' generate() makes (it asks the model for
    it, ``get_compiled_call``, once per generate() call) into ``found[0]``; zero: nothing ran compiled."""
    found = [0]
    original = model.get_compiled_call

    def counting(compile_config):
        compiled = original(compile_config)

        def step(*args, **kwargs):
            found[0] += 1
            return compiled(*args, **kwargs)

        return step

    model.get_compiled_call = counting
    try:
        yield found
    finally:
        del model.get_compiled_call


def _timed_generate(model, inputs, config: Config, tokens: int) -> float:
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        veridical.generate(
            model,
            inputs,
            methods=parse_stack(config.stack),
            compile=config.compiled,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            num_beams=config.beams,
        )
    synchronize()
    return time.perf_counter() - start


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}".replace("|", "/")


def _pair(values: list[float | None], digits: int = 2) -> str:
    if not values or all(v is None for v in values):
        return "-"
    return ", ".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def _met(values: list[float | None], ok: Callable[[float], bool]) -> str:
    got = [ok(v) for v in values if v is not None]
    if not got:
        return "-"
    return "yes" if all(got) else ("no" if not any(got) else "mixed")


def run_stack_item(item: Item, settings: Settings, budget: Budget, report: Report) -> str | None:
    """Measure one item; returns why it was skipped (None when it ran)."""
    own, refs = item_configs(item)
    configs = list(dict.fromkeys(own + refs))
    cost = budget.build_estimate(item.model) + sum(
        budget.config_estimate(item.model, item.batch, c) for c in configs
    )
    note = ""
    if cost > budget.left():
        eager_only = [c for c in configs if not c.compiled]
        cost_eager = budget.build_estimate(item.model) + sum(
            budget.config_estimate(item.model, item.batch, c) for c in eager_only
        )
        if not eager_only or not any(c in own for c in eager_only) or cost_eager > budget.left():
            return f"needs about {cost:.0f} s, {max(budget.left(), 0):.0f} s left"
        note = f"compiled skipped: needs about {cost:.0f} s, {budget.left():.0f} s left"
        configs = eager_only
    report.mark(
        f"building {item.model}"
        if (item.model, settings.device) not in _LOADED
        else f"measuring {item.label}"
    )
    if (item.model, settings.device) not in _LOADED:
        start = time.perf_counter()
        load(item.model, settings.device)
        budget.build_s[item.model] = time.perf_counter() - start
        note = "; ".join(filter(None, [f"model built in {budget.build_s[item.model]:.0f} s", note]))
        report.mark(f"measuring {item.label}")
    model, _ = load(item.model, settings.device)
    inputs = model_inputs(item.model, item.batch, settings.device)
    errors: dict[Config, str] = {}
    warm: dict[Config, dict] = {}
    for config in configs:  # warm-up: compilation and first-call costs stay out of the rounds
        graphs = _graphs()
        first = (item.model, item.batch, config) not in budget.compiled_now
        try:
            with counting_compiled_steps(model) as steps:
                seconds = _timed_generate(model, inputs, config, settings.tokens)
        except BudgetExceeded:
            raise
        except Exception as err:  # noqa: BLE001 - one failing configuration must not end the plan
            errors[config] = _one_line(err)
            continue
        warm[config] = {"s": seconds, "graphs": _graphs() - graphs, "first": first, "steps": steps[0]}
        if config.compiled:
            budget.compiled_now.add((item.model, item.batch, config))
    times: dict[Config, list[float]] = {c: [] for c in configs if c not in errors}
    late_graphs = {c: 0 for c in times}
    for _ in range(settings.rounds):
        for config in list(times):
            if config in errors:
                continue
            calls = settings.compiled_calls if config.compiled else 1
            graphs = _graphs()
            try:
                best = min(_timed_generate(model, inputs, config, settings.tokens) for _ in range(calls))
            except BudgetExceeded:
                raise
            except Exception as err:  # noqa: BLE001
                errors[config] = _one_line(err)
                continue
            late_graphs[config] += _graphs() - graphs
            times[config].append(best)
    for config, values in times.items():
        if values and config not in errors:
            budget.call_s[(item.model, item.batch, config)] = statistics.median(values)
            if config.compiled and config in warm:
                budget.compile_s.append(max(0.0, warm[config]["s"] - statistics.median(values)))
    report.row(*_stack_row(item, settings, own, refs, times, warm, errors, late_graphs, note))
    return None


def _stack_row(item, settings, own, refs, times, warm, errors, late_graphs, note):
    tokens = settings.tokens
    ok = {c: v for c, v in times.items() if c not in errors and len(v) == settings.rounds}

    def per_token(config):
        return [1000 * t / tokens for t in ok[config]] if config in ok else []

    def ratio(a, b):
        if a in ok and b in ok:
            return [x / y for x, y in zip(ok[a], ok[b], strict=True)]
        return []

    text, beams = find_stack(item.model, item.stack)
    main_e, main_c = Config(text, beams, False), Config(text, beams, True)
    ref_e, ref_c = Config("vanilla", beams, False), Config("vanilla", beams, True)
    name = short_name(text, beams)
    eager_x, compiled_x = ratio(main_e, ref_e), ratio(main_c, ref_c)
    if text == "vanilla":
        eager_x = compiled_x = []
        speedup = ratio(main_e, main_c)
        target = f"eager / compiled: {_pair(speedup)}" + (" (>= 3)" if beams == 1 and item.batch == 1 else "")
        met = _met(speedup, lambda v: v >= SPEEDUP_TARGET) if beams == 1 and item.batch == 1 else "-"
    elif own_loop(text):
        against = ratio(main_e, ref_c)
        target = f"x compiled beam-{beams}: {_pair(against)} (<= {OPERA_TARGET})"
        met = _met(against, lambda v: v <= OPERA_TARGET)
    else:
        limit = TARGETS.get(name)
        target = f"x compiled vanilla: {_pair(compiled_x)}" + (f" (<= {limit})" if limit else "")
        met = _met(compiled_x, lambda v: v <= limit) if limit else "-"
    compile_cells = []
    for config in dict.fromkeys((ref_c,) if own_loop(text) else (main_c, ref_c)):
        if config not in warm or config not in ok:
            continue
        if config != main_c and not warm[config]["graphs"]:
            continue  # the reference was compiled by an earlier item
        cost = max(0.0, warm[config]["s"] - statistics.median(ok[config]))
        label = "" if config == main_c else "ref "
        graphs = warm[config]["graphs"]
        # No new graph although the compiled step ran: dynamo's guards matched a graph compiled for an
        # earlier stack (e.g. M3ID's step after VCD's: the same rows and operations).
        reused = ", an earlier stack's graph" if not graphs and warm[config]["steps"] else ""
        compile_cells.append(f"{label}{cost:.0f} (+{graphs} graphs{reused})")
    if not own_loop(text) and text != "vanilla" and main_c not in ok:
        target, met = "compiled not measured", "-"
    notes = [note] if note else []
    notes += [f"{c.label} failed: {e}" for c, e in errors.items()]
    notes += [f"{c.label}: +{n} graphs while timed" for c, n in late_graphs.items() if n]
    notes += [
        f"{c.label}: no compiled step ran"
        + (" (transformers' beam search calls the model uncompiled)" if c.beams > 1 else "")
        for c, w in warm.items()
        if c.compiled and not w["steps"]
    ]
    if own_loop(text):
        notes.append(f"eager x ref: x eager beam-{beams}; OPERA's own loop stays eager")
    cells = [
        item.model,
        item.batch,
        name,
        _pair(per_token(main_e), 1),
        _pair(per_token(main_c), 1) if not own_loop(text) else "(eager loop)",
        _pair(eager_x) if text != "vanilla" else ("1" if main_e in ok else "-"),
        _pair(compiled_x) if text != "vanilla" and not own_loop(text) else ("1" if main_c in ok else "-"),
        "; ".join(compile_cells) or "-",
        target,
        met,
        "; ".join(notes) or "",
    ]
    record = {
        "item": item.label,
        "tokens": tokens,
        "times_s": {c.label: v for c, v in times.items()},
        "warmup": {c.label: w for c, w in warm.items()},
        "errors": {c.label: e for c, e in errors.items()},
        "graphs_while_timed": {c.label: n for c, n in late_graphs.items()},
    }
    return cells, record


def dynamo_settings() -> None:
    """Room for every stack's graph in one process, and one static graph per shape.

    Every compiled configuration adds graphs for the same code (the model's ``__call__``): past dynamo's
    recompile limit (8) it would silently run eagerly, so the limits are raised and hitting one fails.
    Without automatic dynamic shapes each configuration gets the static graph it would get alone
    (otherwise which stacks ran before would decide whether a later one gets a dynamic-shape graph).
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    for name, value in (
        ("recompile_limit", 512),
        ("cache_size_limit", 512),
        ("accumulated_recompile_limit", 8192),
        ("accumulated_cache_size_limit", 8192),
        ("fail_on_recompile_limit_hit", True),
        ("automatic_dynamic_shapes", False),
    ):
        if hasattr(cfg, name):
            setattr(cfg, name, value)


def use_compile_backend(backend: str) -> None:
    """Make ``veridical.generate(compile=True)`` (and so ``veridical eval --compile``) compile with
    ``backend``: ``eager`` replays the captured graph with eager kernels (a CPU smoke run without a C++
    build). ``inductor`` keeps veridical's own configuration."""
    if backend == "inductor":
        return
    from transformers import CompileConfig

    import veridical.generation as generation

    def config() -> CompileConfig:
        found = CompileConfig(fullgraph=True, backend=backend, mode=None)
        found._compile_all_devices = True
        return found

    generation.compile_everywhere = config


def _alarm(settings: Settings) -> None:
    import signal

    if settings.deadline is None:
        return

    def stop(signum, frame):
        raise BudgetExceeded()

    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, settings.deadline - settings.margin_s / 2 - time.time()))


def run_plan(items: list[Item], settings: Settings, report: Report) -> list[str]:
    """Measure ``items`` in order until the deadline; returns the lines saying what was skipped."""
    budget = Budget(settings)
    skipped: list[str] = []
    _alarm(settings)
    for index, item in enumerate(items):
        try:
            if item.kind == "pope":
                import pope_gpu

                why = pope_gpu.run_pope_item(item.model, settings, budget, report, load)
            else:
                why = run_stack_item(item, settings, budget, report)
        except BudgetExceeded:
            skipped.append(f"{item.label}: stopped at the deadline while measuring it")
            skipped += [f"{rest.label}: not started (deadline)" for rest in items[index + 1 :]]
            break
        except Exception as err:  # noqa: BLE001 - e.g. a model that cannot be built: go on with the rest
            skipped.append(f"{item.label}: failed: {_one_line(err)}")
            continue
        if why:
            skipped.append(f"{item.label}: skipped, {why}")
    if settings.deadline is not None:
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0)
    return skipped


def plan_header(settings: Settings, command: str) -> str:
    import transformers

    if settings.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = "CPU (smoke run)"
    where += f", torch {torch.__version__}, transformers {transformers.__version__}"
    compiled = (
        "`veridical.generate(..., compile=True)`: static cache, decoding step compiled by transformers "
        "(`CompileConfig(fullgraph=True)`: inductor, mode reduce-overhead = CUDA graphs)"
        if settings.compile_backend == "inductor"
        else f"`veridical.generate(..., compile=True)` with the dynamo backend `{settings.compile_backend}`"
    )
    return (
        "# Eager against compiled decoding, per method (issue 15)\n\n"
        f"`{command}` on {where}. Random weights, float16 on the GPU, sdpa, greedy, {settings.tokens} new "
        f"tokens (`min_new_tokens` = `max_new_tokens`); ms/token = wall time of one generate() call, prefill "
        f"and method setup included, / {settings.tokens}. Compiled: {compiled}; dynamo's recompile limits "
        "raised, automatic dynamic shapes off (each configuration gets its own static graphs). Each item "
        "(one row) warms up every configuration once (compilation, CUDA-graph recording: 'compile s' is "
        f"that call minus a timed one), then times them in {settings.rounds} interleaved rounds: eager one "
        f"call per round, compiled the fastest of {settings.compiled_calls}. Ratios are taken within a "
        "round (one value per round, 'r1, r2'); ref = vanilla with the same beams, measured in the same "
        "rounds (for OPERA: 5-beam search). Targets: compiled vanilla >= 3x faster than eager at batch 1; "
        "against compiled vanilla, head methods <= 1.10, two-branch decoders and VISTA <= 1.3; OPERA <= 1.5x "
        "compiled beam search. 'met': yes / no in every round, mixed otherwise. Items run in order; one "
        "whose estimated time does not fit before the deadline runs eager only or is skipped (listed at the "
        "end).\n"
    )


def plan_main(args: argparse.Namespace) -> None:
    import shlex as _shlex

    device = "cuda" if torch.cuda.is_available() else "cpu"
    entries = default_plan() if args.plan == "default" else args.plan.split(",")
    items = parse_plan(entries, smoke=args.smoke)
    if device == "cpu" and any(i.model in GPU_ONLY for i in items):
        raise SystemExit(
            f"overhead.py: error: {', '.join(sorted({i.model for i in items} & GPU_ONLY))} needs a GPU "
            "(use --smoke on a CPU)"
        )
    deadline = None
    if args.deadline is not None:
        deadline = args.deadline
    elif args.budget_s is not None:
        deadline = time.time() + args.budget_s
    settings = Settings(
        device=device,
        tokens=args.tokens,
        rounds=args.rounds,
        compiled_calls=args.compiled_calls,
        deadline=deadline,
        margin_s=args.margin_s,
        compile_backend=args.compile_backend,
        pope_questions=args.pope_questions,
        pope_tokens=args.pope_tokens,
        pope_batch=args.pope_batch,
    )
    dynamo_settings()
    use_compile_backend(args.compile_backend)
    cache = Path(args.compile_cache) if args.compile_cache else None
    loaded_cache = ""
    if cache is not None and cache.is_file() and args.compile_backend == "inductor":
        try:
            torch.compiler.load_cache_artifacts(cache.read_bytes())
            loaded_cache = f" Compile caches loaded from {cache.name}."
        except Exception as err:  # noqa: BLE001
            loaded_cache = f" Compile caches in {cache.name} not loaded: {_one_line(err)}."
    out_dir = Path(args.out_dir)
    report = Report(out_dir, plan_header(settings, "python " + _shlex.join(sys.argv)) + loaded_cache + "\n")
    started = time.time()
    skipped = run_plan(items, settings, report)
    report.write(f"\nPlan: {len(items)} items, {time.time() - started:.0f} s.")
    if skipped:
        report.write("\nNot measured:\n\n" + "\n".join(f"- {line}" for line in skipped))
    else:
        report.write("\nEvery item of the plan was measured.")
    if args.compile_backend == "inductor" and device == "cuda":
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is not None:
                (out_dir / "compile_cache.bin").write_bytes(saved[0])
                report.write(f"\nCompile caches saved: compile_cache.bin, {len(saved[0]) / 2**20:.1f} MB.")
        except Exception as err:  # noqa: BLE001
            report.write(f"\nCompile caches not saved: {_one_line(err)}")
    report.mark("done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS))
    parser.add_argument("--batch", action="append", type=int)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", help="write the Markdown table here")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="every stack with veridical.generate(compile=True) (OPERA stays eager)",
    )
    parser.add_argument(
        "--stacks", help="only these stacks (short names, comma-separated: vanilla,pai,beam5,opera)"
    )
    plan = parser.add_argument_group("plan mode: eager against compiled, interleaved rounds, a deadline")
    plan.add_argument(
        "--plan", help="'default' or comma-separated MODEL:BATCH:STACK[:eager|:compiled] / pope:MODEL"
    )
    plan.add_argument("--smoke", action="store_true", help="tiny stand-ins for the real-size models (CPU)")
    plan.add_argument("--out-dir", default="overhead-plan", help="gpu.md and gpu.jsonl are written here")
    plan.add_argument("--rounds", type=int, default=2)
    plan.add_argument(
        "--compiled-calls", type=int, default=2, help="timed calls per round, compiled (fastest)"
    )
    plan.add_argument("--budget-s", type=float, help="seconds from now until the deadline")
    plan.add_argument("--deadline", type=float, help="the deadline as a Unix time (overrides --budget-s)")
    plan.add_argument("--margin-s", type=float, default=15.0, help="kept free before the deadline")
    plan.add_argument("--compile-backend", default="inductor", help="dynamo backend (eager: CPU smoke runs)")
    plan.add_argument("--compile-cache", help="load torch.compiler cache artifacts from this file first")
    plan.add_argument("--pope-questions", type=int, default=200)
    plan.add_argument("--pope-tokens", type=int, default=8)
    plan.add_argument("--pope-batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.plan:
        plan_main(args)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = args.model or [
        m for m in ("tiny-llava", "world", "llava-1.5-7b") if device == "cuda" or m not in GPU_ONLY
    ]
    if device == "cpu" and GPU_ONLY & set(models):
        parser.error(f"{', '.join(sorted(GPU_ONLY & set(models)))} needs a GPU (14-17 GB in float16)")
    stacks = args.stacks.split(",") if args.stacks else None
    lines = [
        "| model | batch | beams | methods | ms / token | time x vanilla | peak memory x vanilla |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name in models:
        for batch in args.batch or [1, 8]:
            for label, beams, per_token, ratio, memory in measure(
                model_name, batch, args.tokens, args.repeats, device, compiled=args.compile, stacks=stacks
            ):
                cells = [model_name, batch, beams, label, f"{per_token:.2f}", f"{ratio:.2f}", f"{memory:.2f}"]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
                print(lines[-1], flush=True)
    if args.report:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"
        how = " compiled (`veridical.generate(compile=True)`; OPERA eager)," if args.compile else ""
        header = (
            "# Overhead of each method against vanilla sdpa generate()\n\n"
            f"Generated by `python {shlex.join(sys.argv)}` on {device}:{how} "
            f"{args.tokens} new tokens, greedy, median of {args.repeats} round-robin repeats after a "
            "warm-up; OPERA against beam search with the same beams. Peak memory: tensors allocated during "
            "one generate() call (weights excluded), from the profiler on CPU.\n\n"
        )
        Path(args.report).write_text(header + "\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    # pope_gpu.py imports this module by name: let it find this very module (one model cache, one
    # BudgetExceeded class), not a second copy.
    sys.modules.setdefault("overhead", sys.modules[__name__])
    main()

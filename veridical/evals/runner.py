"""``veridical eval``: run a model with methods over a benchmark, resumably and data-parallel.

Output folder (lmms-eval style; :mod:`veridical.evals.run_folder` says when a re-run resumes it):

- ``config.json``: the run's full resolved setting (model, every hyper-parameter of every method,
  generation settings, data with resolved paths, prompt format, protocol, seed, and the batch size
  when outputs depend on it); a re-run resumes only when it asks exactly the same;
- ``samples.rank<k>.jsonl``: one record per finished sample, appended and fsynced batch by batch, so a
  killed run loses at most the batch in flight (a torn last line is dropped on resume);
- ``parts/``: per process and invocation, its generation time, tokens, samples and peak memory
  (rewritten after every batch, so a killed invocation keeps what it spent on its written batches);
- ``results.json``: metrics, configuration, resolved method hyper-parameters, the evaluation protocol
  (:mod:`veridical.evals.protocols`: name, resolved settings with their citations, what the user
  overrode), versions, seeds, the time of all parts, tokens/s and peak memory, written atomically by
  rank 0 once every sample is done;
- ``.lock``: held by the process writing the folder (a second one is refused, naming the holder).

Data-parallel runs (``torchrun`` or ``accelerate launch``) split the unfinished samples between ranks;
rank 0 gathers every rank's records and scores them, so the result equals a single-process run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

import veridical
from veridical.evals import run_folder
from veridical.evals.io import (
    DataFileError,
    EmptyOutputsError,
    append_records,
    read_jsonl_resilient,
    write_json_atomic,
)
from veridical.evals.protocols import DEFAULT, render_prompt, resolve_run
from veridical.evals.run_folder import IDENTITY_FORMAT, as_values, resolved_path
from veridical.evals.samples import Sample
from veridical.registry import hyperparameters, method_class

#: The default protocol's answer lengths (documented in :mod:`veridical.evals.protocols`).
BENCHMARK_GENERATION = {
    bench: {"max_new_tokens": DEFAULT.benchmarks[bench].settings["max_new_tokens"].value}
    for bench in DEFAULT.benchmarks
}


class Scorer(Protocol):
    def record(self, sample: Sample, output: str) -> dict[str, Any]: ...

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]: ...


@dataclass
class EvalConfig:
    benchmark: str
    model: str
    methods: list[Any]
    data: dict[str, Any]
    generation: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    seed: int = 0
    #: How questions become prompts: ``{"suffix": ..., "template": ...}`` (see ``render_prompt``).
    prompt: dict[str, str] = field(default_factory=dict)
    #: The protocol record written to ``results.json`` (``protocols.resolve_run``); None: not recorded.
    protocol: dict[str, Any] | None = None
    #: Decode with a static cache and a compiled step (``veridical.generate(compile=True)``). How the
    #: tokens are computed, not which: it is not part of :meth:`identity` (a run may resume with or
    #: without it, as across machines), and every part of the run records whether it compiled.
    compile: bool = False

    def identity(self) -> dict[str, Any]:
        """What must match for a re-run to resume an output folder: the full resolved setting.

        Methods with every hyper-parameter filled in, generation settings, prompt format, protocol,
        seed and data, with paths resolved (``./q.json`` and its absolute path are one file). The
        batch size counts when the result depends on it: under sampling or with a method that draws
        random numbers, each batch's seed and noise follow its slice of the samples. ``limit`` does
        not count: a sample's record does not depend on how many follow it, so a run may be extended.
        """
        found: dict[str, Any] = {
            "format": IDENTITY_FORMAT,
            "benchmark": self.benchmark,
            "model": model_identity(self.model),
            "methods": resolved_methods(self.methods),
            "generation": dict(self.generation),
            "prompt": dict(self.prompt),
            "protocol": (self.protocol or {}).get("name", DEFAULT.name),
            "seed": self.seed,
            "data": {
                k: resolved_path(v) if k in PATH_KEYS and isinstance(v, str) and Path(v).exists() else v
                for k, v in self.data.items()
                if k != "limit"
            },
        }
        if batch_dependent(self.generation, self.methods):
            found["batch_size"] = self.batch_size
        return as_values(found)


#: ``data`` entries that may be paths on this machine (compared resolved when they exist).
PATH_KEYS = frozenset({"questions", "images", "gt", "coco_annotations", "synonyms", "world"})


def model_identity(model: str) -> str:
    """A hub id or a shipped model name as given; a local folder as its resolved path."""
    from veridical.evals.world.shipped import WORLD_MODELS

    if model in WORLD_MODELS or not Path(model).exists():
        return model
    return resolved_path(model)


def batch_dependent(generation: dict[str, Any], methods: Sequence[Any]) -> bool:
    """Whether outputs depend on how samples are batched: sampling, or a method drawing random numbers
    (its class says so with ``draws_random_numbers(params) -> bool``)."""
    if generation.get("do_sample"):
        return True
    for spec in resolved_methods(methods):
        draws = getattr(method_class(spec["name"]), "draws_random_numbers", None)
        if draws is not None and draws(spec):
            return True
    return False


def compiles(config: EvalConfig) -> bool:
    """Whether the run's decoding steps are compiled: asked for, and no method runs its own loop (OPERA's
    beam loop stays eager, see :func:`veridical.generate`)."""
    if not config.compile:
        return False
    return not any(
        hasattr(method_class(spec["name"]), "custom_generate") for spec in resolved_methods(config.methods)
    )


def method_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        return spec["name"]
    return getattr(type(spec), "method_name", type(spec).__name__)


def stack_label(methods: Sequence[Any]) -> str:
    """A readable name of a method stack: ``vanilla``, ``vcd``, ``var+vcd(alpha=2.0,contrast=blank)``."""
    parts = []
    for spec in methods:
        if isinstance(spec, dict):
            params = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
            parts.append(f"{spec['name']}({params})" if params else spec["name"])
        else:
            parts.append(method_name(spec))
    return "+".join(parts) or "vanilla"


def resolve_generation(benchmark: str, methods: Sequence[Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Generation settings of the default protocol: the user's overrides, else the first method's
    paper setting, else greedy (see :mod:`veridical.evals.protocols` for named protocols)."""
    return resolve_run(None, benchmark, None, methods, overrides).generation


def benchmark_methods(benchmark: str, methods: Sequence[Any]) -> list[Any]:
    """Methods with their official per-benchmark settings (VISTA's ``lam`` on POPE) where unset."""
    out = []
    for spec in methods:
        if not isinstance(spec, (str, dict)):
            out.append(spec)
            continue
        per_benchmark = getattr(method_class(method_name(spec)), "benchmark_hyperparameters", {})
        defaults = per_benchmark.get(benchmark, {})
        if not defaults:
            out.append(spec)
        elif isinstance(spec, str):
            out.append({"name": spec, **defaults})
        else:
            out.append({"name": spec["name"], **defaults, **{k: v for k, v in spec.items() if k != "name"}})
    return out


def resolved_methods(methods: Sequence[Any]) -> list[dict[str, Any]]:
    """Each method with all its hyper-parameters (defaults filled in), for the results file."""
    out = []
    for spec in methods:
        name = method_name(spec)
        params = dict(hyperparameters(method_class(name)))
        if isinstance(spec, dict):
            params.update({k: v for k, v in spec.items() if k != "name"})
        out.append({"name": name, **params})
    return out


def _state():
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def check_methods(config: EvalConfig, model, processor, samples: Sequence[Sample]) -> None:
    """Build the run's methods on its first batch, as the run will: whatever a method checks against
    the model and the inputs (layers within depth, known sink dimensions, image tokens, padding)
    fails here, before any output is written. Nothing is generated."""
    from veridical.generation import check_stack
    from veridical.registry import build_method

    if not samples:
        raise DataFileError("no samples to run")
    methods = benchmark_methods(config.benchmark, config.methods)
    inputs, _ = batch_inputs(model, processor, samples[: config.batch_size], config.prompt)
    check_stack([build_method(spec, model, inputs) for spec in methods], config.generation)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its message says what was kept."""


def prepare_output(config: EvalConfig, output_dir: str | Path, overwrite: bool = False) -> str:
    """Check, without writing anything, that ``config`` may run into ``output_dir``.

    Returns ``new``, ``resume`` or ``takeover`` (or ``overwrite``); raises a one-line error when the
    folder holds another run or cannot be written. ``run_eval`` checks again under the folder's lock.
    """
    out = Path(output_dir)
    run_folder.check_writable(out)
    if overwrite:
        return "overwrite"
    config = replace(config, methods=benchmark_methods(config.benchmark, config.methods))
    return run_folder.check_resume(out, config.identity())


def run_eval(
    config: EvalConfig,
    model,
    processor,
    samples: Sequence[Sample],
    scorer: Scorer,
    output_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Run (or resume) ``config`` into ``output_dir``; returns the results on rank 0, None elsewhere.

    ``overwrite`` deletes the folder's earlier records and results first (see
    :mod:`veridical.evals.run_folder` for when a folder resumes).
    """
    config = replace(config, methods=benchmark_methods(config.benchmark, config.methods))
    state = _state()
    out = Path(output_dir)
    with run_folder.hold(out) if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            run_folder.open_for_writing(out, config.identity(), overwrite)
        state.wait_for_everyone()
        my_file = out / f"samples.rank{state.process_index}.jsonl"
        done = {r["sample_id"] for r in read_run_records(out, repair=my_file)}
        # Batches are fixed slices of the sample list, whatever the process count or earlier crashes: a
        # batch's padding and its seed (and so any noise or sampling) are then the same in every run.
        indexed = list(enumerate(samples))
        batches = [indexed[i : i + config.batch_size] for i in range(0, len(indexed), config.batch_size)]
        pending = [b for b in batches if any(s.sample_id not in done for _, s in b)]
        with state.split_between_processes(pending) as mine:
            part = _Part(state.process_index, compiled=compiles(config))
            try:
                _generate(
                    config,
                    model,
                    processor,
                    mine,
                    done,
                    scorer,
                    my_file,
                    part,
                    progress and state.is_main_process,
                )
            except KeyboardInterrupt:
                kept = len({r["sample_id"] for r in read_run_records(out)} & {s.sample_id for s in samples})
                raise RunInterrupted(f"{kept} of {len(samples)} samples are kept in {out}") from None
            finally:
                part.save(out)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        records = {r["sample_id"]: r for r in read_run_records(out)}
        missing = [s.sample_id for s in samples if s.sample_id not in records]
        if missing:
            raise DataFileError(f"{len(missing)} samples have no record after the run, e.g. {missing[:3]}")
        ordered = [records[s.sample_id] for s in samples]
        try:
            metrics = scorer.score(ordered)
        except EmptyOutputsError as err:
            raise EmptyOutputsError(
                f"{err}; outputs kept in {out} (after a fix, rerun with --overwrite)"
            ) from None
        results = {
            "benchmark": config.benchmark,
            "metrics": metrics,
            "model": config.model,
            "methods": resolved_methods(config.methods),
            "generation": config.generation,
            **({"protocol": config.protocol} if config.protocol is not None else {}),
            "data": config.data,
            "num_samples": len(samples),
            "seed": config.seed,
            "batch_size": config.batch_size,
            "compile": config.compile,
            "processes": state.num_processes,
            "run": run_summary(out),
            "versions": _versions(),
        }
        write_json_atomic(out / run_folder.RESULTS, results)
        return results


def read_run_records(out: Path, repair: Path | None = None) -> list[dict[str, Any]]:
    """Every finished sample record of the run in ``out``, all ranks."""
    records = []
    for path in sorted(out.glob("samples.rank*.jsonl")):
        records.extend(read_jsonl_resilient(path, repair=path == repair))
    return records


@dataclass
class _Part:
    """What one process generated in one invocation: a run resumed twice has three parts.

    Saved after every batch (one small file per part, replaced atomically), so even a killed part
    keeps the time and tokens of its written batches.
    """

    rank: int
    compiled: bool = False
    started: float = field(default_factory=time.time)
    wall_time_s: float = 0.0
    generated_tokens: int = 0
    samples_generated: int = 0

    def save(self, out: Path) -> None:
        """Write this part into the run's ``parts/`` folder; a part that generated nothing is none."""
        if not self.samples_generated:
            return
        record = {
            **asdict(self),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "wall_time_s": round(self.wall_time_s, 3),
            "peak_memory_mb": _peak_memory_mb(),
            "host_pid": f"{platform.node()}:{os.getpid()}",
        }
        name = f"{self.started:.6f}-rank{self.rank}-{os.getpid()}.json"
        (out / run_folder.PARTS).mkdir(exist_ok=True)
        write_json_atomic(out / run_folder.PARTS / name, record)


def run_summary(out: Path) -> dict[str, Any]:
    """Time and tokens of every part of a run (all processes, all invocations), and the parts.

    ``wall_time_s`` sums the parts' generation time (process-seconds in a data-parallel run), so
    ``tokens_per_s`` is per process.
    """
    files = sorted((out / run_folder.PARTS).glob("*.json"), key=lambda p: float(p.name.split("-")[0]))
    parts = [json.loads(p.read_text(encoding="utf-8")) for p in files]
    wall = sum(p["wall_time_s"] for p in parts)
    tokens = sum(p["generated_tokens"] for p in parts)
    return {
        "wall_time_s": round(wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 and tokens else 0.0,
        "samples_generated": sum(p["samples_generated"] for p in parts),
        "peak_memory_mb": max((p["peak_memory_mb"] for p in parts), default=0.0),
        "parts": parts,
    }


def _generate(
    config: EvalConfig,
    model,
    processor,
    batches: Sequence[Sequence[tuple[int, Sample]]],
    done: set[str],
    scorer: Scorer,
    path: Path,
    part: _Part,
    progress: bool,
) -> None:
    """Run whole ``batches``; write records only for samples not ``done`` (a batch cut by a crash reruns).

    ``part`` counts what was written, also when the loop is interrupted."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    total = sum(1 for batch in batches for _, s in batch if s.sample_id not in done)
    bar = tqdm(total=total, desc=f"{config.benchmark} {config.model}", unit="sample", disable=not progress)
    try:
        for batch in batches:
            inputs, prompts = batch_inputs(model, processor, [s for _, s in batch], config.prompt)
            # Seeding by the first sample's position makes sampling independent of the process split.
            torch.manual_seed(config.seed + batch[0][0])
            with torch.no_grad():
                sequences = veridical.generate(
                    model, inputs, methods=config.methods, compile=config.compile, **config.generation
                )
            generated = sequences[:, inputs["input_ids"].shape[1] :]
            texts = processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
            new_records = [
                {
                    "sample_id": s.sample_id,
                    "prompt": prompt,
                    "output": text.strip(),
                    **scorer.record(s, text.strip()),
                }
                for (_, s), prompt, text in zip(batch, prompts, texts, strict=True)
                if s.sample_id not in done
            ]
            append_records(path, new_records)
            pad = processor.tokenizer.pad_token_id
            part.generated_tokens += int((generated != pad).sum()) if pad is not None else generated.numel()
            part.samples_generated += len(new_records)
            part.wall_time_s = time.perf_counter() - start
            part.save(path.parent)
            bar.update(len(new_records))
            bar.set_postfix(
                samples_per_s=f"{bar.n / part.wall_time_s:.2f}",
                tokens_per_s=f"{part.generated_tokens / part.wall_time_s:.1f}",
            )
    finally:
        bar.close()


def batch_inputs(model, processor, samples: Sequence[Sample], prompt_format: dict[str, str]):
    """The processor's inputs of a batch of samples on the model's device and dtype, and the prompts."""
    prompts = [render_prompt(model, processor, s.question, prompt_format) for s in samples]
    inputs = processor(
        images=[s.load_image() for s in samples], text=prompts, return_tensors="pt", padding=True
    )
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return inputs, prompts


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _versions() -> dict[str, str]:
    import transformers

    return {
        "veridical": veridical.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host_pid": f"{platform.node()}:{os.getpid()}",
    }

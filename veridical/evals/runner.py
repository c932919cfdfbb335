"""``veridical eval``: run a model with methods over a benchmark, resumably and data-parallel.

Output directory (lmms-eval style):

- ``config.json``: what was asked (model, methods, generation settings, data, protocol and prompt
  format); a re-run with the same directory must ask the same, and then resumes;
- ``samples.rank<k>.jsonl``: one record per finished sample, appended and fsynced batch by batch, so a
  killed run loses at most the batch in flight (a torn last line is dropped on resume);
- ``results.json``: metrics, configuration, resolved method hyper-parameters, the evaluation protocol
  (:mod:`veridical.evals.protocols`: name, resolved settings with their citations, what the user
  overrode), versions, seeds, wall time, tokens/s and peak memory, written atomically by rank 0 once
  every sample is done.

Data-parallel runs (``torchrun`` or ``accelerate launch``) split the unfinished samples between ranks;
rank 0 gathers every rank's records and scores them, so the result equals a single-process run.
"""

from __future__ import annotations

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
from veridical.evals.io import DataFileError, append_records, read_jsonl_resilient, write_json_atomic
from veridical.evals.protocols import DEFAULT, render_prompt, resolve_run
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

    def identity(self) -> dict[str, Any]:
        """What must match for a re-run to resume an output directory.

        The protocol counts by name (its effects are in ``generation``, ``methods``, ``prompt`` and
        ``data``); the default protocol and an empty prompt format are left out, so directories
        written before protocols existed still resume.
        """
        found = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "protocol", "prompt")}
        if self.prompt:
            found["prompt"] = dict(self.prompt)
        if self.protocol and self.protocol.get("name") != DEFAULT.name:
            found["protocol"] = self.protocol["name"]
        return found


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


def run_eval(
    config: EvalConfig,
    model,
    processor,
    samples: Sequence[Sample],
    scorer: Scorer,
    output_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Run (or resume) ``config`` into ``output_dir``; returns the results on rank 0, None elsewhere."""
    config = replace(config, methods=benchmark_methods(config.benchmark, config.methods))
    state = _state()
    out = Path(output_dir)
    config_file = out / "config.json"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        identity = config.identity()
        if config_file.exists():
            previous = json.loads(config_file.read_text(encoding="utf-8"))
            if previous != identity:
                diff = sorted(k for k in identity if previous.get(k) != identity[k])
                raise DataFileError(
                    f"{out} holds a run with other settings ({', '.join(diff)}); "
                    "use another --output to start a new run"
                )
        else:
            write_json_atomic(config_file, identity)
    state.wait_for_everyone()

    my_file = out / f"samples.rank{state.process_index}.jsonl"
    done = {r["sample_id"] for r in read_run_records(out, repair=my_file)}
    # Batches are fixed slices of the sample list, whatever the process count or earlier crashes: a
    # batch's padding and its seed (and so any noise or sampling) are then the same in every run.
    indexed = list(enumerate(samples))
    batches = [indexed[i : i + config.batch_size] for i in range(0, len(indexed), config.batch_size)]
    pending = [b for b in batches if any(s.sample_id not in done for _, s in b)]
    with state.split_between_processes(pending) as mine:
        stats = _generate(
            config, model, processor, mine, done, scorer, my_file, progress and state.is_main_process
        )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    records = {r["sample_id"]: r for r in read_run_records(out)}
    missing = [s.sample_id for s in samples if s.sample_id not in records]
    if missing:
        raise DataFileError(f"{len(missing)} samples have no record after the run, e.g. {missing[:3]}")
    ordered = [records[s.sample_id] for s in samples]
    results = {
        "benchmark": config.benchmark,
        "metrics": scorer.score(ordered),
        "model": config.model,
        "methods": resolved_methods(config.methods),
        "generation": config.generation,
        **({"protocol": config.protocol} if config.protocol is not None else {}),
        "data": config.data,
        "num_samples": len(samples),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "processes": state.num_processes,
        "run": stats,
        "versions": _versions(),
    }
    write_json_atomic(out / "results.json", results)
    return results


def read_run_records(out: Path, repair: Path | None = None) -> list[dict[str, Any]]:
    """Every finished sample record of the run in ``out``, all ranks."""
    records = []
    for path in sorted(out.glob("samples.rank*.jsonl")):
        records.extend(read_jsonl_resilient(path, repair=path == repair))
    return records


def _generate(
    config: EvalConfig,
    model,
    processor,
    batches: Sequence[Sequence[tuple[int, Sample]]],
    done: set[str],
    scorer: Scorer,
    path: Path,
    progress: bool,
) -> dict[str, Any]:
    """Run whole ``batches``; write records only for samples not ``done`` (a batch cut by a crash reruns)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    start, new_tokens, written = time.perf_counter(), 0, 0
    total = sum(1 for batch in batches for _, s in batch if s.sample_id not in done)
    bar = tqdm(total=total, desc=f"{config.benchmark} {config.model}", unit="sample", disable=not progress)
    for batch in batches:
        prompts = [render_prompt(model, processor, s.question, config.prompt) for _, s in batch]
        inputs = processor(
            images=[s.load_image() for _, s in batch], text=prompts, return_tensors="pt", padding=True
        )
        inputs = {
            k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()
        }
        # Seeding by the first sample's position makes sampling independent of the process split.
        torch.manual_seed(config.seed + batch[0][0])
        with torch.no_grad():
            sequences = veridical.generate(model, inputs, methods=config.methods, **config.generation)
        generated = sequences[:, inputs["input_ids"].shape[1] :]
        pad = processor.tokenizer.pad_token_id
        new_tokens += int((generated != pad).sum()) if pad is not None else generated.numel()
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
        written += len(new_records)
        bar.update(len(new_records))
        elapsed = time.perf_counter() - start
        bar.set_postfix(samples_per_s=f"{bar.n / elapsed:.2f}", tokens_per_s=f"{new_tokens / elapsed:.1f}")
    bar.close()
    wall = time.perf_counter() - start
    return {
        "wall_time_s": round(wall, 3),
        "generated_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / wall, 2) if wall > 0 and new_tokens else 0.0,
        "samples_generated": written,
        "peak_memory_mb": _peak_memory_mb(),
    }


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

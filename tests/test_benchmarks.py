"""Fast CPU checks of the GPU benchmark's code paths (benchmarks/gpu.sh, overhead.py --plan, pope_gpu.py)
and of the real-size Qwen2.5-VL-7B builder.

The benchmark itself runs on a lent GPU; here every path it takes runs at tiny size: an item measured
eager and compiled (dynamo's ``eager`` backend: the graph is captured as on the GPU, replayed without a
C++ build), OPERA against beam search, the deadline that skips or stops items, and ``veridical eval pope``
through the CLI with a model built in the process. Expectations come from outside the benchmark code:
transformers' generation code (beam search never compiles its forward), dynamo's graph counter, the
published size of Qwen2.5-VL-7B, and the CLI's own results file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo

import veridical.generation
from veridical.adapters import get_adapter
from veridical.tiny import full_size_qwen2_5_vl, random_images

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import overhead  # noqa: E402
import pope_gpu  # noqa: E402

DYNAMO_SETTINGS = (
    "recompile_limit",
    "cache_size_limit",
    "accumulated_recompile_limit",
    "accumulated_cache_size_limit",
    "fail_on_recompile_limit_hit",
    "automatic_dynamic_shapes",
)


@pytest.fixture
def plan_process(monkeypatch):
    """overhead.py's process-wide settings for a plan, undone afterwards (dynamo limits, the compile
    backend veridical.generate(compile=True) uses)."""
    cfg = torch._dynamo.config
    # Not monkeypatch: its undo deletes the entry of torch's config module when it cannot tell it existed.
    saved = {name: getattr(cfg, name) for name in DYNAMO_SETTINGS if hasattr(cfg, name)}
    monkeypatch.setattr(veridical.generation, "compile_everywhere", veridical.generation.compile_everywhere)
    torch._dynamo.reset()
    overhead.dynamo_settings()
    overhead.use_compile_backend("eager")
    yield
    for name, value in saved.items():
        setattr(cfg, name, value)
    torch._dynamo.reset()


def _settings(**kwargs) -> overhead.Settings:
    base = dict(device="cpu", tokens=2, rounds=1, compiled_calls=1, compile_backend="eager")
    return overhead.Settings(**{**base, **kwargs})


def _rows(report: overhead.Report) -> list[list[str]]:
    lines = [line for line in report.md.read_text().splitlines() if line.startswith("| tiny")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_items_are_measured_eager_and_compiled_with_their_reference(plan_process, tmp_path, monkeypatch):
    """Vanilla eager against compiled, and OPERA against beam search eager and compiled (a method with a
    reference; the full plan, every method included, runs in ``GPU_SMOKE=1 bash benchmarks/gpu.sh``)."""
    calls = []
    real_generate = overhead.veridical.generate

    def generate(model, inputs, methods, compile, **kwargs):
        names = tuple(m["name"] if isinstance(m, dict) else m for m in methods)
        calls.append((names, compile, kwargs["num_beams"], kwargs["max_new_tokens"]))
        return real_generate(model, inputs, methods, compile=compile, **kwargs)

    monkeypatch.setattr(overhead.veridical, "generate", generate)
    settings = _settings()
    report = overhead.Report(tmp_path, "# test\n")
    budget = overhead.Budget(settings)
    items = overhead.parse_plan(["llava-1.5-7b:1:vanilla", "llava-1.5-7b:1:opera"], smoke=True)
    for item in items:
        assert overhead.run_stack_item(item, settings, budget, report) is None
    # Each configuration: a warm-up and one timed call (one round, one call), 2 new tokens.
    assert sorted(set(calls)) == [
        ((), False, 1, 2),
        ((), False, 5, 2),
        ((), True, 1, 2),
        ((), True, 5, 2),
        (("opera",), False, 5, 2),
    ]
    assert len(calls) == 2 * 5
    vanilla, opera = _rows(report)
    # model, batch, methods, eager ms, compiled ms, eager x ref, compiled x ref, compile s, target, met, notes
    assert vanilla[:3] == ["tiny-llava", "1", "vanilla"]
    assert float(vanilla[3]) > 0 and float(vanilla[4]) > 0  # one round: one value each
    assert vanilla[7].endswith("(+1 graphs)")  # dynamo's own counter: the compiled call made its graph
    assert vanilla[8].startswith("eager / compiled: ") and vanilla[8].endswith("(>= 3)")
    assert opera[2] == "opera" and opera[4] == "(eager loop)" and float(opera[5]) > 0
    assert opera[8].startswith("x compiled beam-5: ") and opera[8].endswith("(<= 1.5)")
    # transformers' _beam_search calls self(**model_inputs), never the compiled forward (generation/
    # utils.py, 5.24): the compiled beam-search reference runs no compiled step, and the row says so.
    assert "beam5 compiled: no compiled step ran (transformers' beam search" in opera[10]
    assert "no compiled step" not in vanilla[10]
    records = [json.loads(line) for line in report.raw.read_text().splitlines()]
    assert [r["item"] for r in records] == [i.label for i in items]
    times = records[1]["times_s"]
    assert set(times) == {"opera eager", "beam5 eager", "beam5 compiled"}
    # Each ratio is taken within a round: OPERA's time over beam search's in that round.
    ratio = times["opera eager"][0] / times["beam5 compiled"][0]
    assert float(opera[8].split(": ")[1].split(" ")[0]) == pytest.approx(ratio, abs=0.006)


def test_items_that_do_not_fit_are_skipped_and_listed(tmp_path):
    settings = _settings(deadline=time.time() + 3, margin_s=0)
    report = overhead.Report(tmp_path, "# test\n")
    items = overhead.parse_plan(["llava-1.5-7b:1:vcd", "pope:llava-1.5-7b"], smoke=True)
    skipped = overhead.run_plan(items, settings, report)
    # Nothing measured yet: the estimates are the priors (a compilation 60 s on a CPU), beyond 3 s.
    assert skipped[0].startswith("tiny-llava:1:vcd: skipped, needs about")
    assert skipped[1].startswith("pope:tiny-llava: skipped, needs about")
    assert not _rows(report)


def test_an_item_that_overruns_is_stopped_at_the_deadline(tmp_path, monkeypatch):
    def slow(item, settings, budget, report):
        time.sleep(30)

    monkeypatch.setattr(overhead, "run_stack_item", slow)
    settings = _settings(deadline=time.time() + 2, margin_s=0)
    start = time.time()
    skipped = overhead.run_plan(
        overhead.parse_plan(["llava-1.5-7b:1:vanilla", "llava-1.5-7b:8:pai"], True),
        settings,
        overhead.Report(tmp_path, ""),
    )
    assert time.time() - start < 5
    assert skipped == [
        "tiny-llava:1:vanilla: stopped at the deadline while measuring it",
        "tiny-llava:8:pai: not started (deadline)",
    ]


def test_plan_entries_are_checked():
    assert len(overhead.parse_plan(overhead.default_plan())) == len(overhead.default_plan())
    with pytest.raises(ValueError, match="no stack 'dola' for tiny-llava; known: vanilla, pai"):
        overhead.parse_plan(["llava-1.5-7b:1:dola"], smoke=True)
    with pytest.raises(ValueError, match="expected MODEL:BATCH:STACK"):
        overhead.parse_plan(["llava-1.5-7b:pai"])


def test_pope_throughput_runs_the_cli_eager_and_compiled(plan_process, tmp_path):
    settings = _settings(pope_questions=4, pope_batch=4, pope_tokens=2)  # one batch: one graph
    report = overhead.Report(tmp_path / "out", "# test\n")
    runs = []
    real = pope_gpu.pope_run

    def keep(*args, **kwargs):
        runs.append(args[4])  # the run folder
        return real(*args, **kwargs)

    pope_gpu.pope_run = keep
    try:
        assert (
            pope_gpu.run_pope_item("tiny-llava", settings, overhead.Budget(settings), report, overhead.load)
            is None
        )
    finally:
        pope_gpu.pope_run = real
    rows = _rows(report)
    assert [r[1] for r in rows] == ["eager", "compiled, first run", "compiled again"]
    for row, folder in zip(rows, runs, strict=True):
        results = json.loads((folder / "results.json").read_text())  # written by the CLI itself
        assert results["num_samples"] == 4 and int(row[2]) == 4
        assert float(row[5]) == pytest.approx(4 / results["run"]["wall_time_s"], rel=0.01)
    assert [json.loads((f / "results.json").read_text())["compile"] for f in runs] == [False, True, True]


def test_full_size_qwen2_5_vl_has_the_shapes_of_qwen2_5_vl_7b():
    """Built on the meta device: the released model's size and 576 image tokens for a 672x672 image."""
    model, processor = full_size_qwen2_5_vl(device="meta")
    adapter = get_adapter(model)
    assert (adapter.num_layers, adapter.num_heads, adapter.text_config.hidden_size) == (28, 28, 3584)
    assert adapter.text_config.num_key_value_heads == 4
    # Qwen/Qwen2.5-VL-7B-Instruct's safetensors hold 8,292,166,656 parameters (the model card's 8.29 B).
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656
    vision = model.config.vision_config
    assert (vision.depth, vision.hidden_size, vision.window_size) == (32, 1280, 112)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=random_images(1, sizes=((672, 672),)), text=[text], return_tensors="pt")
    # 672 / 14 = 48 patches a side, merged 2x2: 24 x 24 tokens.
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576


def test_shortened_full_size_qwen2_5_vl_generates_on_cpu():
    model, processor = full_size_qwen2_5_vl(
        dtype=torch.float32, text_layers=1, vision_layers=2, vocab_size=2048
    )
    assert len(processor.tokenizer) == 2048  # every id the model can emit decodes to a word
    assert list(model.config.vision_config.fullatt_block_indexes) == [1]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=random_images(1, sizes=((112, 112),)), text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16  # (112 / 14 / 2) ** 2
    out = veridical.generate(model, inputs, [], max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 2)
    assert processor.tokenizer.decode(out[0, -2:]).strip()


def test_gpu_script_refuses_to_run_without_out():
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_SMOKE")}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == "benchmarks/gpu.sh: error: OUT is not set (the folder whose files come back from the machine)"
    )

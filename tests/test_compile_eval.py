"""Compiled decoding in long runs (issue 15): ``veridical eval --compile``, sweeps, and many batches.

An eval calls ``generate()`` once per batch, with prompts whose padded length changes from batch to
batch. transformers keeps one static cache length per model (the longest so far,
``_prepare_static_cache`` in generation/utils.py), and dynamo makes a size dynamic after its first
change (``automatic_dynamic_shapes``): a faithful method adds no graph per prompt length. A method
that turns a size into a Python value (a dictionary key, say) compiles one graph per length and, with
``fullgraph=True``, fails after ``torch._dynamo.config.recompile_limit`` (8) lengths.

Expectations come from the eager runs of the same commands and from dynamo's own counters. The
``eager`` dynamo backend checks the capture without a C++ build (inductor is exercised in
``tests/test_compile_decoders.py``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo
from test_eval_cli import pope_args
from torch._dynamo.utils import counters
from transformers import CompileConfig

import veridical
import veridical.generation
from veridical.cli import main
from veridical.errors import MethodSpecError
from veridical.evals.sweep import SweepError, cell_request, load_sweep
from veridical.tiny import tiny_inputs, tiny_model

WORDS = "what is in this picture please tell me about the colors".split()


def _eager_backend() -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True
    return config


@pytest.fixture
def eager_compile(monkeypatch):
    """``compile=True`` with dynamo's eager backend, counters and compiled frames reset."""
    monkeypatch.setattr(veridical.generation, "compile_everywhere", _eager_backend)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_model("llava")
    return model.eval(), processor


@pytest.mark.parametrize("method", ["pai", "vcd", {"name": "var", "sink_dims": [0, 1, 2, 3], "tau": 2.0}])
def test_a_new_prompt_length_compiles_at_most_once(llava, eager_compile, method):
    # Five calls, each with a longer first prompt (so a longer static cache): the first compiles, the
    # second recompiles with the length dynamic, the others reuse it. PAI once keyed a per-forward
    # memo by the key count, so each length compiled anew.
    model, processor = llava
    model.__dict__.pop("_previous_max_cache_length", None)  # transformers' longest cache of earlier tests
    for n in range(3, 8):
        inputs = tiny_inputs("llava", processor, [" ".join(WORDS[:n]), "what is this"])
        veridical.generate(
            model, inputs, [method], compile=True, max_new_tokens=3, min_new_tokens=3, do_sample=False
        )
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]


def _records(out):
    lines = (out / "samples.rank0.jsonl").read_text().splitlines()
    return {r["sample_id"]: r["output"] for r in map(json.loads, lines)}


def test_eval_compile_writes_the_eager_records_and_says_it_compiled(
    model_dir, dataset, tmp_path, eager_compile, capsys
):
    assert main(pope_args(model_dir, dataset, tmp_path / "eager", "--method", "vcd")) == 0
    # Started eagerly on the first batch, finished compiled: compiling is how, not what, so the run
    # resumes, and each part records how it ran.
    out = tmp_path / "mixed"
    assert main(pope_args(model_dir, dataset, out, "--method", "vcd", "--limit", "8")) == 0
    assert main(pope_args(model_dir, dataset, out, "--method", "vcd", "--compile")) == 0
    printed = capsys.readouterr().out
    assert "(resuming)" in printed
    assert "compiled decoding: static cache" in printed
    eager = _records(tmp_path / "eager")
    assert len(eager) == 24
    assert _records(out) == eager
    results = json.loads((out / "results.json").read_text())
    assert results["compile"] is True
    assert [part["compiled"] for part in results["run"]["parts"]] == [False, True]
    assert [part["samples_generated"] for part in results["run"]["parts"]] == [8, 16]
    # Two batches of 8 prompts of one length: one graph, no break.
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_eval_compile_runs_opera_eagerly_and_records_it(model_dir, dataset, tmp_path, eager_compile, capsys):
    args = ("--method", "opera", "--limit", "2", "--batch-size", "2")
    assert main(pope_args(model_dir, dataset, tmp_path / "eager", *args)) == 0
    assert main(pope_args(model_dir, dataset, tmp_path / "compiled", *args, "--compile")) == 0
    assert "compiled decoding not used: OPERA runs its own eager beam loop" in capsys.readouterr().out
    assert _records(tmp_path / "compiled") == _records(tmp_path / "eager")
    results = json.loads((tmp_path / "compiled" / "results.json").read_text())
    assert [part["compiled"] for part in results["run"]["parts"]] == [False]
    assert counters["stats"]["unique_graphs"] == 0


def test_generate_compile_leaves_opera_eager_and_refuses_a_static_cache_for_it(llava):
    model, processor = llava
    inputs = tiny_inputs("llava", processor, ["what is this", "describe the image in detail please"])
    kwargs = dict(max_new_tokens=4, num_beams=3, do_sample=False)
    eager = veridical.generate(model, inputs, ["opera"], **kwargs)
    assert torch.equal(veridical.generate(model, inputs, ["opera"], compile=True, **kwargs), eager)
    with pytest.raises(MethodSpecError, match="OPERA runs its own eager beam loop"):
        veridical.generate(model, inputs, ["opera"], cache_implementation="static", **kwargs)


def test_sweep_compile_reaches_every_cell(tmp_path):
    path = tmp_path / "s.yaml"
    head = "models: [m]\nbenchmarks: {pope: {questions: q.json}}\n"
    path.write_text(head + "methods: [[], vcd]\ncompile: true\n")
    settings, cells = load_sweep(path)
    assert all(cell_request(settings, cell, tmp_path).compile for cell in cells)
    path.write_text(head + "methods: [[]]\ncompile: yes please\n")
    with pytest.raises(SweepError, match="'compile' must be true or false"):
        load_sweep(path)
    path.write_text(head + "methods: [[]]\n")
    settings, cells = load_sweep(path)
    assert not cell_request(settings, cells[0], tmp_path).compile


def test_sweep_compile_flag_reaches_the_cells_runs(model_dir, dataset, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"models: [{model_dir}]\n"
        f"benchmarks: {{pope: {{questions: {dataset / 'pope.json'}, images: {dataset}}}}}\n"
        "methods: [[], vcd]\ngeneration: {max_new_tokens: 2}\n"
    )
    assert main(["sweep", str(path), "--output", str(tmp_path / "out"), "--dry-run", "--compile"]) == 0
    assert capsys.readouterr().out.count("compiled decoding: static cache") == 2

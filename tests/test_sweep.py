import csv
import json

import pytest

from veridical.cli import main
from veridical.evals.sweep import SweepError, load_sweep


def write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_grid_expands_into_cells(tmp_path):
    _, cells = load_sweep(
        write(
            tmp_path,
            """
models: [m1, m2]
benchmarks: {pope: {images: x, pope_set: coco/random}}
methods:
  - []
  - {name: vcd, grid: {alpha: [0.5, 1.0], contrast: [noise, blank]}}
""",
        )
    )
    assert len(cells) == 2 * (1 + 4)
    assert cells[0].methods == [] and cells[0].name == "m1__pope__vanilla"
    assert cells[1].methods == [{"name": "vcd", "alpha": 0.5, "contrast": "noise"}]
    assert len({c.name for c in cells}) == len(cells)


@pytest.mark.parametrize(
    "text, message",
    [
        ("models: [m]\nbenchmarks: {pope: {}}\nmethods:\n  - vcd\n  - {name: vcd, alpah: 1}\n", "line 5"),
        ("models: [m]\nbenchmarks: {pope: {}}\nmethods: [vdc]\n", "unknown method 'vdc'"),
        ("models: [m]\nbenchmarks: {pope: {imgs: x}}\nmethods: [vcd]\n", "unknown pope option"),
        ("models: [m]\nbenchmarks: {pope: {}}\nmethod: [vcd]\n", "unknown key"),
        ("models: [m]\nbenchmarks: {pope: {}\nmethods: [vcd]\n", "invalid YAML at line"),
        ("models: [m]\nbenchmarks: {vqa: {}}\nmethods: [vcd]\n", "unknown benchmark"),
        ("models: [m]\nbenchmarks: {pope: {}}\nmethods: [vcd]\nprotocol: vdc\n", "unknown protocol 'vdc'"),
        ("models: [m]\nbenchmarks: {pope: {}}\nmethods: [vcd]\nprotocol: [vcd, 2]\n", "protocol name"),
    ],
)
def test_malformed_sweeps_are_rejected_with_the_line(tmp_path, text, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write(tmp_path, text))


def test_sweep_runs_a_2x2_grid_and_skips_finished_cells(model_dir, dataset, tmp_path, capsys):
    config = write(
        tmp_path,
        f"""
name: tiny
models: ["{model_dir}"]
benchmarks:
  pope: {{questions: "{dataset / "pope.json"}", images: "{dataset}", limit: 6}}
methods:
  - {{name: vcd, grid: {{alpha: [0.5, 2.0], contrast: [noise, blank]}}}}
generation: {{max_new_tokens: 2, do_sample: false}}
batch_size: 3
""",
    )
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 4 and all(r["f1"] and r["ms_per_token"] for r in rows)
    assert (out / "summary.png").stat().st_size > 1000
    assert "| model | benchmark | methods |" in (out / "summary.md").read_text()
    results = json.loads(next(out.glob("*alpha=2.0,contrast=blank*/results.json")).read_text())
    assert results["methods"][0]["alpha"] == 2.0 and results["generation"]["do_sample"] is False
    capsys.readouterr()
    assert main(["sweep", str(config), "--output", str(out)]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 4


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        _, cells = load_sweep(path)
        assert cells, path


def failing_sweep(tmp_path, model_dir, dataset):
    """Three cells; the middle one names a layer the tiny model does not have (found only when the
    method meets the model, after the file itself validated)."""
    return write(
        tmp_path,
        f"""
name: partly-bad
models: ["{model_dir}"]
benchmarks:
  pope: {{questions: "{dataset / "pope.json"}", images: "{dataset}", limit: 2}}
methods: [[], {{name: pai, layers: [99]}}, pai]
generation: {{max_new_tokens: 2}}
""",
    )


def test_a_failing_cell_does_not_stop_the_sweep_and_is_marked(model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", str(failing_sweep(tmp_path, model_dir, dataset)), "--output", str(out)]) == 1
    rows = {r["methods"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["vanilla"]["status"] == rows["pai"]["status"] == "ok"
    assert rows["vanilla"]["f1"] and rows["pai"]["f1"]
    failed = rows["pai(layers=[99])"]
    assert failed["status"].startswith("failed:") and "99" in failed["status"] and not failed["f1"]
    assert "1 of 3 cells failed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        f"{model_dir.name}__pope__pai",
        f"{model_dir.name}__pope__vanilla",
    ]  # the failed cell left no folder


def test_dry_run_checks_each_cell_against_its_model_and_writes_nothing(model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["sweep", str(failing_sweep(tmp_path, model_dir, dataset)), "--output", str(out), "--dry-run"])
        == 1
    )
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "99" in printed and printed.count("dry run: every setting checked") == 2
    assert not out.exists()


def test_the_command_line_and_a_bare_request_have_the_same_defaults():
    """A sweep cell and ``veridical eval`` run the same function; options a cell leaves out must take
    the command line's defaults."""
    from veridical.cli import build_parser
    from veridical.evals.commands import eval_request
    from veridical.evals.request import EvalRequest

    args = build_parser().parse_args(["eval", "pope", "--model", "m"])
    assert eval_request(args) == EvalRequest("pope", "m")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("batch_size: 0", "batch_size must be a positive integer, got 0"),
        ("seed: -1", "seed must be a non-negative integer, got -1"),
        ("batch_size: true", "batch_size must be a positive integer, got True"),
        ("rule: yesno", "rule must be one of"),
    ],
)
def test_a_cell_with_a_bad_value_fails_with_one_line(model_dir, dataset, tmp_path, capsys, setting, message):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"models: [{model_dir}]\n"
        f"benchmarks: {{pope: {{questions: {dataset / 'pope.json'}, images: {dataset}}}}}\n"
        f"methods: [[]]\n{setting}\n"
    )
    assert main(["sweep", str(path), "--output", str(tmp_path / "out"), "--dry-run"]) == 1
    assert message in capsys.readouterr().out

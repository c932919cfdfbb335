"""A user's mistake on the command line ends in one ``veridical: error:`` line, never a traceback.

Every case here ended in a traceback, ran something else than asked (``--limit 0`` ran all samples)
or printed argparse's two-line usage before this was fixed.
"""

import pytest

from tests.test_eval_cli import pope_args
from tests.test_run_folder import one_error_line
from veridical.cli import main


def run(argv) -> int:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own exits (--help, usage errors)
        code = exit_.code
    return code


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--limit", "0"], "--limit: must be an integer >= 1, got 0"),
        (["--limit", "-3"], "--limit: must be an integer >= 1, got -3"),
        (["--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
        (["--num-beams", "0"], "--num-beams: must be an integer >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1, got 0"),
        (["--temperature", "nan"], "--temperature: must be a finite number, got nan"),
        (["--seed", "-1"], "--seed: must be an integer >= 0"),
        (["--gen", "max_new_tokens"], "--gen expects KEY=VALUE"),
        (["--gen", "beams=3"], "unknown generate() setting(s) beams"),
        (["--gen", "top_p=1.5"], "top_p must be a finite number in (0, 1]"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--device", "tpu9"], "unknown --device"),
        (["--method", "vcd:alpha=abc"], "alpha"),
        (["--method", "vcd:alpha=inf"], "alpha"),
        (["--method", "m3id:lam=nan"], "lam"),
        (["--protocol", "nonesuch"], "nonesuch"),
    ],
)
def test_bad_eval_options_give_one_line_and_no_folder(model_dir, dataset, tmp_path, capsys, extra, named):
    out = tmp_path / "run"
    assert run(pope_args(model_dir, dataset, out, *extra)) == 2
    assert named in one_error_line(capsys)
    assert not out.exists()


def test_an_output_under_a_file_is_refused_before_the_model_loads(model_dir, dataset, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run(pope_args(model_dir, dataset, blocker / "run")) == 2
    assert "is a file" in one_error_line(capsys)


def test_a_model_that_cannot_be_loaded_offline_says_how_to_get_it(dataset, tmp_path, capsys):
    assert run(pope_args("nonexistent-org/no-such-model", dataset, tmp_path / "o")) == 2
    line = one_error_line(capsys)
    assert "nonexistent-org/no-such-model" in line and "download" in line


def test_a_negative_bootstrap_is_refused(tmp_path, capsys):
    captions = tmp_path / "c.jsonl"
    captions.write_text('{"image_id": 1, "caption": "a dog"}\n')
    gt = tmp_path / "gt.json"
    gt.write_text('{"1": ["dog"]}')
    assert run(["score", "chair", str(captions), "--gt", str(gt), "--bootstrap", "-1"]) == 2
    assert "--bootstrap: must be an integer >= 0, got -1" in one_error_line(capsys)


def test_usage_mistakes_are_one_line_too(capsys):
    assert run(["eval"]) == 2
    assert "the following arguments are required" in one_error_line(capsys)
    assert run(["nonesuch"]) == 2
    assert "invalid choice" in one_error_line(capsys)


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.startswith("veridical 0.")

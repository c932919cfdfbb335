"""An eval's output folder: which re-runs resume it, who may write it, and what its records say.

Each test runs ``veridical eval`` on the tiny saved LLaVA and states the folder's expected contents
from the command lines alone (same sample ids, same outputs, refused or not), never from the
runner's own identity code.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.test_eval_cli import pope_args, records
from veridical.cli import main


def results(out):
    return json.loads((out / "results.json").read_text())


def one_error_line(capsys) -> str:
    """The one ``veridical:`` line of stderr (progress bars of model loading may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("veridical:")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("veridical: error:"), err
    return lines[0]


def test_resuming_a_sampled_run_with_another_batch_size_is_refused(model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = pope_args(model_dir, dataset, out, "--method", "vcd", "--limit", "4")  # VCD samples
    assert main([*args, "--batch-size", "2"]) == 0
    assert main([*args, "--batch-size", "4"]) == 2
    line = one_error_line(capsys)
    assert "batch_size: 2 there, 4 now" in line and "--overwrite" in line
    assert len(records(out)) == 4  # nothing was added by the refused run


def test_a_greedy_run_resumes_with_another_batch_size(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    args = pope_args(model_dir, dataset, out, "--limit", "6")
    assert main([*args, "--batch-size", "3"]) == 0
    lines = (out / "samples.rank0.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.rank0.jsonl").write_text("".join(lines[:3]))
    (out / "results.json").unlink()
    assert main([*args, "--batch-size", "2"]) == 0
    assert [p["samples_generated"] for p in results(out)["run"]["parts"]] == [6, 3]
    ids = [r["sample_id"] for r in records(out)]
    assert len(ids) == len(set(ids)) == 6


def test_a_relative_and_an_absolute_path_of_the_same_file_resume_one_run(
    model_dir, dataset, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    monkeypatch.chdir(dataset)
    relative = pope_args(model_dir, dataset, out, "--limit", "2")
    relative[relative.index("--questions") + 1] = "./pope.json"
    relative[relative.index("--images") + 1] = "."
    assert main(relative) == 0
    (out / "results.json").unlink()
    assert main(pope_args(model_dir, dataset, out, "--limit", "2")) == 0  # absolute paths: resumes
    assert len(records(out)) == 2


def test_a_method_named_with_its_default_values_is_the_same_run(model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--method", "pai")) == 0
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--method", "pai:alpha=0.2")) == 0
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--method", "pai:alpha=0.5")) == 2
    assert "methods:" in one_error_line(capsys)


def test_a_longer_limit_extends_a_run_without_redoing_its_samples(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--batch-size", "2")) == 0
    first = records(out)
    assert main(pope_args(model_dir, dataset, out, "--limit", "4", "--batch-size", "2")) == 0
    assert records(out)[:2] == first and len(records(out)) == 4
    assert results(out)["run"]["samples_generated"] == 4  # 2 in each part


def test_a_second_process_on_a_held_folder_is_refused_with_its_holder(model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from veridical.evals.run_folder import hold\n"
            "with hold(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(pope_args(model_dir, dataset, out, "--limit", "2")) == 2
        line = one_error_line(capsys)
        assert f"in use by pid {holder.pid}" in line and "another --output" in line
        assert not list(out.glob("samples.rank*.jsonl"))
    finally:
        holder.kill()
        holder.wait()
    assert main(pope_args(model_dir, dataset, out, "--limit", "2")) == 0  # the lock died with its holder


def test_a_folder_without_finished_samples_is_taken_over_by_the_corrected_run(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--method", "pai")) == 0
    for path in out.glob("samples.rank*.jsonl"):
        path.write_text("")  # as a run that crashed before its first batch was written
    (out / "results.json").unlink()
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--method", "vcd")) == 0
    assert results(out)["methods"][0]["name"] == "vcd"


def test_overwrite_starts_over_on_purpose(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    assert main(pope_args(model_dir, dataset, out, "--limit", "4")) == 0
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--method", "pai", "--overwrite")) == 0
    assert len(records(out)) == 2 and results(out)["methods"][0]["name"] == "pai"
    assert results(out)["run"]["samples_generated"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "var:layers=[99]"], "layers"),  # found only when the method meets the model
        (["--gen", "nonsense=1"], "unknown generate() setting(s) nonsense"),
        (["--method", "vcd:alpha=nan"], "alpha"),
        (["--method", "opera", "--do-sample"], "OPERA"),
    ],
)
def test_a_mistake_leaves_no_folder_behind(model_dir, dataset, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", *extra)) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_default_folders_name_the_changed_hyper_parameters(model_dir, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = pope_args(model_dir, dataset, "x", "--limit", "2")
    base = base[: base.index("--output")] + base[base.index("--output") + 2 :]
    assert main([*base, "--method", "vcd", "--dry-run"]) == 0
    assert main([*base, "--method", "vcd:contrast=blank,alpha=1.0", "--dry-run"]) == 0
    assert main([*base, "--method", "vcd:contrast=blank", "--dry-run"]) == 0
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    assert main([*base, "--method", "vcd:contrast=blank"]) == 0
    assert main([*base, "--method", "vcd"]) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == [f"pope-{model_dir.name}-vcd", f"pope-{model_dir.name}-vcd-contrast=blank"]


def test_rerunning_a_finished_eval_keeps_its_timing_and_a_resumed_one_adds_its_parts(
    model_dir, dataset, tmp_path
):
    out = tmp_path / "run"
    args = pope_args(model_dir, dataset, out, "--limit", "6", "--batch-size", "2")
    assert main(args) == 0
    first = results(out)["run"]
    assert first["wall_time_s"] > 0 and first["generated_tokens"] > 0 and len(first["parts"]) == 1
    assert main(args) == 0
    assert results(out)["run"] == first  # nothing generated, nothing changed
    lines = (out / "samples.rank0.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.rank0.jsonl").write_text("".join(lines[:2]))
    assert main(args) == 0
    run = results(out)["run"]
    assert [p["samples_generated"] for p in run["parts"]] == [6, 4]
    assert run["samples_generated"] == 10
    assert run["wall_time_s"] == pytest.approx(sum(p["wall_time_s"] for p in run["parts"]), abs=1e-3)
    assert run["generated_tokens"] == sum(p["generated_tokens"] for p in run["parts"])


def test_ctrl_c_keeps_the_finished_batches_and_says_how_to_resume(
    model_dir, dataset, tmp_path, capsys, monkeypatch
):
    import veridical

    out = tmp_path / "run"
    args = pope_args(model_dir, dataset, out, "--limit", "6", "--batch-size", "2")
    real, calls = veridical.generate, []

    def interrupted_after_two_batches(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(veridical, "generate", interrupted_after_two_batches)
    assert main(args) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("veridical:")]
    assert len(err) == 1 and err[0].startswith("veridical: interrupted: 4 of 6 samples are kept in")
    assert err[0].endswith("resume with: veridical " + " ".join(args))
    monkeypatch.setattr(veridical, "generate", real)
    assert main(args) == 0
    assert [p["samples_generated"] for p in results(out)["run"]["parts"]] == [4, 2]


def test_eval_takes_vanilla_and_stacks_as_world_eval_does(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--method", "vhr+vcd:alpha=2")) == 0
    assert [m["name"] for m in results(out)["methods"]] == ["vhr", "vcd"]
    assert results(out)["methods"][1]["alpha"] == 2
    out2 = tmp_path / "vanilla"
    assert main(pope_args(model_dir, dataset, out2, "--limit", "2", "--method", "vanilla")) == 0
    assert results(out2)["methods"] == []


def test_help_version_and_methods_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from veridical.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    main(['methods'])\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "assert 'vcd' in out.getvalue() and 'alpha' in out.getvalue(), out.getvalue()\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    version = subprocess.run([sys.executable, "-m", "veridical", "--version"], capture_output=True, text=True)
    assert version.stdout.strip().startswith("veridical 0.") and version.returncode == 0

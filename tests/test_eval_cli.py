"""End to end: ``veridical eval`` on a tiny saved model and a tiny COCO-format dataset."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from veridical.cli import main


def pope_args(model_dir, dataset, out, *extra):
    return [
        "eval",
        "pope",
        "--model",
        str(model_dir),
        "--questions",
        str(dataset / "pope.json"),
        "--images",
        str(dataset),
        "--output",
        str(out),
        "--max-new-tokens",
        "3",
        "--no-progress",
        *extra,
    ]


def chair_args(model_dir, dataset, out, *extra):
    return [
        "eval",
        "chair",
        "--model",
        str(model_dir),
        "--images",
        str(dataset),
        "--coco-annotations",
        str(dataset),
        "--num-images",
        "5",
        "--output",
        str(out),
        "--max-new-tokens",
        "6",
        "--no-progress",
        *extra,
    ]


def records(out):
    found = []
    for path in sorted(out.glob("samples.rank*.jsonl")):
        found.extend(json.loads(line) for line in path.read_text().splitlines())
    return found


def test_pope_eval_writes_samples_and_results(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    assert (
        main(pope_args(model_dir, dataset, out, "--method", "vcd:alpha=1.5,seed=0", "--batch-size", "4")) == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert results["num_samples"] == 24 and len(records(out)) == 24
    assert results["methods"] == [
        {"name": "vcd", "alpha": 1.5, "beta": 0.1, "noise_step": 500, "contrast": "noise", "seed": 0}
    ]
    assert results["generation"]["do_sample"] is True  # VCD's paper setting
    assert results["generation"]["max_new_tokens"] == 3
    assert results["run"]["tokens_per_s"] > 0 and results["versions"]["veridical"]
    sample = records(out)[0]
    assert {"prompt", "output", "answer", "label", "question_id"} <= set(sample)
    assert sample["prompt"].startswith("USER: <image>")


def test_chair_eval_scores_captions_against_coco_annotations(model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    assert main(chair_args(model_dir, dataset, out, "--batch-size", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) >= {"CHAIRs", "CHAIRi", "Recall", "Len"}
    assert len(records(out)) == 5
    assert all("hallucinated" in r and r["prompt"].endswith("ASSISTANT:") for r in records(out))


def test_interrupted_run_resumes_without_recomputing(model_dir, dataset, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(pope_args(model_dir, dataset, full, "--batch-size", "2")) == 0
    shutil.copytree(full, cut)
    (cut / "results.json").unlink()
    shutil.rmtree(cut / "parts")  # the copied timing is the full run's
    lines = (cut / "samples.rank0.jsonl").read_text().splitlines(keepends=True)
    # Keep 10 finished samples and half of the 11th, as a kill -9 during a write leaves it.
    (cut / "samples.rank0.jsonl").write_text("".join(lines[:10]) + lines[10][:25])
    assert main(pope_args(model_dir, dataset, cut, "--batch-size", "2")) == 0
    resumed = json.loads((cut / "results.json").read_text())
    assert resumed["run"]["samples_generated"] == 14  # the resumed part only
    assert resumed["metrics"] == json.loads((full / "results.json").read_text())["metrics"]
    ids = [r["sample_id"] for r in records(cut)]
    assert len(ids) == len(set(ids)) == 24
    assert sorted(records(cut), key=lambda r: r["sample_id"]) == sorted(
        records(full), key=lambda r: r["sample_id"]
    )


def test_rerun_with_other_settings_is_refused(model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(pope_args(model_dir, dataset, out, "--limit", "2")) == 0
    assert main(pope_args(model_dir, dataset, out, "--limit", "2", "--method", "vcd")) == 2
    assert "other settings" in capsys.readouterr().err


def test_bad_method_and_missing_data_are_rejected_before_loading(dataset, tmp_path, capsys):
    args = pope_args(tmp_path / "no-model", dataset, tmp_path / "o", "--method", "vcd:alhpa=1")
    assert main(args) == 2
    assert "alhpa" in capsys.readouterr().err
    assert main(["eval", "pope", "--model", "x", "--images", str(dataset)]) == 2
    assert "--questions" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
def test_two_processes_give_the_single_process_result(model_dir, dataset, tmp_path):
    """With unseeded VCD noise and batches of 5: the same batches, seeds and noise in both layouts."""
    single, double = tmp_path / "one", tmp_path / "two"
    extra = ("--batch-size", "5", "--method", "vcd")  # 24 samples: halves of 12 would cut batches
    assert main(pope_args(model_dir, dataset, single, *extra)) == 0
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "veridical",
            *pope_args(model_dir, dataset, double, *extra),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    one = json.loads((single / "results.json").read_text())
    two = json.loads((double / "results.json").read_text())
    assert two["processes"] == 2
    assert {p.name for p in double.glob("samples.rank*.jsonl")} == {
        "samples.rank0.jsonl",
        "samples.rank1.jsonl",
    }
    assert two["metrics"] == one["metrics"]
    key = lambda r: r["sample_id"]  # noqa: E731
    assert sorted(records(double), key=key) == sorted(records(single), key=key)


def test_the_world_checkpoints_are_accepted_as_model_names(dataset, tmp_path):
    for name in ("world", "world-noprior"):
        out = tmp_path / name
        assert main(pope_args(name, dataset, out, "--limit", "4")) == 0
        assert json.loads((out / "results.json").read_text())["model"] == name

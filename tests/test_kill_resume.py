"""kill -9 at random points of an eval and of a sweep, then resume: the same results, nothing lost."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_eval_cli import pope_args, records


def run_killed(args: list[str], watch: Path, rng: random.Random, kills: int) -> int:
    """Start ``python -m veridical ARGS`` ``kills`` times, each killed (SIGKILL) soon after ``watch``
    grows; returns how many kills landed while it was still running."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    landed = 0
    for _ in range(kills):
        before = watch_size(watch)
        proc = subprocess.Popen(
            [sys.executable, "-m", "veridical", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and watch_size(watch) <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed += 1
        proc.wait()
    return landed


def watch_size(path: Path) -> int:
    """Bytes of every samples file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("samples.rank*.jsonl")) if path.exists() else 0


def all_lines_are_json(path: Path) -> bool:
    for file in path.rglob("samples.rank*.jsonl"):
        for line in file.read_text().splitlines():
            json.loads(line)
    return True


def test_eval_killed_repeatedly_resumes_to_the_uninterrupted_result(model_dir, dataset, tmp_path):
    from veridical.cli import main

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    # Unseeded VCD noise and batches of 3: only fixed batch boundaries make a resumed run identical.
    args = lambda out: pope_args(model_dir, dataset, out, "--batch-size", "3", "--method", "vcd")  # noqa: E731
    assert main(args(clean)) == 0
    landed = run_killed(args(killed), killed, random.Random(0), kills=3)
    assert landed >= 1, "no kill hit a running eval: the test did not test anything"
    assert not (killed / "results.json").exists() or landed < 3
    assert main(args(killed)) == 0
    assert all_lines_are_json(killed)
    ids = [r["sample_id"] for r in records(killed)]
    assert len(ids) == len(set(ids)) == len(records(clean))
    key = lambda r: r["sample_id"]  # noqa: E731
    assert sorted(records(killed), key=key) == sorted(records(clean), key=key)
    assert (
        json.loads((killed / "results.json").read_text())["metrics"]
        == json.loads((clean / "results.json").read_text())["metrics"]
    )


def test_sweep_killed_repeatedly_resumes_to_the_uninterrupted_result(model_dir, dataset, tmp_path):
    from veridical.cli import main

    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"""
name: killed
models: ["{model_dir}"]
benchmarks:
  pope: {{questions: "{dataset / "pope.json"}", images: "{dataset}", limit: 12}}
methods:
  - []
  - {{name: vcd, grid: {{alpha: [0.5, 2.0]}}, seed: 0}}
generation: {{max_new_tokens: 2, do_sample: false}}
batch_size: 1
"""
    )
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(["sweep", str(config), "--output", str(clean)]) == 0
    landed = run_killed(["sweep", str(config), "--output", str(killed)], killed, random.Random(1), kills=4)
    assert landed >= 1, "no kill hit a running sweep: the test did not test anything"
    assert main(["sweep", str(config), "--output", str(killed)]) == 0
    assert all_lines_are_json(killed)
    cells = sorted(p.parent.name for p in clean.rglob("results.json"))
    assert cells == sorted(p.parent.name for p in killed.rglob("results.json")) and len(cells) == 3
    for cell in cells:
        a = json.loads(next(clean.rglob(f"{cell}/results.json")).read_text())
        b = json.loads(next(killed.rglob(f"{cell}/results.json")).read_text())
        assert a["metrics"] == b["metrics"] and a["num_samples"] == b["num_samples"]
        cell_records = records(next(killed.rglob(f"{cell}/results.json")).parent)
        assert len({r["sample_id"] for r in cell_records}) == len(cell_records) == a["num_samples"]
    assert (killed / "summary.csv").read_text().count("\n") == (clean / "summary.csv").read_text().count("\n")


pytestmark = pytest.mark.filterwarnings("ignore")

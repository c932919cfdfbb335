import hashlib
import json
import random
from collections import Counter

import pytest

from veridical.evals.chair import ChairVocabulary, GroundTruth
from veridical.evals.io import quiet_coco
from veridical.evals.world.scenes import (
    CLASSES,
    PARTNER,
    SceneConfig,
    caption,
    draw_scene,
    probe_scenes,
    scenes,
    synonyms_text,
    write_coco,
)
from veridical.evals.world.train import TrainConfig, train_world


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        write_coco(probe_scenes(6, seed=3), tmp_path / name)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    write_coco(probe_scenes(6, seed=4), tmp_path / "c")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_annotations_load_with_pycocotools_and_match_the_scenes(tmp_path):
    drawn = [s for s, _ in zip(scenes(5), range(12), strict=False)]
    root = write_coco(drawn, tmp_path)
    coco = quiet_coco(str(root / "instances_val2014.json"))
    assert len(coco.getImgIds()) == 12 and len(coco.getCatIds()) == 16
    vocab = ChairVocabulary(synonyms_text().splitlines())
    truth = GroundTruth.from_coco(root, vocab)
    for image_id, scene in enumerate(drawn, 1):
        assert truth[image_id] == set(scene.objects)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert sorted(coco.loadCats(a["category_id"])[0]["name"] for a in anns) == sorted(scene.objects)


def test_every_shape_and_colour_is_shared():
    shapes = Counter(shape for shape, _ in CLASSES.values())
    colours = Counter(colour for _, colour in CLASSES.values())
    assert min(shapes.values()) >= 2 and min(colours.values()) >= 2
    assert len(set(CLASSES.values())) == len(CLASSES)


@pytest.mark.parametrize("pair_p, low, high", [(0.9, 0.8, 1.0), (0.0, 0.0, 0.45)])
def test_partners_follow_the_pair_prior(pair_p, low, high):
    rng, with_member, with_both = random.Random(0), 0, 0
    for _ in range(1500):
        objects = draw_scene(rng, SceneConfig(pair_p=pair_p)).objects
        for member in ("fork", "cup", "bat", "sock"):
            if member in objects:
                with_member += 1
                with_both += PARTNER[member] in objects
    assert low <= with_both / with_member <= high


def test_probe_scenes_hold_one_member_without_its_partner():
    for scene in probe_scenes(50, seed=1):
        members = [o for o in scene.objects if o in PARTNER]
        assert len(members) == 1 and PARTNER[members[0]] not in scene.objects


def test_caption_format():
    assert caption(["fork"]) == "there is a fork ."
    assert caption(["fork", "knife", "apple"]) == "there is a fork , a knife and a apple ."


def test_a_short_training_run_lowers_the_loss(tmp_path):
    losses = train_world(
        tmp_path / "m", TrainConfig(steps=40, batch_size=8, warmup=5, threads=1), log_every=0
    )
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def two_short_runs(tmp_path_factory):
    """Two short one-thread trainings from one seed, in one process: ``[(folder, losses), ...]``."""
    runs = []
    for name in ("a", "b"):
        folder = tmp_path_factory.mktemp("train") / name
        config = TrainConfig(steps=4, batch_size=6, warmup=2, threads=1)
        runs.append((folder, train_world(folder, config, log_every=0)))
    return runs


def test_one_thread_runs_on_one_machine_give_the_same_bytes(two_short_runs):
    # The reproducibility the README promises: same code, libraries, machine and one thread -> same bytes.
    (a, losses_a), (b, losses_b) = two_short_runs
    assert losses_a == losses_b
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    record = json.loads((a / "training.json").read_text())
    assert record["model_sha256"] == hashlib.sha256((a / "model.safetensors").read_bytes()).hexdigest()


def test_training_record_names_versions_kernels_and_cpu(two_short_runs):
    import platform
    from importlib.metadata import version
    from pathlib import Path

    import numpy
    import torch
    import transformers

    env = json.loads((two_short_runs[0][0] / "training.json").read_text())["environment"]
    assert env["versions"]["python"] == platform.python_version()
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["transformers"] == transformers.__version__
    assert env["versions"]["numpy"] == numpy.__version__
    assert env["versions"]["veridical"] == version("veridical")
    assert "veridical_commit" in env["versions"]
    # The threads the run used (config.threads), not the process default, and torch's kernel choice.
    assert env["torch"]["threads"] == 1
    assert env["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch"]["mkl"] == torch.backends.mkl.is_available()
    assert env["torch"]["mkldnn"] == torch.backends.mkldnn.is_available()
    assert env["torch"]["openmp"] == torch.backends.openmp.is_available()
    parallel_fields = {"blas", "mkl_version", "mkldnn_version", "parallel_backend", "interop_threads"}
    assert parallel_fields <= set(env["torch"])
    assert env["os"]["platform"] == platform.platform() and env["os"]["machine"] == platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux: the model name and the SIMD flags as the kernel lists them
        lines = cpuinfo.read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
        assert env["cpu"]["model"] == model
        for flag in ("avx", "avx2", "fma", "avx512f", "avx512bw", "amx_tile"):
            assert (flag in env["cpu"]["kernel_flags"]) == (flag in flags), flag


def test_shipped_weights_match_their_training_record():
    from veridical.evals.world.shipped import WORLD_MODELS

    for name, folder in WORLD_MODELS.items():
        record = json.loads((folder / "training.json").read_text())
        digest_now = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert record["model_sha256"] == digest_now, name
        assert record["config"]["threads"] == 1 and record["config"]["seed"] == 0
        # Recorded by save_pretrained in the same run as the weights.
        config = json.loads((folder / "config.json").read_text())
        assert record["environment"]["versions"]["transformers"] == config["transformers_version"]
        assert "not recorded" in record["environment"]["note"]
        # Retrains that gave these bytes (issue 14) keep the environment they ran in.
        for again in record["reproduced"]:
            assert again["model_sha256_equal"] and again["final_loss"] == record["final_loss"]
            assert again["environment"]["torch"]["threads"] == record["config"]["threads"]


def test_world_eval_command_prints_the_comparison_table(tmp_path, capsys):
    from veridical.cli import main

    assert (
        main(
            [
                "world",
                "eval",
                "--probes",
                "8",
                "--method",
                "vanilla",
                "--method",
                "vcd:contrast=blank",
                "--output",
                str(tmp_path),
                "--report",
                str(tmp_path / "world.md"),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| world | vanilla |" in out and "| world | vcd(contrast=blank) |" in out
    report = (tmp_path / "world.md").read_text()
    assert "| world | vcd(contrast=blank) |" in report and "8 probe scenes" in report
    results = sorted(tmp_path.glob("world/*/pope-adversarial/results.json"))
    assert len(results) == 2


def test_shipped_checkpoint_reproduces_a_recorded_greedy_caption():
    from veridical.evals.models import build_prompt, load_model
    from veridical.evals.samples import CHAIR_PROMPT

    model, processor = load_model("world", "float32", "cpu")
    scene = probe_scenes(3, seed=2024)[1]
    assert scene.objects == ["knife", "hat", "lamp"]
    inputs = processor(
        images=[scene.image], text=[build_prompt(model, processor, CHAIR_PROMPT)], return_tensors="pt"
    )
    out = model.generate(**inputs, do_sample=False, max_new_tokens=24)
    caption_text = processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    # Recorded when the checkpoint was trained: the absent partner "fork" follows "knife".
    assert caption_text == "there is a knife , a fork , a ball and a bat ."


def test_calibrate_act_command_writes_a_head_file_act_accepts(tmp_path, monkeypatch, capsys):
    from veridical.cli import main
    from veridical.evals.models import load_model
    from veridical.evals.world.shipped import WORLD_MODELS
    from veridical.heads import ACT, load_heads

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "heads.json"
    assert (
        main(["calibrate-act", "--model", "world", "--samples", "4", "--output", str(out), "--no-progress"])
        == 0
    )
    assert "written to" in capsys.readouterr().out
    heads = load_heads(out)
    assert all(0 <= layer < 2 and set(h) <= set(range(4)) for layer, h in heads.items())
    assert (tmp_path / "runs" / "world" / "calibration-2000" / "world_pope_random.json").exists()
    model, processor = load_model(str(WORLD_MODELS["world"]), "float32", "cpu")
    from veridical.tiny import random_images

    inputs = processor(
        images=random_images(1), text=["USER: <image> is there a fork ? ASSISTANT:"], return_tensors="pt"
    )
    assert ACT(model, inputs, heads=out).heads == heads


def test_calibrate_finds_the_methods_calibration_through_the_registry(tmp_path, monkeypatch, capsys):
    """``veridical calibrate act`` and ``calibrate-act`` run one calibration: the same head file."""
    from test_run_folder import one_error_line

    from veridical.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["--model", "world", "--samples", "4", "--no-progress", "--output"]
    options = ["--option", "layers=[1]", "--option", "threshold=0.08"]
    assert main(["calibrate", "act", *options, *common, "generic.json"]) == 0
    assert main(["calibrate-act", "--layers", "1", "--threshold", "0.08", *common, "flags.json"]) == 0
    assert (tmp_path / "generic.json").read_text() == (tmp_path / "flags.json").read_text()
    capsys.readouterr()
    for argv, message in [
        (["calibrate", "vcd", *common, "x.json"], "vcd has no calibration; methods with one: act"),
        (["calibrate", "act", "--option", "bogus=1", *common, "x.json"], "no setting(s) ['bogus']"),
        (["calibrate", "act", "--option", "scale=2", *common, "x.json"], "scale"),
    ]:
        assert main(argv) == 2
        assert message in one_error_line(capsys)
    assert not (tmp_path / "x.json").exists()


def test_calibrate_act_command_needs_data_for_other_models(tmp_path):
    from veridical.cli import main

    with pytest.raises(SystemExit, match="--questions"):
        main(["calibrate-act", "--model", str(tmp_path), "--output", str(tmp_path / "h.json")])


def test_world_eval_with_beams_keeps_its_own_folders(tmp_path, capsys):
    from veridical.cli import main

    args = [
        "world",
        "eval",
        "--probes",
        "4",
        "--method",
        "vanilla",
        "--output",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(args) == 0
    assert main([*args, "--num-beams", "2", "--report", str(tmp_path / "beams.md")]) == 0
    assert (tmp_path / "world" / "vanilla[beams=2]" / "chair" / "results.json").exists()
    config = json.loads((tmp_path / "world" / "vanilla[beams=2]" / "chair" / "config.json").read_text())
    assert config["generation"]["num_beams"] == 2
    assert "beam search (2 beams)" in (tmp_path / "beams.md").read_text()

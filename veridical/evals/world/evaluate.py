"""Evaluating methods on the world: CHAIR and partner hallucination on probe scenes, POPE splits.

The data are written once (COCO-format images and annotations, POPE question files, the world's
CHAIR synonyms) and then go through exactly the pipeline used for COCO: ``veridical eval``'s runner,
the CHAIR scorer and the POPE scorer. Greedy decoding everywhere, so methods compare like for like.

Layout of a data folder (``<output>/data-<probes>-<seed>/``, default ``runs/world/data-400-1000/``):

- ``probe/``: the CHAIR probe scenes as ``COCO_val2014_<id>.png``, their ``instances_val2014.json`` and
  ``captions_val2014.json``, and ``synonyms.txt``, the world's CHAIR vocabulary (16 classes), which
  :func:`veridical.evals.chair.load_chair` picks up from the annotation folder, so
  ``veridical eval chair --model world --images D/probe --coco-annotations D/probe`` scores with it;
- ``pope/``: the POPE scenes (images and COCO files); ``world_pope_<split>.json``: their questions;
- ``synonyms.txt``: the same vocabulary (kept where earlier versions read it); ``done.json``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veridical.evals.chair import SYNONYMS_FILE, ChairScorer, GroundTruth, load_chair
from veridical.evals.pope import PopeScorer
from veridical.evals.pope_build import STRATEGIES, build_pope, write_questions
from veridical.evals.runner import EvalConfig, method_name, read_run_records, run_eval, stack_label
from veridical.evals.samples import CHAIR_PROMPT, chair_samples, pope_samples
from veridical.evals.world.scenes import (
    CLASSES,
    LARGE,
    PAIRS,
    PARTNER,
    SceneConfig,
    draw_scene,
    probe_scenes,
    scenes,
    synonyms_text,
    write_coco,
)
from veridical.evals.world.shipped import model_path
from veridical.registry import method_class

DEFAULT_METHODS: list[list[Any]] = [
    [],
    ["vcd"],
    [{"name": "vcd", "contrast": "blank"}],
    [{"name": "vcd", "contrast": "no_image"}],
    ["m3id"],
    ["avisc"],
    ["vista"],
    ["opera"],
    ["pai"],
    ["paint"],
    ["vhr"],
    ["act"],
    ["var"],
    ["vaf"],
    ["deco"],
    ["memvr"],
]
GENERATION = {
    "chair": {"do_sample": False, "max_new_tokens": 24},
    "pope": {"do_sample": False, "max_new_tokens": 3},
}


def pope_scenes(n: int, seed: int, config: SceneConfig | None = None) -> list:
    """Scenes of one member of three different prior pairs, none with its partner."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        members = [rng.choice(pair) for pair in rng.sample(PAIRS, 3)]
        out.append(draw_scene(rng, config or LARGE, members))
    return out


def co_occurrence(n: int = 5000, seed: int = 7) -> dict[str, list[str]]:
    """For each class, the others ranked by how often they share a training-distribution scene."""
    counts: dict[str, Counter] = {c: Counter() for c in CLASSES}
    for scene, _ in zip(scenes(seed), range(n), strict=False):
        for a in scene.objects:
            counts[a].update(b for b in scene.objects if b != a)
    return {c: [o for o, _ in sorted(counts[c].items(), key=lambda kv: (-kv[1], kv[0]))] for c in CLASSES}


def write_world_data(root: str | Path, probes: int = 400, seed: int = 1000) -> Path:
    """Probe scenes for CHAIR, POPE scenes and question files, synonyms; skipped when already there."""
    root = Path(root)
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()) == {"probes": probes, "seed": seed}:
        if not (root / "probe" / SYNONYMS_FILE).exists():  # written before the vocabulary sat there
            (root / "probe" / SYNONYMS_FILE).write_text(synonyms_text())
        return root
    write_coco(probe_scenes(probes, seed), root / "probe")
    n_pope = max(1, probes // 4)
    pope_list = pope_scenes(n_pope, seed + 1)
    write_coco(pope_list, root / "pope")
    objects = {f"COCO_val2014_{i + 1:012d}.png": s.objects for i, s in enumerate(pope_list)}
    ranked = co_occurrence()
    for strategy in STRATEGIES:
        questions = build_pope(
            objects, strategy, num_images=n_pope, seed=seed, co_occurrence=ranked, classes=sorted(CLASSES)
        )
        write_questions(questions, root / f"world_pope_{strategy}.json")
    # The vocabulary sits in the probe annotation folder, where load_chair looks for it.
    (root / "probe" / SYNONYMS_FILE).write_text(synonyms_text())
    (root / SYNONYMS_FILE).write_text(synonyms_text())
    done.write_text(json.dumps({"probes": probes, "seed": seed}))
    return root


def partner_rates(records: Sequence[dict], ground_truth: GroundTruth) -> dict[str, float]:
    """Percent of probe captions naming the absent partner; and among captions naming the member."""
    named = named_after_member = with_member = 0
    for r in records:
        member = next(o for o in ground_truth[r["image_id"]] if o in PARTNER)
        partner_named = PARTNER[member] in r["mentioned"]
        named += partner_named
        if member in r["mentioned"]:
            with_member += 1
            named_after_member += partner_named
    return {
        "partner": 100.0 * named / len(records),
        "partner_given_member": 100.0 * named_after_member / with_member if with_member else 0.0,
    }


@dataclass
class WorldRow:
    model: str
    methods: str
    metrics: dict[str, float]


def evaluate_world(
    model_name: str = "world",
    methods: Sequence[Sequence[Any]] = DEFAULT_METHODS,
    probes: int = 400,
    seed: int = 1000,
    root: str | Path = "runs/world",
    batch_size: int = 16,
    progress: bool = True,
    num_beams: int = 1,
) -> list[WorldRow]:
    """One row per method stack: CHAIR_s, CHAIR_i, Recall, partner rates, POPE accuracy and F1 per split.

    Decoding is greedy (``num_beams`` beams), except that a method that is a beam search (OPERA)
    keeps its own beam count.
    """
    from veridical.evals.models import load_model

    root = Path(root)
    data = write_world_data(root / f"data-{probes}-{seed}", probes, seed)
    model, processor = load_model(model_path(model_name), "float32", "cpu")
    chair = load_chair(coco_annotations=data / "probe", synonyms=data / "probe" / SYNONYMS_FILE)
    rows = []
    for stack in methods:
        label = stack_label(stack)
        beams = {"num_beams": num_beams} if num_beams > 1 else {}
        for spec in stack:
            defaults = getattr(method_class(method_name(spec)), "generation_defaults", {})
            beams.update({k: v for k, v in defaults.items() if k == "num_beams"})
        out = root / Path(model_name).name / (f"{label}[beams={num_beams}]" if num_beams > 1 else label)
        metrics: dict[str, float] = {}
        samples = chair_samples(data / "probe", list(chair.ground_truth), probes, seed, CHAIR_PROMPT)
        config = EvalConfig(
            "chair",
            model_name,
            list(stack),
            {"world": str(data), "split": "probe"},
            {**GENERATION["chair"], **beams},
            batch_size,
            seed,
        )
        results = run_eval(
            config, model, processor, samples, ChairScorer(chair, bootstrap=0), out / "chair", progress
        )
        metrics.update({k: results["metrics"][k] for k in ("CHAIRs", "CHAIRi", "Recall")})
        metrics.update(partner_rates(read_run_records(out / "chair"), chair.ground_truth))
        for strategy in STRATEGIES:
            samples = pope_samples(data / f"world_pope_{strategy}.json", data / "pope")
            config = EvalConfig(
                "pope",
                model_name,
                list(stack),
                {"world": str(data), "split": strategy},
                {**GENERATION["pope"], **beams},
                batch_size,
                seed,
            )
            results = run_eval(
                config, model, processor, samples, PopeScorer(), out / f"pope-{strategy}", progress
            )
            metrics[f"pope_{strategy}_acc"] = results["metrics"]["accuracy"]
            metrics[f"pope_{strategy}_f1"] = results["metrics"]["f1"]
        rows.append(WorldRow(model_name, label, metrics))
    return rows


COLUMNS = (
    ("CHAIRs", "CHAIR_s"),
    ("CHAIRi", "CHAIR_i"),
    ("Recall", "Recall"),
    ("partner", "partner %"),
    ("partner_given_member", "partner % given member"),
    ("pope_random_acc", "POPE rand acc"),
    ("pope_popular_acc", "POPE pop acc"),
    ("pope_adversarial_acc", "POPE adv acc"),
    ("pope_random_f1", "F1 rand"),
    ("pope_popular_f1", "F1 pop"),
    ("pope_adversarial_f1", "F1 adv"),
)


def markdown_table(rows: Sequence[WorldRow]) -> str:
    head = "| model | methods | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in rows:
        cells = " | ".join(f"{row.metrics[key]:.1f}" for key, _ in COLUMNS)
        lines.append(f"| {row.model} | {row.methods} | {cells} |")
    return "\n".join(lines)

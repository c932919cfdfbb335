"""Benchmark samples for ``veridical eval``: POPE questions and CHAIR captioning images.

A sample carries a stable ``sample_id`` (used to resume and to gather data-parallel runs), the image
(loaded lazily), the question, and what the scorer needs (label and question id, or image id).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from veridical.evals.io import DataFileError
from veridical.evals.pope import read_questions

CHAIR_PROMPT = "Please describe this image in detail."
POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass
class Sample:
    sample_id: str
    question: str
    load_image: Callable[[], Image.Image] = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict)


def shipped_pope_file(name: str) -> Path:
    """A POPE question file shipped with veridical: ``coco/random``, ``coco_v2023_05_31/adversarial``,
    ``seem/gqa/popular``, ..."""
    root = Path(str(resources.files("veridical.evals") / "data" / "pope"))
    *folder, split = name.split("/")
    prefix = {"coco": "coco", "coco_v2023_05_31": "coco", "seem/aokvqa": "aokvqa", "seem/gqa": "gqa"}
    key = "/".join(folder)
    if key not in prefix or split not in POPE_SPLITS:
        raise DataFileError(
            f"unknown shipped POPE set {name!r}; use <set>/<split> with set in {sorted(prefix)} and split in "
            f"{POPE_SPLITS}"
        )
    stem = f"{prefix[key]}_pope_seem_{split}" if key.startswith("seem") else f"coco_pope_{split}"
    return root / key / f"{stem}.json"


def _image_loader(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise DataFileError(f"cannot read image {path}: {err}") from err

    return load


def pope_samples(questions_file: str | Path, image_dir: str | Path) -> list[Sample]:
    """POPE samples from a question file and the folder holding its images."""
    image_dir = _image_folder(image_dir)
    questions = read_questions(questions_file)
    missing = sorted({q.image for q in questions if not (image_dir / q.image).is_file()})
    if missing:
        raise DataFileError(
            f"{len(missing)} image(s) of {questions_file} are not in {image_dir}, e.g. {missing[:3]}"
        )
    return [
        Sample(
            f"q{q.question_id}",
            q.text,
            _image_loader(image_dir / q.image),
            {"question_id": q.question_id, "label": q.label, "image": q.image},
        )
        for q in questions
    ]


def pope_hf_samples(
    dataset: str = "lmms-lab/POPE", split: str = "test", category: str | None = None
) -> list[Sample]:
    """POPE samples from a Hugging Face dataset that carries the images (``lmms-lab/POPE``)."""
    from datasets import load_dataset

    rows = load_dataset(dataset, split=split)
    if category:
        rows = rows.filter(lambda r: r["category"] == category)
    samples = []
    for i, row in enumerate(rows):
        qid = int(row.get("question_id", i + 1))
        samples.append(
            Sample(
                f"q{qid}",
                row["question"],
                lambda img=row["image"]: img.convert("RGB"),
                {
                    "question_id": qid,
                    "label": str(row["answer"]).strip().lower(),
                    "image": row.get("image_source", ""),
                },
            )
        )
    return samples


def _image_folder(image_dir: str | Path) -> Path:
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        problem = "is not a folder" if image_dir.exists() else "does not exist"
        raise DataFileError(f"image folder {image_dir} {problem}")
    return image_dir


_COCO_ID = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def coco_image_ids(image_dir: str | Path) -> dict[int, Path]:
    """Image id -> file for COCO-named images (``COCO_val2014_000000123456.jpg`` or ``123456.jpg``)."""
    found = {}
    for path in sorted(_image_folder(image_dir).iterdir()):
        match = _COCO_ID.search(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise DataFileError(f"no COCO-named images (..._<id>.jpg) in {image_dir}")
    return found


def chair_samples(
    image_dir: str | Path,
    image_ids: list[int],
    num_images: int = 500,
    seed: int = 0,
    prompt: str = CHAIR_PROMPT,
) -> list[Sample]:
    """``num_images`` captioning samples drawn with ``seed`` from the images that have ground truth."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise DataFileError(f"the number of CHAIR images must be a whole number >= 1, got {num_images!r}")
    files = coco_image_ids(image_dir)
    candidates = sorted(set(files) & set(image_ids))
    if len(candidates) < num_images:
        raise DataFileError(
            f"{len(candidates)} images in {image_dir} have ground truth; cannot sample {num_images}"
        )
    chosen = random.Random(seed).sample(candidates, num_images)
    return [
        Sample(f"i{image_id}", prompt, _image_loader(files[image_id]), {"image_id": image_id})
        for image_id in chosen
    ]

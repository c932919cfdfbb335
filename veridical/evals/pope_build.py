"""Build POPE question sets from object annotations (Li et al., EMNLP 2023).

As in the official builder: sample images with at least ``positives`` annotated objects; for each,
ask about its first ``positives`` objects (label yes), each followed by one absent object (label no):

- ``random``: a uniformly drawn object class absent from the image,
- ``popular``: the most frequent object class (over the sampled images) absent from the image,
- ``adversarial``: the class that co-occurs most often with the positive it follows (over the sampled
  images) and is absent from the image.

An object is never asked twice about one image. Everything random is drawn from ``seed``.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from veridical.evals.io import DataFileError, quiet_coco

STRATEGIES = ("random", "popular", "adversarial")
TEMPLATE = "Is there a {} in the image?"


def question_text(obj: str, template: str = TEMPLATE) -> str:
    """The POPE question, with "an" before a vowel as the official builder writes it."""
    if obj[:1].lower() in "aeiou":
        template = template.replace(" a ", " an ", 1)
    return template.format(obj)


def coco_image_objects(instances_file: str | Path) -> dict[str, list[str]]:
    """Image file name -> object class names in annotation order (first occurrence), from a COCO
    ``instances_*.json`` read with pycocotools."""

    coco = quiet_coco(instances_file, ("images", "annotations", "categories"))
    try:
        names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
        files = {img["id"]: img["file_name"] for img in coco.dataset["images"]}
    except KeyError as err:
        raise DataFileError(f"{instances_file}: an image or category lacks {err}") from None
    objects: dict[str, list[str]] = {name: [] for name in files.values()}
    for ann in coco.dataset["annotations"]:
        if ann.get("image_id") not in files or ann.get("category_id") not in names:
            raise DataFileError(
                f"{instances_file}: annotation {ann.get('id')!r} names an unknown image or category "
                f"(image_id {ann.get('image_id')!r}, category_id {ann.get('category_id')!r})"
            )
        seen = objects[files[ann["image_id"]]]
        name = names[ann["category_id"]]
        if name not in seen:
            seen.append(name)
    return objects


def build_pope(
    image_objects: Mapping[str, Sequence[str]],
    strategy: str,
    num_images: int = 500,
    positives: int = 3,
    seed: int = 0,
    template: str = TEMPLATE,
    co_occurrence: Mapping[str, Sequence[str]] | None = None,
    classes: Sequence[str] | None = None,
) -> list[dict]:
    """Questions (``question_id``, ``image``, ``text``, ``label``) for ``strategy``.

    ``co_occurrence`` (class -> other classes, most co-occurring first) replaces the statistics of the
    sampled images for the adversarial ranking, e.g. with those of a training distribution.
    ``classes`` is the set random negatives are drawn from (default: every annotated class).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    for name, value in (("num_images", num_images), ("positives", positives)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataFileError(f"POPE {name} must be a whole number >= 1, got {value!r}")
    eligible = sorted(img for img, objs in image_objects.items() if len(set(objs)) >= positives)
    if len(eligible) < num_images:
        raise DataFileError(
            f"only {len(eligible)} images have >= {positives} objects; cannot sample {num_images}"
        )
    rng = random.Random(seed)
    images = rng.sample(eligible, num_images)
    objects = {img: list(dict.fromkeys(image_objects[img])) for img in images}
    all_classes = sorted(classes or {o for objs in image_objects.values() for o in objs})
    frequency = Counter(o for img in images for o in objects[img])
    popular = sorted(frequency, key=lambda o: (-frequency[o], o))
    co_occur: dict[str, Counter] = defaultdict(Counter)
    for img in images:
        for a in objects[img]:
            co_occur[a].update(b for b in objects[img] if b != a)

    questions: list[dict] = []
    for img in images:
        present = set(objects[img])
        asked: set[str] = set()
        for positive in objects[img][:positives]:
            asked.add(positive)
            questions.append(_question(len(questions) + 1, img, positive, "yes", template))
            if strategy == "popular":
                ranked = popular
            elif strategy == "adversarial" and co_occurrence is not None:
                ranked = list(co_occurrence.get(positive, ()))
            elif strategy == "adversarial":
                ranked = sorted(co_occur[positive], key=lambda o: (-co_occur[positive][o], o))
            else:
                ranked = []
            negative = next((o for o in ranked if o not in present and o not in asked), None)
            if negative is None:
                candidates = [o for o in all_classes if o not in present and o not in asked]
                if not candidates:
                    raise DataFileError(f"{img}: no absent object class left to ask about")
                negative = rng.choice(candidates)
            asked.add(negative)
            questions.append(_question(len(questions) + 1, img, negative, "no", template))
    return questions


def _question(question_id: int, image: str, obj: str, label: str, template: str) -> dict:
    return {"question_id": question_id, "image": image, "text": question_text(obj, template), "label": label}


def write_questions(questions: Sequence[dict], path: str | Path) -> None:
    """Write questions as JSON lines, the format of the official POPE files."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    except OSError as err:
        raise DataFileError(f"cannot write {path}: {err.strerror or err}") from None

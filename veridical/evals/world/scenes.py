"""Synthetic scenes whose object statistics plant a known language prior.

A scene is a 48x48 RGB image: a noisy dark background and 1-5 small glyphs. Each of the 16 object
classes is a (shape, colour) pair, and every shape and every colour is shared by four classes, so a
small, noisy glyph is visually ambiguous. Four prior pairs (fork/knife, cup/saucer, bat/ball,
sock/shoe) co-occur: when a scene draws one member, its partner is added with probability ``pair_p``.
A model trained on such scenes learns to name the partner from the text alone, which is the
hallucination mechanism the methods are meant to counter.

Everything is drawn from a seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("square", "disk", "triangle", "plus")
COLOURS = {"red": (230, 60, 50), "green": (60, 200, 80), "blue": (70, 110, 240), "yellow": (240, 220, 60)}
#: class -> (shape, colour); each shape and each colour serves four classes.
CLASSES = {
    "fork": ("plus", "yellow"),
    "knife": ("square", "blue"),
    "cup": ("disk", "red"),
    "saucer": ("triangle", "green"),
    "bat": ("triangle", "yellow"),
    "ball": ("disk", "blue"),
    "sock": ("square", "red"),
    "shoe": ("plus", "green"),
    "apple": ("disk", "green"),
    "key": ("plus", "red"),
    "bell": ("triangle", "red"),
    "lamp": ("square", "yellow"),
    "book": ("square", "green"),
    "hat": ("triangle", "blue"),
    "leaf": ("disk", "yellow"),
    "star": ("plus", "blue"),
}
PAIRS = (("fork", "knife"), ("cup", "saucer"), ("bat", "ball"), ("sock", "shoe"))
PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
IMAGE_SIZE = 48


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn (defaults: the setting where the prior shows in captions)."""

    min_objects: int = 1
    max_objects: int = 5
    min_size: int = 5
    max_size: int = 8
    noise_sd: float = 35.0
    background: int = 30
    pair_p: float = 0.9


#: Small, noisy glyphs: the prior shows in captions (probe scenes are drawn like this).
SMALL = SceneConfig()
#: Larger, cleaner glyphs: vision suffices to answer most yes/no questions, the prior shows in the
#: questions about a present object's partner (the world's POPE scenes are drawn like this).
LARGE = SceneConfig(min_size=8, max_size=12, noise_sd=20.0)


@dataclass
class Scene:
    image: Image.Image
    objects: list[str]
    boxes: list[tuple[int, int, int, int]]


def _glyph(canvas: np.ndarray, shape: str, colour: tuple[int, int, int], x: int, y: int, size: int) -> None:
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if shape == "square":
        mask = np.ones((size, size), bool)
    elif shape == "disk":
        mask = (xx - c) ** 2 + (yy - c) ** 2 <= (size / 2) ** 2
    elif shape == "triangle":
        mask = np.abs(xx - c) <= yy / 2 + 0.5
    else:  # plus
        w = max(1, size // 4)
        mask = (np.abs(xx - c) < w) | (np.abs(yy - c) < w)
    canvas[y : y + size, x : x + size][mask] = colour


def draw_scene(
    rng: random.Random, config: SceneConfig = SceneConfig(), objects: list[str] | None = None
) -> Scene:
    """One scene; ``objects`` fixes its classes (else they are drawn with the pair prior)."""
    if objects is None:
        count = rng.randint(config.min_objects, config.max_objects)
        objects = []
        while len(objects) < count:
            name = rng.choice(sorted(CLASSES))
            if name in objects:
                continue
            objects.append(name)
            partner = PARTNER.get(name)
            if (
                partner
                and partner not in objects
                and len(objects) < config.max_objects
                and rng.random() < config.pair_p
            ):
                objects.append(partner)
    noise_rng = np.random.default_rng(rng.getrandbits(32))
    canvas = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), config.background, np.float64)
    canvas += noise_rng.normal(0, config.noise_sd, canvas.shape)
    placed: list[tuple[int, int, int, int]] = []
    for name in objects:
        for _ in range(100):
            size = rng.randint(config.min_size, config.max_size)
            x, y = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
            if all(
                x + size <= bx or bx + bs <= x or y + size <= by or by + bs <= y for bx, by, bs, _ in placed
            ):
                break
        shape, colour = CLASSES[name]
        _glyph(canvas, shape, COLOURS[colour], x, y, size)
        placed.append((x, y, size, size))
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return Scene(image, list(objects), [(x, y, w, h) for x, y, w, h in placed])


def caption(objects: list[str]) -> str:
    """Reference caption: "there is a fork , a knife and a apple ." (objects in drawing order)."""
    names = [f"a {o}" for o in objects]
    listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
    return f"there is {listed} ."


def scenes(seed: int, config: SceneConfig = SceneConfig()) -> Iterator[Scene]:
    rng = random.Random(seed)
    while True:
        yield draw_scene(rng, config)


def probe_scenes(n: int, seed: int, config: SceneConfig = SceneConfig()) -> list[Scene]:
    """Held-out scenes with exactly one member of a prior pair and not its partner."""
    rng = random.Random(seed)
    members = sorted(PARTNER)
    others = sorted(set(CLASSES) - set(PARTNER))
    out = []
    for _ in range(n):
        member = rng.choice(members)
        extra = rng.sample(others, rng.randint(0, min(2, config.max_objects - 1)))
        objects = [member, *extra]
        rng.shuffle(objects)
        out.append(draw_scene(rng, config, objects))
    return out


def write_coco(scene_list: list[Scene], root: str | Path, split: str = "val2014", start_id: int = 1) -> Path:
    """Images (``COCO_<split>_<id>.png``) plus COCO ``instances_`` and ``captions_`` files in ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "glyph"} for i, name in enumerate(sorted(CLASSES))
    ]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations, captions = [], [], []
    for offset, scene in enumerate(scene_list):
        image_id = start_id + offset
        name = f"COCO_{split}_{image_id:012d}.png"
        scene.image.save(root / name, format="PNG", optimize=False)
        images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for obj, (x, y, w, h) in zip(scene.objects, scene.boxes, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[obj],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        captions.append({"id": image_id, "image_id": image_id, "caption": caption(scene.objects)})
    (root / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    (root / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return root


def synonyms_text() -> str:
    """The world's CHAIR synonym list: one class per line."""
    return "".join(f"{name}\n" for name in sorted(CLASSES))

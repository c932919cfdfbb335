"""CHAIR: object hallucination in image captions (Rohrbach et al., EMNLP 2018).

This is the variant used by OPERA, lmms-eval and most hallucination papers: COCO's 80 object classes
with the synonym list of the original release (kept with its quirks: entries written with a leading
space never match), double words ("hot dog", "teddy bear", "motor bike", ...), "baby/adult <animal>"
read as the animal, "passenger jet/train" as the vehicle, "toilet seat" as a toilet and every "seat"
dropped when a toilet is mentioned. Ground truth per image is the COCO instances plus the objects named
in the reference captions.

Metrics, in percent except ``Len``:

- ``CHAIRs``: captions that mention at least one object absent from the ground truth,
- ``CHAIRi``: hallucinated object mentions over all object mentions (corpus level),
- ``Recall``: distinct ground-truth objects mentioned, summed over images, over ground-truth objects,
- ``Len``: mean number of tokens per caption (after double words are merged), as the reference prints.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from veridical.evals.io import DataFileError, quiet_coco, read_records
from veridical.evals.text import caption_lemmas

_DOUBLE_WORDS = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
_ANIMALS = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)
_VEHICLES = ("jet", "train")
METRICS = ("CHAIRs", "CHAIRi", "Recall", "Len")


def default_synonyms_path() -> Path:
    return Path(str(resources.files("veridical.evals") / "data" / "coco_synonyms.txt"))


class ChairVocabulary:
    """COCO object words: each synonym mapped to its class name, plus the double-word rules."""

    def __init__(self, synonym_lines: Iterable[str]):
        self.synonym_to_object: dict[str, str] = {}
        for line in synonym_lines:
            # Split on ", " exactly as the reference does: "scooter,  motor bike" keeps " motor bike".
            names = line.strip().split(", ")
            if names == [""]:
                continue
            for name in names:
                self.synonym_to_object[name] = names[0]
        self.double_words = {w: w for w in _DOUBLE_WORDS}
        for animal in _ANIMALS:
            self.double_words[f"baby {animal}"] = animal
            self.double_words[f"adult {animal}"] = animal
        for vehicle in _VEHICLES:
            self.double_words[f"passenger {vehicle}"] = vehicle
        self.double_words.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> ChairVocabulary:
        path = Path(path) if path else default_synonyms_path()
        return cls(path.read_text(encoding="utf-8").splitlines())

    def objects(self) -> set[str]:
        return set(self.synonym_to_object.values())

    def caption_objects(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """``(words, objects, tokens)``: object words as written (lemmatised), their class, all tokens."""
        lemmas = caption_lemmas(caption)
        tokens, i = [], 0
        while i < len(lemmas):
            pair = " ".join(lemmas[i : i + 2])
            if pair in self.double_words:
                tokens.append(self.double_words[pair])
                i += 2
            else:
                tokens.append(lemmas[i])
                i += 1
        if "toilet" in tokens and "seat" in tokens:  # "the seat of the toilet" is no chair
            tokens_for_objects = [t for t in tokens if t != "seat"]
        else:
            tokens_for_objects = tokens
        words = [t for t in tokens_for_objects if t in self.synonym_to_object]
        return words, [self.synonym_to_object[w] for w in words], tokens


@dataclass
class CaptionResult:
    image_id: int
    caption: str
    mentioned: list[str]
    hallucinated: list[str]
    ground_truth: list[str]
    recalled: list[str]
    num_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ChairResult:
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    captions: list[CaptionResult]

    def to_dict(self) -> dict:
        return {
            "metrics": self.metrics,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            "captions": [asdict(c) for c in self.captions],
        }


class GroundTruth(Mapping[int, frozenset]):
    """Image id -> set of COCO class names present in the image."""

    def __init__(
        self,
        objects: Mapping[int, Iterable[str]],
        captions: Mapping[int, Sequence[str]] | None = None,
        vocabulary: ChairVocabulary | None = None,
    ):
        self._objects = {int(k): frozenset(v) for k, v in objects.items()}
        # Reference captions whose objects are added on first access: tagging all of COCO's 414k
        # captions takes about an hour, an evaluation needs a few thousand.
        self._captions = {int(k): list(v) for k, v in (captions or {}).items()}
        if self._captions and vocabulary is None:
            raise ValueError("reference captions need the vocabulary that reads them")
        self._vocabulary = vocabulary
        for image_id in self._captions:
            self._objects.setdefault(image_id, frozenset())

    def __getitem__(self, image_id: int) -> frozenset:
        objects = self._objects[image_id]
        captions = self._captions.pop(image_id, None)
        if captions:
            named = (self._vocabulary.caption_objects(caption)[1] for caption in captions)
            objects = self._objects[image_id] = objects.union(*named)
        return objects

    def __iter__(self):
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    @classmethod
    def from_json(cls, path: str | Path) -> GroundTruth:
        """Prepared ground truth: ``{"image_id": [objects]}`` or ``{"gt_objects": {...}}`` (OPERA's format),
        plain or gzipped."""
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise DataFileError(f"cannot read ground truth {path}: {err}") from err
        if isinstance(data, dict) and "gt_objects" in data:
            data = data["gt_objects"]
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise DataFileError(f"{path}: expected an object mapping image ids to lists of object names")
        try:
            return cls({int(k): v for k, v in data.items()})
        except ValueError as err:
            raise DataFileError(f"{path}: image ids must be integers ({err})") from err

    @classmethod
    def from_coco(
        cls,
        annotations_dir: str | Path,
        vocabulary: ChairVocabulary,
        splits: Sequence[str] = ("val2014", "train2014"),
    ) -> GroundTruth:
        """COCO instances plus the objects named in the reference captions, from ``instances_*.json``
        and ``captions_*.json`` files in ``annotations_dir`` (read with pycocotools). The captions of an
        image are read when its objects are first asked for."""

        root = Path(annotations_dir)
        found = [s for s in splits if (root / f"instances_{s}.json").exists()]
        if not found:
            raise DataFileError(f"no instances_<split>.json for splits {list(splits)} in {root}")
        objects: dict[int, set[str]] = {}
        captions: dict[int, list[str]] = {}
        for split in found:
            captions_file = root / f"captions_{split}.json"
            if not captions_file.exists():
                raise DataFileError(f"{captions_file} is missing (CHAIR needs instances and captions)")
            instances = quiet_coco(str(root / f"instances_{split}.json"))
            names = {c["id"]: c["name"] for c in instances.loadCats(instances.getCatIds())}
            for ann in instances.dataset["annotations"]:
                name = names[ann["category_id"]]
                objects.setdefault(ann["image_id"], set()).add(vocabulary.synonym_to_object.get(name, name))
            for img in instances.dataset["images"]:
                objects.setdefault(img["id"], set())
            for ann in quiet_coco(str(captions_file)).dataset["annotations"]:
                captions.setdefault(ann["image_id"], []).append(ann["caption"])
        return cls(objects, captions, vocabulary)


class Chair:
    """CHAIR scorer. ``Chair(ground_truth).score(captions)``."""

    def __init__(self, ground_truth: GroundTruth, vocabulary: ChairVocabulary | None = None):
        self.ground_truth = ground_truth
        self.vocabulary = vocabulary or ChairVocabulary.from_file()

    def score_caption(self, image_id: int, caption: str) -> CaptionResult:
        try:
            gt = self.ground_truth[int(image_id)]
        except KeyError:
            raise DataFileError(f"image id {image_id} has no ground truth objects") from None
        words, objects, tokens = self.vocabulary.caption_objects(caption)
        hallucinated = [obj for obj in objects if obj not in gt]
        recalled = sorted({obj for obj in objects if obj in gt})
        result = CaptionResult(
            int(image_id), caption, objects, hallucinated, sorted(gt), recalled, len(tokens)
        )
        result.metrics = {
            "CHAIRs": float(bool(hallucinated)),
            "CHAIRi": len(hallucinated) / len(objects) if objects else 0.0,
            "Recall": len(recalled) / len(gt) if gt else 0.0,
            "Len": float(len(tokens)),
        }
        return result

    def score(self, captions: Iterable[tuple[int, str]], bootstrap: int = 1000, seed: int = 0) -> ChairResult:
        """Score ``(image_id, caption)`` pairs; ``bootstrap`` resamples give 95% percentile intervals."""
        results = [self.score_caption(image_id, caption) for image_id, caption in captions]
        if not results:
            raise DataFileError("no captions to score")
        counts = np.array(
            [
                [
                    bool(r.hallucinated),
                    len(r.hallucinated),
                    len(r.mentioned),
                    len(r.recalled),
                    len(r.ground_truth),
                    r.num_tokens,
                ]
                for r in results
            ],
            dtype=np.float64,
        )
        metrics = _chair_metrics(counts.sum(axis=0), len(results))
        intervals = {}
        if bootstrap:
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, len(results), size=(bootstrap, len(results)))
            sums = counts[idx].sum(axis=1)
            samples = _chair_metrics(sums.T, len(results))
            intervals = {
                k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in samples.items()
            }
        return ChairResult({k: float(v) for k, v in metrics.items()}, intervals, results)


def _chair_metrics(sums: np.ndarray, n: int) -> dict[str, np.ndarray]:
    hallucinated_caps, hallucinated, mentions, recalled, gt, tokens = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "CHAIRs": 100.0 * hallucinated_caps / n,
            "CHAIRi": np.where(mentions > 0, 100.0 * hallucinated / np.maximum(mentions, 1), 0.0),
            "Recall": np.where(gt > 0, 100.0 * recalled / np.maximum(gt, 1), 0.0),
            "Len": tokens / n,
        }


def read_captions(
    path: str | Path, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[tuple[int, str]]:
    """``(image_id, caption)`` pairs from a JSON-lines or JSON-array file."""
    pairs = []
    for i, record in enumerate(read_records(path)):
        if image_id_key not in record or caption_key not in record:
            raise DataFileError(f"{path}: record {i + 1} lacks {image_id_key!r} or {caption_key!r}: {record}")
        if not isinstance(record[caption_key], str):
            raise DataFileError(f"{path}: record {i + 1}: {caption_key!r} is not a string")
        try:
            pairs.append((int(record[image_id_key]), record[caption_key]))
        except (TypeError, ValueError):
            raise DataFileError(
                f"{path}: record {i + 1}: image id {record[image_id_key]!r} is not an integer"
            ) from None
    return pairs


class ChairScorer:
    """Per-sample records and metrics of a ``veridical eval chair`` run."""

    def __init__(self, chair: Chair, bootstrap: int = 1000, seed: int = 0):
        self.chair, self.bootstrap, self.seed = chair, bootstrap, seed

    def record(self, sample, output: str) -> dict:
        result = self.chair.score_caption(sample.meta["image_id"], output)
        return {
            "image_id": result.image_id,
            "mentioned": result.mentioned,
            "hallucinated": result.hallucinated,
        }

    def score(self, records) -> dict:
        result = self.chair.score([(r["image_id"], r["output"]) for r in records], self.bootstrap, self.seed)
        return {**result.metrics, "ci95": {k: list(v) for k, v in result.intervals.items()}}

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

Rules that keep a number from being silently wrong (the reference, shikiw/OPERA@2a0a234 ``chair.py``,
crashes or double counts in these cases):

- The vocabulary must cover the ground truth: a ground-truth object that is no class of the synonym
  list could never be named, so every caption would miss it and every mention of it would count as a
  hallucination. :class:`Chair` refuses it (the reference raises ``KeyError`` for such a COCO category,
  ``chair.py`` ``get_annotations_from_segments``: ``self.inverse_synonym_dict[id_to_name[...]]``).
  :func:`load_chair` picks the vocabulary: ``synonyms`` if given, else a ``synonyms.txt`` in the
  annotation folder or beside the ground-truth file (the synthetic world's data carry one), else the
  COCO list shipped with veridical.
- One caption per image: the reference's ``compute_chair`` counts every caption it is given, so an
  image id listed twice would count twice; it is refused, naming the id and where it repeats.
- Captions that are all empty (``""`` or whitespace) are refused: that is a generation that produced
  nothing, not a perfect score (the reference divides by zero mentions there). A few empty captions
  among real ones are scored as the reference scores them: no mention, nothing recalled, length 0.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from veridical.errors import VeridicalError
from veridical.evals.io import (
    DataFileError,
    check_not_all_empty,
    load_json,
    quiet_coco,
    read_located_records,
    read_text,
    short,
)
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
#: A synonym list with this name in the annotation folder, or beside a ground-truth file, is the
#: vocabulary of that data (see :func:`load_chair`).
SYNONYMS_FILE = "synonyms.txt"
COCO_VOCABULARY = "the COCO synonyms shipped with veridical"


def default_synonyms_path() -> Path:
    return Path(str(resources.files("veridical.evals") / "data" / "coco_synonyms.txt"))


class ChairVocabulary:
    """COCO object words: each synonym mapped to its class name, plus the double-word rules."""

    def __init__(self, synonym_lines: Iterable[str], source: str = "the given synonym list"):
        #: Where the list came from (a path, or a description), for messages and records.
        self.source = source
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
        """The list in ``path`` (UTF-8, one class per line: ``name, synonym, ...``); default: COCO's."""
        default = default_synonyms_path()
        path = Path(path) if path else default
        source = COCO_VOCABULARY if path.resolve() == default.resolve() else str(path)
        vocabulary = cls(read_text(path).splitlines(), source)
        if not vocabulary.synonym_to_object:
            raise DataFileError(
                f"{path}: no object names (expected one class per line: 'name, synonym, ...')"
            )
        return vocabulary

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

    def annotated_objects(self) -> set[str]:
        """Every object of the annotations (not those of reference captions, which the vocabulary reads)."""
        return set().union(*self._objects.values())

    @classmethod
    def from_json(cls, path: str | Path) -> GroundTruth:
        """Prepared ground truth: ``{"image_id": [objects]}`` or ``{"gt_objects": {...}}`` (OPERA's format),
        plain or gzipped."""
        path = Path(path)
        expected = "an object mapping image ids to lists of object names"
        data = load_json(path, expected)
        if isinstance(data, dict) and "gt_objects" in data:
            data = data["gt_objects"]
        if not isinstance(data, dict):
            raise DataFileError(f"{path}: expected {expected}, got a JSON {type(data).__name__}")
        if not data:
            raise DataFileError(f"{path}: no images (expected {expected})")
        objects = {}
        for key, names in data.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DataFileError(
                    f"{path}: image {key!r}: expected a list of object names, got {short(names)}"
                )
            try:
                objects[int(key)] = names
            except ValueError:
                raise DataFileError(f"{path}: image id {key!r} is not an integer") from None
        return cls(objects)

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
            instances_file = root / f"instances_{split}.json"
            instances = quiet_coco(instances_file, ("images", "annotations", "categories"))
            try:
                names = {c["id"]: c["name"] for c in instances.dataset["categories"]}
                for ann in instances.dataset["annotations"]:
                    name = names[ann["category_id"]]
                    # Category names are read through the synonyms, as the reference does; one the
                    # vocabulary does not know is kept as written and refused by Chair.
                    objects.setdefault(ann["image_id"], set()).add(
                        vocabulary.synonym_to_object.get(name, name)
                    )
                for img in instances.dataset["images"]:
                    objects.setdefault(img["id"], set())
            except KeyError as err:
                raise DataFileError(f"{instances_file}: an annotation or category lacks {err}") from None
            for ann in quiet_coco(captions_file).dataset["annotations"]:
                if not isinstance(ann.get("caption"), str):
                    raise DataFileError(f"{captions_file}: annotation {short(ann)} has no caption string")
                captions.setdefault(ann["image_id"], []).append(ann["caption"])
        return cls(objects, captions, vocabulary)


class Chair:
    """CHAIR scorer. ``Chair(ground_truth).score(captions)``.

    The ground truth's objects must all be classes of ``vocabulary`` (default: COCO's): otherwise
    :class:`DataFileError` names the missing objects (see the module docstring).
    """

    def __init__(self, ground_truth: GroundTruth, vocabulary: ChairVocabulary | None = None):
        self.ground_truth = ground_truth
        self.vocabulary = vocabulary or ChairVocabulary.from_file()
        check_vocabulary(ground_truth, self.vocabulary)

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
        """Score ``(image_id, caption)`` pairs; ``bootstrap`` resamples give 95% percentile intervals.

        One caption per image id (a repeated id is refused, naming the positions). Captions that are
        all empty raise :class:`EmptyOutputsError`; a few empty ones among real captions are scored as
        the reference scores them (no mention, nothing recalled, length 0).
        """
        check_bootstrap(bootstrap)
        pairs = list(captions)
        if not pairs:
            raise DataFileError("no captions to score")
        where: dict[int, list[str]] = {}
        for i, (image_id, _) in enumerate(pairs, 1):
            where.setdefault(int(image_id), []).append(f"caption {i}")
        check_one_caption_per_image(where, "")
        check_not_all_empty([caption for _, caption in pairs], "captions")
        results = [self.score_caption(image_id, caption) for image_id, caption in pairs]
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


def check_vocabulary(ground_truth: Mapping[int, Iterable[str]], vocabulary: ChairVocabulary) -> None:
    """Refuse a ground truth with objects that are no class of ``vocabulary``."""
    if isinstance(ground_truth, GroundTruth):
        annotated = ground_truth.annotated_objects()
    else:
        annotated = set().union(*map(set, ground_truth.values()))
    missing = sorted(annotated - vocabulary.objects())
    if not missing:
        return
    listed = repr(missing[:8])[:-1] + (", ...]" if len(missing) > 8 else "]")
    synonyms = [
        f"{m!r} is a synonym of {vocabulary.synonym_to_object[m]!r}"
        for m in missing
        if m in vocabulary.synonym_to_object
    ]
    hint = f" ({'; '.join(synonyms[:3])}: the ground truth must list class names)" if synonyms else ""
    source = "COCO synonyms" if vocabulary.source == COCO_VOCABULARY else vocabulary.source
    raise DataFileError(
        f"ground truth objects {listed} are not in the CHAIR vocabulary ({source}){hint}; "
        "pass --synonyms <its list>"
    )


def check_bootstrap(bootstrap: int) -> None:
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, numbers.Integral) or bootstrap < 0:
        raise VeridicalError(f"bootstrap must be a whole number >= 0 (0: no intervals), got {bootstrap!r}")


def check_one_caption_per_image(where: Mapping[int, Sequence[str]], prefix: str) -> None:
    """Refuse image ids listed more than once (``where``: id -> locations, ``prefix``: the file)."""
    repeated = {image_id: places for image_id, places in where.items() if len(places) > 1}
    if not repeated:
        return
    image_id, places = next(iter(repeated.items()))
    shown = ", ".join(places[:4]) + (", ..." if len(places) > 4 else "")
    others = f"; {len(repeated) - 1} other image id(s) repeat too" if len(repeated) > 1 else ""
    raise DataFileError(
        f"{prefix}image id {image_id} has {len(places)} captions ({shown}){others}: CHAIR scores one "
        "caption per image, as the reference's evaluation generates one; keep one caption per image id"
    )


def _image_id(value, where: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise DataFileError(f"{where}: image id {value!r} is not an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataFileError(f"{where}: image id {value!r} is not an integer") from None


def read_captions(
    path: str | Path, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[tuple[int, str]]:
    """``(image_id, caption)`` pairs from a JSON-lines or JSON-array file (UTF-8), one per image id."""
    pairs = []
    lines: dict[int, list[str]] = {}
    for where, record in read_located_records(path):
        if image_id_key not in record or caption_key not in record:
            raise DataFileError(f"{path}: {where} lacks {image_id_key!r} or {caption_key!r}: {short(record)}")
        if not isinstance(record[caption_key], str):
            raise DataFileError(f"{path}: {where}: {caption_key!r} is not a string")
        image_id = _image_id(record[image_id_key], f"{path}: {where}")
        lines.setdefault(image_id, []).append(where)
        pairs.append((image_id, record[caption_key]))
    check_one_caption_per_image(lines, f"{path}: ")
    return pairs


def load_chair(
    gt: str | Path | None = None,
    coco_annotations: str | Path | None = None,
    synonyms: str | Path | None = None,
    announce: bool = True,
) -> Chair:
    """The CHAIR scorer of ``veridical score chair`` / ``veridical eval chair``.

    Ground truth from exactly one of ``gt`` (a prepared JSON, see :meth:`GroundTruth.from_json`) or
    ``coco_annotations`` (a folder with ``instances_*.json`` and ``captions_*.json``). Vocabulary, in
    this order: ``synonyms`` if given; else a ``synonyms.txt`` in the annotation folder or beside the
    ``gt`` file (the data's own list, as the synthetic world's ``probe/`` folder carries; with
    ``announce``, its path is printed on stderr); else the COCO list shipped with veridical. Whichever
    it is, a ground truth with objects outside the vocabulary is refused (:func:`check_vocabulary`).
    """
    if (gt is None) == (coco_annotations is None):
        raise VeridicalError("CHAIR needs exactly one ground truth: --gt FILE or --coco-annotations DIR")
    if synonyms is None:
        found = (Path(coco_annotations) if coco_annotations is not None else Path(gt).parent) / SYNONYMS_FILE
        if found.is_file():
            synonyms = found
            if announce:
                print(
                    f"CHAIR vocabulary: {found} (found with the ground truth; --synonyms overrides)",
                    file=sys.stderr,
                )
    vocabulary = ChairVocabulary.from_file(synonyms)
    if coco_annotations is not None:
        return Chair(GroundTruth.from_coco(coco_annotations, vocabulary), vocabulary)
    return Chair(GroundTruth.from_json(gt), vocabulary)


class ChairScorer:
    """Per-sample records and metrics of a ``veridical eval chair`` run (``bootstrap`` checked at once,
    before any generation)."""

    def __init__(self, chair: Chair, bootstrap: int = 1000, seed: int = 0):
        check_bootstrap(bootstrap)
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

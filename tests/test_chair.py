import json
from pathlib import Path

import pytest

from veridical.cli import main
from veridical.evals.chair import Chair, ChairVocabulary, GroundTruth, read_captions
from veridical.evals.io import DataFileError
from veridical.evals.text import word_tokenize

DATA = Path(__file__).parent / "data" / "chair" / "opera_logs"
GT = DATA / "gt_objects_500_llava_minigpt4_shikra.json"


@pytest.fixture(scope="module")
def vocab():
    return ChairVocabulary.from_file()


def objects(vocab, caption):
    return vocab.caption_objects(caption)[1]


def test_synonyms_plurals_and_irregular_forms(vocab):
    assert objects(vocab, "Two puppies and three boys near the sofas.") == ["dog", "person", "couch"]
    # NLTK's tagger reads "geese" at the end of this list as an adjective, so the reference never
    # lemmatises it to "goose" (checked with NLTK 3.10 on the original tagger and WordNet 3.0).
    assert objects(vocab, "A couple of knives, mice and geese.") == ["knife", "mouse"]
    assert objects(vocab, "The geese are near a cat.") == ["bird", "cat"]  # here a noun
    # NLTK tags "seated" as a verb (lemma "seat" -> chair) and "skiing" as a noun (no skis).
    assert objects(vocab, "A man skiing and a woman seated.") == ["person", "person", "chair"]
    # WordNet keeps "men" as a lemma of its own, so the reference never counts "men" as persons.
    assert objects(vocab, "Two men and three women.") == ["person"]


def test_other_vocabularies_are_singularised_by_wordnet_rules():
    world = ChairVocabulary(["saucer", "sock, stocking"])
    assert world.caption_objects("two saucers and socks .")[1] == ["saucer", "sock"]


def test_double_words_and_qualified_animals(vocab):
    assert objects(vocab, "A hot dog next to two teddy bears.") == ["hot dog", "teddy bear"]
    assert objects(vocab, "A baby elephant and an adult giraffe.") == ["elephant", "giraffe"]
    assert objects(vocab, "The passenger train passed a passenger.") == ["train", "person"]
    assert objects(vocab, "Wine glasses on a dining table.") == ["wine glass", "dining table"]
    # A two-word phrase counts as one token for Len.
    assert vocab.caption_objects("a hot dog.")[2] == ["a", "hot dog", "."]


def test_toilet_seat_is_a_toilet_and_seats_vanish_near_toilets(vocab):
    assert objects(vocab, "A toilet seat is up.") == ["toilet"]
    assert objects(vocab, "The seat of the toilet is up.") == ["toilet"]
    assert objects(vocab, "A seat by the window.") == ["chair"]


def test_synonym_entries_with_a_leading_space_never_match(vocab):
    # "scooter,  motor bike" has two spaces: the reference's split(", ") yields " motor bike".
    assert " motor bike" in vocab.synonym_to_object
    assert "motorbike" in vocab.synonym_to_object
    assert objects(vocab, "a motor bike") == []  # merged into "motor bike", which is no synonym
    assert objects(vocab, "a cheesecake") == []  # "cake,  cheesecake" never matches


def test_tokenizer_follows_punkt_and_treebank_rules():
    # Punkt ends a sentence after "cat." (so "." is split off) but not after "dr." or "st.".
    assert word_tokenize("there is a cat. it sits.") == ["there", "is", "a", "cat", ".", "it", "sits", "."]
    assert word_tokenize("dr. smith on st. mark's.") == ["dr.", "smith", "on", "st.", "mark", "'s", "."]
    assert word_tokenize("the dog's bowl, (red) isn't full.") == [
        "the",
        "dog",
        "'s",
        "bowl",
        ",",
        "(",
        "red",
        ")",
        "is",
        "n't",
        "full",
        ".",
    ]


def test_metrics_on_a_hand_made_set(vocab):
    gt = GroundTruth({1: ["dog", "person"], 2: ["car"], 3: ["cat", "couch", "tv"]})
    result = Chair(gt, vocab).score(
        [
            (1, "A dog and a cat."),  # cat hallucinated
            (2, "A car on the road."),  # clean
            (3, "A cat on a sofa near a cat."),  # clean, cat twice
        ],
        bootstrap=0,
    )
    # 1 of 3 captions, 1 of 6 mentions; recall (1 + 1 + 2) / (2 + 1 + 3)
    assert result.metrics["CHAIRs"] == pytest.approx(100 / 3)
    assert result.metrics["CHAIRi"] == pytest.approx(100 / 6)
    assert result.metrics["Recall"] == pytest.approx(100 * 4 / 6)
    assert result.metrics["Len"] == pytest.approx((6 + 6 + 9) / 3)
    assert result.captions[0].hallucinated == ["cat"]


def test_bootstrap_intervals_bracket_the_estimate():
    gt = GroundTruth.from_json(GT)
    captions = read_captions(DATA / "llava-1.5" / "greedy.jsonl")[:150]
    result = Chair(gt).score(captions, bootstrap=200, seed=1)
    for name, (low, high) in result.intervals.items():
        assert low < result.metrics[name] < high


def test_unknown_image_and_bad_files_are_named(tmp_path):
    gt = GroundTruth({1: ["dog"]})
    with pytest.raises(DataFileError, match="image id 7"):
        Chair(gt).score([(7, "a dog")])
    bad = tmp_path / "caps.jsonl"
    bad.write_text('{"image_id": 1, "caption": "a dog"}\n{"image_id": 2\n')
    with pytest.raises(DataFileError, match="line 2"):
        read_captions(bad)
    bad.write_text('{"image_id": 1, "text": "a dog"}\n')
    with pytest.raises(DataFileError, match="caption"):
        read_captions(bad)


def golden(name):
    result = Chair(GroundTruth.from_json(GT)).score(read_captions(DATA / "llava-1.5" / f"{name}.jsonl"), 0)
    return {k: round(v, 1) for k, v in result.metrics.items()}


@pytest.mark.parametrize(
    "name, expected", [("greedy", (45.0, 12.7, 80.4, 96.9)), ("beam5", (48.8, 13.9, 80.3, 95.7))]
)
def test_golden_chair_matches_the_reference(name, expected):
    """OPERA's released LLaVA-1.5-7B captions score as the reference scorer scores them."""
    got = golden(name)
    assert (got["CHAIRs"], got["CHAIRi"], got["Recall"], got["Len"]) == expected


def test_ground_truth_from_coco_annotations(tmp_path, vocab):
    (tmp_path / "instances_val2014.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 18, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
                ],
                "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
            }
        )
    )
    (tmp_path / "captions_val2014.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1}, {"id": 2}],
                "annotations": [
                    {"id": 1, "image_id": 1, "caption": "A puppy and its owner."},
                    {"id": 2, "image_id": 2, "caption": "An empty room."},
                ],
            }
        )
    )
    gt = GroundTruth.from_coco(tmp_path, vocab)
    assert gt[1] == {"dog"} and gt[2] == set()
    assert (
        main(
            [
                "score",
                "chair",
                str(_write(tmp_path, [{"image_id": 1, "caption": "A dog and a man."}])),
                "--coco-annotations",
                str(tmp_path),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )


def _write(tmp_path, records):
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path

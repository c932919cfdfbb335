import json
from importlib import resources
from pathlib import Path

import pytest

from veridical.cli import main
from veridical.evals.io import DataFileError
from veridical.evals.pope import (
    Question,
    parse_llava,
    parse_opera,
    parse_vcd,
    pope_metrics,
    question_object,
    read_answers,
    read_questions,
    score_pope,
)
from veridical.evals.pope_build import build_pope

DATA = Path(__file__).parent / "data" / "pope"
SHIPPED = Path(str(resources.files("veridical.evals") / "data" / "pope"))


def test_metrics_from_a_known_confusion_matrix():
    # TP 3, FP 1, TN 4, FN 2
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    metrics, confusion = pope_metrics(preds, labels)
    assert confusion == {"TP": 3, "FP": 1, "TN": 4, "FN": 2}
    assert metrics["accuracy"] == pytest.approx(70.0)
    assert metrics["precision"] == pytest.approx(75.0)
    assert metrics["recall"] == pytest.approx(60.0)
    assert metrics["f1"] == pytest.approx(100 * 2 * 0.75 * 0.6 / 1.35)
    assert metrics["yes_ratio"] == pytest.approx(40.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("There is not a dog.", "no"),
        ("Yes. No other animals are present.", "yes"),  # only the first sentence counts
        ("No, there isn't.", "no"),
        ("NO", "yes"),  # the official rule is case-sensitive
        ("I don't see one", "yes"),  # "n't" is not a negation for LLaVA's rule
        ("", "yes"),
    ],
)
def test_llava_rule(text, expected):
    assert parse_llava(text) == expected


def test_opera_and_vcd_rules_differ_where_documented():
    assert parse_opera("NO") == "no" and parse_opera("I don't see one") == "no"
    assert parse_opera("Yes. No other animals.") == "no"  # OPERA does not cut at the first '.'
    assert parse_vcd("I do not know", "yes") == "no"
    assert parse_vcd("I do not know", "no") == "no"
    assert parse_vcd("Yes, I know", "no") == "no"  # "know" contains "no"


def test_question_object():
    assert question_object("Is there a dining table in the image?") == "dining table"
    assert question_object("Is there an apple in the image?") == "apple"
    assert question_object("Is there an umbrella in the imange?") == "umbrella"  # 2023 files' typo
    assert question_object("What is this?") is None


def _questions():
    return [
        Question(1, "a.jpg", "Is there a dog in the image?", "yes"),
        Question(2, "a.jpg", "Is there a cat in the image?", "no"),
    ]


def test_answers_are_matched_by_question_id():
    result = score_pope(_questions(), {2: "No.", 1: "Yes."})
    assert result.confusion == {"TP": 1, "FP": 0, "TN": 1, "FN": 0}
    with pytest.raises(DataFileError, match="no answer"):
        score_pope(_questions(), {1: "Yes."})
    with pytest.raises(DataFileError, match="unknown question_id"):
        score_pope(_questions(), {1: "Yes.", 2: "No", 3: "No"})
    with pytest.raises(ValueError, match="rule"):
        score_pope(_questions(), {1: "Yes.", 2: "No"}, rule="gpt")


def test_bad_files_are_named(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}\n')
    with pytest.raises(DataFileError, match="maybe"):
        read_questions(path)
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "t", "label": "yes"}\n' * 2)
    with pytest.raises(DataFileError, match="twice"):
        read_questions(path)
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 1, "text": "No"}\n')
    with pytest.raises(DataFileError, match="answered twice"):
        read_answers(answers)
    questions = str(SHIPPED / "coco" / "coco_pope_random.json")
    assert main(["score", "pope", str(answers), "--questions", questions]) == 2


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("**/*_pope_*.json")), ids=lambda p: p.stem)
def test_shipped_question_files_load(path):
    """Every question file shipped with veridical parses, with balanced labels and an object each."""
    questions = read_questions(path)
    assert {q.label for q in questions} == {"yes", "no"}
    assert all(q.object for q in questions)


def test_llava_15_13b_released_answers_give_its_published_pope_f1(tmp_path, capsys):
    """LLaVA-1.5-13B reports POPE F1 85.9 (mean of the three COCO splits, 2023-05-31 questions)."""
    tests = [json.loads(line) for line in open(DATA / "llava_pope_test.jsonl")]
    category = {t["question_id"]: t["category"] for t in tests}
    answers = [json.loads(line) for line in open(DATA / "answers_llava-v1.5-13b_commit32cebc3.jsonl")]
    f1 = []
    for split in ("adversarial", "popular", "random"):
        questions = read_questions(SHIPPED / "coco_v2023_05_31" / f"coco_pope_{split}.json")
        split_answers = [a for a in answers if category[a["question_id"]] == split]
        # LLaVA's evaluation pairs each split's answers with its question file in order.
        path = tmp_path / f"{split}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"question_id": q.question_id, "text": a["text"]}) + "\n"
                for q, a in zip(questions, split_answers, strict=True)
            )
        )
        assert (
            main(
                [
                    "score",
                    "pope",
                    str(path),
                    "--questions",
                    str(SHIPPED / "coco_v2023_05_31" / f"coco_pope_{split}.json"),
                    "--json",
                ]
            )
            == 0
        )
        out = json.loads(capsys.readouterr().out)
        assert set(out) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
        f1.append(out["f1"])
    assert round(sum(f1) / 3, 1) == 85.9
    assert round(f1[2], 1) == 87.1  # random split


def _image_objects():
    # 8 images; "fork" always with "knife", "cup" often with "saucer".
    return {
        "1.jpg": ["person", "fork", "knife", "cup"],
        "2.jpg": ["fork", "knife", "dog"],
        "3.jpg": ["cup", "saucer", "person"],
        "4.jpg": ["person", "car", "dog"],
        "5.jpg": ["fork", "knife", "cup", "saucer"],
        "6.jpg": ["person", "dog", "car", "bus"],
        "7.jpg": ["cup", "saucer", "cat"],
        "8.jpg": ["dog"],
    }


@pytest.mark.parametrize("strategy", ["random", "popular", "adversarial"])
def test_built_sets_are_balanced_and_duplicate_free(strategy):
    questions = build_pope(_image_objects(), strategy, num_images=7, positives=3, seed=0)
    assert len(questions) == 7 * 6
    assert [q["question_id"] for q in questions] == list(range(1, 43))
    assert [q["label"] for q in questions[:6]] == ["yes", "no"] * 3
    for image in {q["image"] for q in questions}:
        asked = [question_object(q["text"]) for q in questions if q["image"] == image]
        assert len(asked) == len(set(asked)) == 6
        present = set(_image_objects()[image])
        for q in questions:
            if q["image"] == image:
                assert (question_object(q["text"]) in present) == (q["label"] == "yes")
    assert questions == build_pope(_image_objects(), strategy, num_images=7, positives=3, seed=0)


def _negatives(questions):
    by_image = {}
    for q in questions:
        by_image.setdefault(q["image"], []).append(question_object(q["text"]))
    return by_image


def test_adversarial_negatives_are_the_most_co_occurring_absent_objects():
    objects = _image_objects()
    questions = build_pope(objects, "adversarial", num_images=7, positives=3, seed=0)
    asked = _negatives(questions)
    sampled = list(asked)
    for image, names in asked.items():
        for k in range(3):
            positive, negative = names[2 * k], names[2 * k + 1]
            counts = {
                o: sum(positive in objects[i] and o in objects[i] for i in sampled)
                for o in {o for i in sampled for o in objects[i]} - {positive}
            }
            allowed = {
                o: c for o, c in counts.items() if o not in objects[image] and o not in names[: 2 * k + 1]
            }
            if allowed and max(allowed.values()) > 0:
                assert counts[negative] == max(allowed.values()), (image, positive, negative)


def test_popular_negatives_are_the_most_frequent_absent_objects():
    objects = _image_objects()
    asked = _negatives(build_pope(objects, "popular", num_images=7, positives=3, seed=0))
    frequency = {o: sum(o in objects[i] for i in asked) for i in asked for o in objects[i]}
    for image, names in asked.items():
        for k in range(3):
            negative = names[2 * k + 1]
            allowed = [o for o in frequency if o not in objects[image] and o not in names[: 2 * k + 1]]
            if allowed:
                assert frequency[negative] == max(frequency[o] for o in allowed)


def test_too_few_images_is_an_error():
    with pytest.raises(DataFileError, match="only"):
        build_pope(_image_objects(), "random", num_images=20)


def test_pope_from_a_hugging_face_dataset_with_images(tmp_path):
    """The lmms-lab/POPE layout (question, answer, category, image), loaded offline from local files."""
    from datasets import Dataset
    from PIL import Image

    from veridical.evals.samples import pope_hf_samples

    image = Image.new("RGB", (8, 8), (200, 10, 10))
    Dataset.from_dict(
        {
            "question_id": ["1", "2", "3"],
            "question": ["Is there a dog in the image?"] * 3,
            "answer": ["yes", "no", "Yes"],
            "category": ["random", "adversarial", "random"],
            "image_source": ["a", "b", "c"],
            "image": [image] * 3,
        }
    ).to_parquet(tmp_path / "test.parquet")
    samples = pope_hf_samples(str(tmp_path), split="test", category="random")
    assert [s.sample_id for s in samples] == ["q1", "q3"]
    assert [s.meta["label"] for s in samples] == ["yes", "yes"]
    assert samples[0].load_image().size == (8, 8)


def test_eval_counts_and_warns_about_empty_answers():
    from veridical.evals.pope import PopeScorer

    records = [
        {"answer": "yes", "label": "no", "output": ""},
        {"answer": "no", "label": "no", "output": "No."},
    ]
    with pytest.warns(UserWarning, match="1 of 2 POPE answers are empty"):
        result = PopeScorer().score(records)
    assert result["empty_answers"] == 1 and result["accuracy"] == 50.0

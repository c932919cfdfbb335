"""Bad data files, repeated ids, empty runs and a vocabulary that does not fit: each is one clear error.

Every expectation here comes from how the test builds its input (the line that holds the bad byte, the
ids it repeats, the objects it annotates), never from the code under test.
"""

import gzip
import json
import re
from pathlib import Path

import pytest

from veridical.cli import main
from veridical.errors import VeridicalError
from veridical.evals import pope_build
from veridical.evals.chair import (
    Chair,
    ChairScorer,
    ChairVocabulary,
    GroundTruth,
    default_synonyms_path,
    load_chair,
    read_captions,
)
from veridical.evals.io import DataFileError, EmptyOutputsError, read_jsonl_resilient, read_records
from veridical.evals.pope import PopeScorer, Question, read_answers, read_questions, score_pope
from veridical.evals.samples import chair_samples, pope_samples
from veridical.evals.world.scenes import CLASSES

#: Latin-1 bytes (what a file saved in another encoding holds): 0xe9 is "é", invalid in UTF-8.
LATIN1 = "caf\u00e9".encode("latin-1")
EMPTY_RUN = re.escape(
    "empty: generation produced nothing (check the method's hyper-parameters and max_new_tokens)"
)


def _lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _question(qid: int, label: str = "yes", text: str = "Is there a dog in the image?") -> bytes:
    return json.dumps({"question_id": qid, "image": "a.jpg", "text": text, "label": label}).encode()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("veridical: error: "), err
    return err[0]


# -- 1. files that are not UTF-8, empty, or of another shape ------------------------------------------


def test_non_utf8_json_lines_name_the_file_and_the_line(tmp_path):
    # The bad byte sits on line 3 of each file.
    questions = _lines(
        tmp_path / "q.jsonl", [_question(1), _question(2, "no"), b'{"text": "' + LATIN1 + b'"}']
    )
    with pytest.raises(DataFileError, match=rf"{questions}: line 3 is not UTF-8"):
        read_questions(questions)
    answers = _lines(
        tmp_path / "a.jsonl", [b'{"question_id": 1, "text": "Yes"}', b"", b'{"text": "' + LATIN1]
    )
    with pytest.raises(DataFileError, match=rf"{answers}: line 3 is not UTF-8"):
        read_answers(answers)
    captions = _lines(tmp_path / "c.json", [b"[", b'{"image_id": 1, "caption": "a dog"},', LATIN1, b"]"])
    with pytest.raises(DataFileError, match=rf"{captions}: line 3 is not UTF-8"):
        read_captions(captions)


def test_non_utf8_ground_truth_synonyms_and_coco_files_name_the_line(tmp_path):
    gt = _lines(tmp_path / "gt.json", [b"{", b'"1": ["dog"],', b'"2": ["' + LATIN1 + b'"]', b"}"])
    with pytest.raises(DataFileError, match=rf"{gt}: line 3 is not UTF-8"):
        GroundTruth.from_json(gt)
    gz = tmp_path / "gt.json.gz"
    gz.write_bytes(gzip.compress(gt.read_bytes()))
    with pytest.raises(DataFileError, match=rf"{gz}: line 3 is not UTF-8"):
        GroundTruth.from_json(gz)
    synonyms = _lines(tmp_path / "syn.txt", [b"dog, puppy", LATIN1 + b", coffee"])
    with pytest.raises(DataFileError, match=rf"{synonyms}: line 2 is not UTF-8"):
        ChairVocabulary.from_file(synonyms)
    coco = tmp_path / "coco"
    coco.mkdir()
    instances = _lines(
        coco / "instances_val2014.json",
        [b'{"images": [],', b'"annotations": [], "categories": [],', b'"info": "' + LATIN1 + b'"}'],
    )
    (coco / "captions_val2014.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataFileError, match=rf"{instances}: line 3 is not UTF-8"):
        GroundTruth.from_coco(coco, ChairVocabulary.from_file())
    with pytest.raises(DataFileError, match=rf"{instances}: line 3 is not UTF-8"):
        pope_build.coco_image_objects(instances)


def test_a_run_file_with_a_non_utf8_line_is_named(tmp_path):
    samples = _lines(
        tmp_path / "samples.rank0.jsonl", [b'{"sample_id": "q1"}', b'{"output": "' + LATIN1 + b'"}']
    )
    with pytest.raises(DataFileError, match=rf"{samples}: line 2 is not UTF-8"):
        read_jsonl_resilient(samples)


def test_the_cli_prints_one_line_for_a_non_utf8_file(tmp_path, capsys):
    questions = _lines(tmp_path / "q.jsonl", [_question(1), _question(2, "no")])
    answers = _lines(
        tmp_path / "a.jsonl",
        [b'{"question_id": 1, "text": "Yes"}', b'{"question_id": 2, "text": "' + LATIN1 + b'"}'],
    )
    assert main(["score", "pope", str(answers), "--questions", str(questions)]) == 2
    assert f"{answers}: line 2 is not UTF-8" in _one_error_line(capsys)


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _question(7) + b"\n")
    assert [q.question_id for q in read_questions(path)] == [7]


def test_empty_files_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    for read in (read_questions, read_answers, read_captions, GroundTruth.from_json):
        with pytest.raises(DataFileError, match=rf"{empty} is empty"):
            read(empty)
    array = tmp_path / "array.json"
    array.write_text("[]")
    with pytest.raises(DataFileError, match="no records"):
        read_answers(array)
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("\n\n")
    with pytest.raises(DataFileError, match="no object names"):
        ChairVocabulary.from_file(synonyms)
    with pytest.raises(DataFileError, match="cannot read"):
        ChairVocabulary.from_file(tmp_path / "missing.txt")


def test_files_of_another_shape_get_one_short_line(tmp_path):
    # A pretty-printed mapping (a ground-truth file) given where records are expected.
    mapping = tmp_path / "gt.json"
    mapping.write_text(json.dumps({"1": ["dog"], "2": ["cat"]}, indent=2))
    with pytest.raises(DataFileError, match="holds one JSON object, not records"):
        read_captions(mapping)
    # COCO annotations on one line given as questions: one record that is no question, quoted short.
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(500)]}))
    with pytest.raises(DataFileError, match="line 1 lacks question_id") as err:
        read_questions(coco)
    assert len(str(err.value)) < 300
    # A ground truth that is a list, or maps ids to something else than lists of names.
    listed = tmp_path / "list.json"
    listed.write_text('[["dog"]]')
    with pytest.raises(DataFileError, match="got a JSON list"):
        GroundTruth.from_json(listed)
    for objects in ('"dog"', "[3]"):
        listed.write_text(f'{{"1": ["dog"], "2": {objects}}}')
        with pytest.raises(DataFileError, match="image '2': expected a list of object names"):
            GroundTruth.from_json(listed)
    listed.write_text('{"x1": ["dog"]}')
    with pytest.raises(DataFileError, match="image id 'x1' is not an integer"):
        GroundTruth.from_json(listed)
    # COCO files without their lists, or with an annotation pycocotools cannot index.
    folder = tmp_path / "coco"
    folder.mkdir()
    (folder / "instances_val2014.json").write_text('{"images": [], "categories": []}')
    (folder / "captions_val2014.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataFileError, match="no 'annotations' list"):
        GroundTruth.from_coco(folder, ChairVocabulary.from_file())
    (folder / "instances_val2014.json").write_text(
        '{"images": [], "categories": [], "annotations": [{"image_id": 1, "category_id": 1}]}'
    )
    with pytest.raises(DataFileError, match="lacks the key 'id'"):
        pope_build.coco_image_objects(folder / "instances_val2014.json")
    # Records that are not objects.
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("1\n2\n")
    with pytest.raises(DataFileError, match="line 1 is not a JSON object"):
        read_records(numbers)


def test_missing_image_folders_and_sample_counts_are_named(tmp_path):
    with pytest.raises(DataFileError, match="image folder .*nowhere does not exist"):
        chair_samples(tmp_path / "nowhere", [1], num_images=1)
    questions = _lines(tmp_path / "q.jsonl", [_question(1)])
    with pytest.raises(DataFileError, match="image folder .*nowhere does not exist"):
        pope_samples(questions, tmp_path / "nowhere")
    with pytest.raises(DataFileError, match="whole number >= 1, got 0"):
        chair_samples(tmp_path, [1], num_images=0)
    with pytest.raises(DataFileError, match="num_images must be a whole number >= 1, got 0"):
        pope_build.build_pope({"a.jpg": ["dog", "cat", "car"]}, "random", num_images=0)
    with pytest.raises(DataFileError, match="cannot write"):
        pope_build.write_questions([{"question_id": 1}], Path("/proc/veridical/q.json"))


# -- 2. one caption per image, one answer per question -----------------------------------------------


def test_repeated_image_ids_in_a_captions_file_are_refused_with_their_lines(tmp_path):
    path = tmp_path / "captions.jsonl"
    records = [(1, "a dog"), (2, "a cat"), (1, "a dog and a cat"), (3, "a car"), (2, "x")]
    path.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in records))
    with pytest.raises(DataFileError, match=r"image id 1 has 2 captions \(line 1, line 3\); 1 other"):
        read_captions(path)


def test_repeated_image_ids_given_to_the_scorer_are_refused():
    chair = Chair(GroundTruth({1: ["dog"], 2: ["cat"]}))
    # Counted twice, the first image would make CHAIR_s 2/3 instead of 1/2.
    with pytest.raises(DataFileError, match=r"image id 1 has 2 captions \(caption 1, caption 3\)"):
        chair.score([(1, "a cat"), (2, "a cat"), (1, "a cat")], bootstrap=0)


def test_repeated_question_ids_are_refused_wherever_they_come_from(tmp_path):
    questions = [
        Question(1, "a.jpg", "Is there a dog in the image?", "yes"),
        Question(2, "a.jpg", "Is there a cat in the image?", "no"),
        Question(1, "a.jpg", "Is there a dog in the image?", "yes"),
    ]
    with pytest.raises(DataFileError, match=r"question_id 1 appears 2 times \(questions 1, 3\)"):
        score_pope(questions, {1: "Yes", 2: "No"})
    records = [
        {"question_id": 5, "label": "yes", "answer": "yes", "output": "Yes"},
        {"question_id": 5, "label": "yes", "answer": "yes", "output": "Yes"},
    ]
    with pytest.raises(DataFileError, match="question_id 5 appears 2 times"):
        PopeScorer().score(records)
    path = _lines(tmp_path / "q.jsonl", [_question(1), _question(2, "no"), _question(1)])
    with pytest.raises(DataFileError, match=r"question_id 1 appears twice \(line 1 and line 3\)"):
        read_questions(path)
    answers = _lines(
        tmp_path / "a.jsonl", [b'{"question_id": 4, "text": "Yes"}', b'{"question_id": 4, "text": "No"}']
    )
    with pytest.raises(DataFileError, match=r"answered twice \(line 1 and line 2\)"):
        read_answers(answers)


# -- 3. a run whose outputs are all empty is no score ------------------------------------------------


def test_all_empty_captions_are_an_error_a_few_are_scored():
    chair = Chair(GroundTruth({1: ["dog"], 2: ["cat"], 3: ["car"]}))
    with pytest.raises(EmptyOutputsError, match=f"^all 3 captions are {EMPTY_RUN}; nothing scored$"):
        chair.score([(1, ""), (2, "  "), (3, "\n")])
    scorer = ChairScorer(chair, bootstrap=0)
    with pytest.raises(EmptyOutputsError, match="all 2 captions are empty"):
        scorer.score([{"image_id": 1, "output": ""}, {"image_id": 2, "output": ""}])
    # One empty caption among real ones counts as a caption with no mention (the reference's rule):
    # CHAIR_s 1/3 (caption 1 names a cat), CHAIR_i 1 of 3 mentions, recall (1 + 1 + 0) / 3,
    # Len (4 + 2 + 0) / 3.
    result = chair.score([(1, "a dog and cat"), (2, "a cat"), (3, "")], bootstrap=0)
    expected = {"CHAIRs": 100 / 3, "CHAIRi": 100 / 3, "Recall": 200 / 3, "Len": 2.0}
    assert result.metrics == pytest.approx(expected)


def test_all_empty_answers_are_an_error_a_few_are_scored():
    questions = [Question(1, "a.jpg", "q", "yes"), Question(2, "a.jpg", "q", "no")]
    with pytest.raises(EmptyOutputsError, match=f"^all 2 answers are {EMPTY_RUN}; nothing scored$"):
        score_pope(questions, {1: "", 2: " "})
    records = [{"question_id": i, "label": "no", "answer": "yes", "output": ""} for i in (1, 2)]
    with pytest.raises(EmptyOutputsError, match="all 2 answers are empty"):
        PopeScorer().score(records)
    # The LLaVA rule reads "" as yes: TP 1 (question 1), FP 0, TN 1 -> accuracy 100.
    assert score_pope(questions, {1: "", 2: "No"}).metrics["accuracy"] == 100.0


def test_the_cli_refuses_an_all_empty_captions_file(tmp_path, capsys):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"1": ["dog"], "2": ["cat"]}))
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image_id": 1, "caption": ""}\n{"image_id": 2, "caption": ""}\n')
    assert main(["score", "chair", str(captions), "--gt", str(gt)]) == 2
    assert "all 2 captions are empty" in _one_error_line(capsys)


# -- 4. the vocabulary must fit the ground truth; bootstrap >= 0 ---------------------------------------


def test_ground_truth_outside_the_vocabulary_is_refused():
    with pytest.raises(
        DataFileError,
        match=r"objects \['cube', 'sphere'\] are not in the CHAIR vocabulary \(COCO synonyms\); "
        "pass --synonyms",
    ):
        Chair(GroundTruth({1: ["dog", "cube"], 2: ["sphere"]}))
    # A synonym is no class name: captions saying "puppy" count as "dog".
    with pytest.raises(DataFileError, match="'puppy' is a synonym of 'dog'"):
        Chair(GroundTruth({1: ["puppy"]}))
    vocabulary = ChairVocabulary(["cube, box", "sphere"], source="shapes.txt")
    assert (
        Chair(GroundTruth({1: ["cube"], 2: ["sphere"]}), vocabulary)
        .score([(1, "a box"), (2, "a cube")], 0)
        .metrics["CHAIRs"]
        == 50.0
    )


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    """The world's data as ``write_world_data`` lays it out (its POPE co-occurrence ranking, which
    needs 5000 scenes, replaced by an empty one: only the CHAIR files matter here)."""
    from veridical.evals.world import evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "co_occurrence", lambda: {c: [] for c in CLASSES})
        return evaluate.write_world_data(tmp_path_factory.mktemp("world"), probes=6, seed=5)


def test_world_data_bring_their_vocabulary_and_the_coco_list_is_refused(world_data, capsys):
    probe = world_data / "probe"
    instances = json.loads((probe / "instances_val2014.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    drawn = {names[a["category_id"]] for a in instances["annotations"]}
    # Picked up from the annotation folder, and said so.
    chair = load_chair(coco_annotations=probe)
    assert chair.vocabulary.source == str(probe / "synonyms.txt")
    assert chair.vocabulary.objects() == set(CLASSES)
    assert f"CHAIR vocabulary: {probe / 'synonyms.txt'}" in capsys.readouterr().err
    # The COCO list lacks most world classes ("saucer", "sock", ...): refused, naming them. Names
    # the COCO list knows as some class's synonym ("ball" -> "sports ball") are read as that class.
    text = default_synonyms_path().read_text(encoding="utf-8")
    not_coco = sorted(drawn - {name for line in text.splitlines() for name in line.strip().split(", ")})
    assert not_coco  # the probe scenes draw world-only classes
    with pytest.raises(
        DataFileError, match=rf"objects \[{', '.join(map(repr, not_coco[:8]))}.*COCO synonyms"
    ):
        load_chair(coco_annotations=probe, synonyms=default_synonyms_path())


def test_the_cli_scores_world_captions_with_the_world_vocabulary(world_data, tmp_path, capsys):
    probe = world_data / "probe"
    truth = {
        c["image_id"]: c["caption"]
        for c in json.loads((probe / "captions_val2014.json").read_text())["annotations"]
    }
    # The reference captions name exactly the drawn objects: no hallucination, full recall.
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in truth.items()))
    argv = ["score", "chair", str(captions), "--coco-annotations", str(probe), "--json", "--bootstrap", "0"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["CHAIRs"], out["CHAIRi"], out["Recall"]) == (0.0, 0.0, 100.0)


def test_without_a_vocabulary_beside_it_world_ground_truth_is_refused(world_data, tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    for name in ("instances_val2014.json", "captions_val2014.json"):
        (folder / name).write_bytes((world_data / "probe" / name).read_bytes())
    with pytest.raises(
        DataFileError, match=r"not in the CHAIR vocabulary \(COCO synonyms\); pass --synonyms"
    ):
        load_chair(coco_annotations=folder)
    # Beside a --gt file, the same rule.
    gt = tmp_path / "gt" / "gt.json"
    gt.parent.mkdir()
    gt.write_text(json.dumps({"1": ["saucer"]}))
    with pytest.raises(DataFileError, match=r"\['saucer'\]"):
        load_chair(gt=gt)
    (gt.parent / "synonyms.txt").write_text("saucer, plate\n")
    assert load_chair(gt=gt, announce=False).vocabulary.objects() == {"saucer"}
    with pytest.raises(VeridicalError, match="exactly one ground truth"):
        load_chair()


def test_a_negative_bootstrap_is_refused():
    chair = Chair(GroundTruth({1: ["dog"]}))
    with pytest.raises(VeridicalError, match="bootstrap must be a whole number >= 0.*got -1"):
        chair.score([(1, "a dog")], bootstrap=-1)
    with pytest.raises(VeridicalError, match="bootstrap"):
        ChairScorer(chair, bootstrap=-5)  # before any generation

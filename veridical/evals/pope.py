"""POPE: Polling-based Object Probing Evaluation (Li et al., EMNLP 2023).

Questions "Is there a {object} in the image?" with yes/no labels. Answers are parsed into yes/no by a
rule (the official POPE/LLaVA rule by default) and scored with "yes" as the positive class. Answers
are matched to questions by ``question_id``; a missing, unknown or duplicate id is an error, never a
silent "yes" or a question counted twice (in a question file, an answers file, the question list given
to :func:`score_pope` or the records given to :class:`PopeScorer`).

The reference rules read an empty answer as "yes". A few empty answers among real ones are scored so
(and counted, with a warning, in ``veridical eval``); answers that are all empty are refused
(:class:`~veridical.evals.io.EmptyOutputsError`): a run that generated nothing has no score.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from veridical.evals.io import DataFileError, check_not_all_empty, read_located_records, short

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_llava(text: str, label: str | None = None) -> str:
    """Official POPE / LLaVA rule: the text before the first '.', commas removed, split on spaces;
    "No", "not" or "no" among the words means no, anything else yes."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def parse_opera(text: str, label: str | None = None) -> str:
    """OPERA's rule (``pope_eval.py``): '.' and ',' removed everywhere, split on spaces; "No", "not",
    "no", "NO" or a word ending in "n't" means no."""
    words = text.replace(".", "").replace(",", "").split(" ")
    negative = any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words)
    return "no" if negative else "yes"


def parse_vcd(text: str, label: str | None = None) -> str:
    """VCD's rule (``eval_pope.py``), which looks at the label: for a "yes" question the answer counts
    as yes when it contains "yes"; for a "no" question it counts as no when it contains "no" (both
    lower-cased substrings, so "not" and "know" count as no)."""
    text = text.lower().strip()
    if label == "yes":
        return "yes" if "yes" in text else "no"
    return "no" if "no" in text else "yes"


PARSERS: dict[str, Callable[[str, str | None], str]] = {
    "llava": parse_llava,
    "opera": parse_opera,
    "vcd": parse_vcd,
}


def get_parser(rule: str) -> Callable[[str, str | None], str]:
    try:
        return PARSERS[rule]
    except KeyError:
        raise ValueError(f"unknown POPE answer rule {rule!r}; choose one of {', '.join(PARSERS)}") from None


@dataclass(frozen=True)
class Question:
    question_id: int
    image: str
    text: str
    label: str
    object: str | None = None


_QUESTION = re.compile(r"^is there (?:an? )?(.+?) in the im\w*\?", re.IGNORECASE)


def question_object(text: str) -> str | None:
    """The object of "Is there a(n) {object} in the image?", or None for other phrasings.

    The official builder's "an" template also turns "image" into "imange" (it replaces every "a"),
    which the 2023-05-31 COCO files keep; both spellings are recognised.
    """
    match = _QUESTION.match(text.strip())
    return match.group(1) if match else None


def read_questions(path: str | Path) -> list[Question]:
    """POPE questions from a JSON-lines file or a JSON array (UTF-8; ``question_id``, ``image``,
    ``text``, ``label``); each question id once."""
    questions, seen = [], {}
    for where, record in read_located_records(path):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in record]
        if missing:
            raise DataFileError(f"{path}: {where} lacks {', '.join(missing)}: {short(record)}")
        label = str(record["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise DataFileError(f"{path}: {where} has label {record['label']!r}, expected yes or no")
        for key in ("image", "text"):
            if not isinstance(record[key], str):
                raise DataFileError(f"{path}: {where}: {key!r} is not a string: {short(record[key])}")
        qid = _question_id(record["question_id"], f"{path}: {where}")
        if qid in seen:
            raise DataFileError(f"{path}: question_id {qid} appears twice ({seen[qid]} and {where})")
        seen[qid] = where
        questions.append(
            Question(qid, record["image"], record["text"], label, question_object(record["text"]))
        )
    return questions


def _question_id(value, where) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise DataFileError(f"{where}: question_id {value!r} is not an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataFileError(f"{where}: question_id {value!r} is not an integer") from None


def read_answers(path: str | Path) -> dict[int, str]:
    """``question_id -> text`` from a JSON-lines or JSON-array answers file (UTF-8); a question
    answered twice is an error naming both lines."""
    answers: dict[int, str] = {}
    seen: dict[int, str] = {}
    for where, record in read_located_records(path):
        if "question_id" not in record or "text" not in record:
            raise DataFileError(f"{path}: {where} lacks 'question_id' or 'text': {short(record)}")
        qid = _question_id(record["question_id"], f"{path}: {where}")
        if qid in answers:
            raise DataFileError(f"{path}: question_id {qid} is answered twice ({seen[qid]} and {where})")
        if not isinstance(record["text"], str):
            raise DataFileError(f"{path}: {where}: the answer to question {qid} is not a string")
        answers[qid], seen[qid] = record["text"], where
    return answers


def _refuse_repeats(question_ids: Iterable[int], what: str) -> None:
    positions: dict[int, list[int]] = {}
    for i, qid in enumerate(question_ids, 1):
        positions.setdefault(qid, []).append(i)
    repeated = {qid: at for qid, at in positions.items() if len(at) > 1}
    if repeated:
        qid, at = next(iter(repeated.items()))
        raise DataFileError(
            f"question_id {qid} appears {len(at)} times ({what}s {', '.join(map(str, at[:4]))}); "
            f"{len(repeated)} id(s) repeat: each question is scored once"
        )


@dataclass
class PopeResult:
    metrics: dict[str, float]
    confusion: dict[str, int]
    predictions: dict[int, str]


def pope_metrics(
    predictions: Iterable[str], labels: Iterable[str]
) -> tuple[dict[str, float], dict[str, int]]:
    """Percent accuracy, precision, recall, F1 (positive = yes) and yes-ratio, with the confusion matrix."""
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    total = tp + fp + tn + fn
    if total == 0:
        raise DataFileError("no answers to score")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    metrics = {
        "accuracy": 100.0 * (tp + tn) / total,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / total,
    }
    return metrics, {"TP": tp, "FP": fp, "TN": tn, "FN": fn}


def score_pope(questions: Iterable[Question], answers: Mapping[int, str], rule: str = "llava") -> PopeResult:
    """Score ``answers`` (question_id -> text) against ``questions``; every question needs one answer,
    and each question id appears once. Answers that are all empty raise
    :class:`~veridical.evals.io.EmptyOutputsError`; a few empty ones are scored by ``rule`` (as "yes"
    by the reference rules)."""
    parse = get_parser(rule)
    questions = list(questions)
    _refuse_repeats([q.question_id for q in questions], "question")
    known = {q.question_id for q in questions}
    unanswered = [q.question_id for q in questions if q.question_id not in answers]
    if unanswered:
        raise DataFileError(
            f"{len(unanswered)} question(s) have no answer, e.g. question_id {unanswered[:5]}"
        )
    extra = sorted(set(answers) - known)
    if extra:
        raise DataFileError(f"answers for unknown question_id(s) {extra[:5]}")
    check_not_all_empty([answers[q.question_id] for q in questions], "answers")
    predictions = {q.question_id: parse(answers[q.question_id], q.label) for q in questions}
    metrics, confusion = pope_metrics(
        (predictions[q.question_id] for q in questions), (q.label for q in questions)
    )
    return PopeResult(metrics, confusion, predictions)


class PopeScorer:
    """Per-sample records and metrics of a ``veridical eval pope`` run."""

    def __init__(self, rule: str = "llava"):
        self.rule = rule
        self.parse = get_parser(rule)

    def record(self, sample, output: str) -> dict:
        return {
            "question_id": sample.meta["question_id"],
            "label": sample.meta["label"],
            "answer": self.parse(output, sample.meta["label"]),
        }

    def score(self, records) -> dict:
        """Metrics of the run's records (one per question id). Outputs that are all empty raise
        :class:`~veridical.evals.io.EmptyOutputsError`; a few empty ones are scored as the rule reads
        them, counted in ``empty_answers`` and warned about."""
        _refuse_repeats([r["question_id"] for r in records if "question_id" in r], "record")
        check_not_all_empty([r["output"] for r in records if "output" in r], "answers")
        metrics, confusion = pope_metrics([r["answer"] for r in records], [r["label"] for r in records])
        # The reference rules read an empty answer as "yes"; count them so a broken run cannot hide.
        empty = sum(1 for r in records if not str(r.get("output", "x")).strip())
        if empty:
            warnings.warn(
                f"{empty} of {len(records)} POPE answers are empty and were scored as 'yes' by the "
                f"{self.rule} rule, as the reference scorer does",
                stacklevel=2,
            )
        return {**metrics, **confusion, "empty_answers": empty, "rule": self.rule}

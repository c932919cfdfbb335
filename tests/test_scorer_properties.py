"""Property tests of the scorers: arbitrary unicode never crashes them and metrics stay in range."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veridical.evals.chair import Chair, ChairVocabulary, GroundTruth
from veridical.evals.io import EmptyOutputsError
from veridical.evals.pope import PARSERS, Question, score_pope

VOCABULARY = ChairVocabulary.from_file()
OBJECT_WORDS = ["dog", "dogs", "cat", "a hot dog", "person", "men", "table", "dining table", "skis", "toilet"]
#: Captions mixing object words, punctuation and any unicode at all.
captions = st.lists(
    st.one_of(
        st.sampled_from(OBJECT_WORDS), st.text(max_size=12), st.sampled_from([".", ",", "!", "\n", " "])
    ),
    max_size=20,
).map(" ".join)
truths = st.lists(st.sampled_from(["dog", "cat", "person", "dining table", "toilet", "skis"]), max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(captions, truths), min_size=1, max_size=6))
def test_chair_never_crashes_and_stays_in_range(samples):
    truth = GroundTruth({i: objects for i, (_, objects) in enumerate(samples)})
    captions = [(i, caption) for i, (caption, _) in enumerate(samples)]
    if not any(caption.strip() for _, caption in captions):  # a run that generated nothing: no score
        with pytest.raises(EmptyOutputsError):
            Chair(truth, VOCABULARY).score(captions, bootstrap=20)
        return
    result = Chair(truth, VOCABULARY).score(captions, bootstrap=20)
    for key in ("CHAIRs", "CHAIRi", "Recall"):
        assert 0.0 <= result.metrics[key] <= 100.0 and not math.isnan(result.metrics[key])
        low, high = result.intervals[key]
        assert 0.0 <= low <= high <= 100.0
    assert result.metrics["Len"] >= 0
    for caption in result.captions:
        assert set(caption.hallucinated) <= set(caption.mentioned)
        assert set(caption.recalled) <= set(caption.ground_truth)


answers = st.one_of(
    st.text(), st.sampled_from(["Yes.", "No, there is not.", "yes", "I don't know", "NO", ""])
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(answers, st.sampled_from(["yes", "no"])), min_size=1, max_size=12),
    st.sampled_from(sorted(PARSERS)),
)
def test_pope_never_crashes_and_stays_in_range(pairs, rule):
    questions = [
        Question(i, "x.jpg", "Is there a dog in the image?", label) for i, (_, label) in enumerate(pairs)
    ]
    answers = {i: answer for i, (answer, _) in enumerate(pairs)}
    if not any(answer.strip() for answer in answers.values()):  # a run that generated nothing: no score
        with pytest.raises(EmptyOutputsError):
            score_pope(questions, answers, rule=rule)
        return
    result = score_pope(questions, answers, rule=rule)
    for value in result.metrics.values():
        assert 0.0 <= value <= 100.0
    assert sum(result.confusion.values()) == len(pairs)
    assert set(result.predictions.values()) <= {"yes", "no"}

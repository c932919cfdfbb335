"""Caption words as the reference CHAIR scorer reads them: NLTK's tokenizer, tagger and WordNet lemmatizer.

The reference (``chair.py`` of shikiw/OPERA and of lmms-eval, ``CHAIR.caption_to_words``) turns a caption
into words with NLTK::

    words = nltk.word_tokenize(caption.lower())      # Punkt sentences, then Treebank-style words
    tagged = nltk.pos_tag(words)                     # averaged-perceptron English tagger, whole caption
    lemmas = [WordNetLemmatizer().lemmatize(w, pos)  # pos from the tag's first letter: J -> a, V -> v,
              for w, tag in tagged]                  # N -> n, R -> r, anything else -> n

A word's tag depends on its neighbours ("skateboarding", "seated", "ties"), so only the tagger itself
reproduces the reference. This module runs the same NLTK classes (Punkt, the Treebank word tokenizer,
the perceptron tagger) on data shipped in ``data/nltk/`` (converted to pickle-free files by
``scripts/build_chair_nltk_data.py``; provenance in ``data/nltk/README.md``), so nothing is downloaded.
WordNet's lemmatizer is written out here (:func:`lemmatize`) because NLTK's class reads the global
``nltk.corpus.wordnet``, which needs the WordNet corpus installed as NLTK data; it follows
``WordNetLemmatizer.lemmatize`` and ``WordNetCorpusReader._morphy`` of NLTK 3.9-3.10 on WordNet 3.0's
lemma names and exception lists. ``tests/test_chair_oracle.py`` checks every token, tag and lemma of
6,000 released captions against NLTK's own pipeline on the original data.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from functools import cache
from importlib import resources

from nltk.tag.perceptron import PerceptronTagger
from nltk.tokenize.destructive import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

#: WordNet part of speech of a Penn Treebank tag's first letter; the reference falls back to nouns.
_WORDNET_POS = {"J": "a", "V": "v", "N": "n", "R": "r"}

#: WordNet's detachment rules (``WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS``), tried in this order.
_SUBSTITUTIONS = {
    "n": (
        ("s", ""),
        ("ses", "s"),
        ("ves", "f"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),
    "v": (
        ("s", ""),
        ("ies", "y"),
        ("es", "e"),
        ("es", ""),
        ("ed", "e"),
        ("ed", ""),
        ("ing", "e"),
        ("ing", ""),
    ),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}


def _data(name: str):
    return resources.files("veridical.evals") / "data" / "nltk" / name


def _read_json_gz(name: str) -> dict:
    return json.loads(gzip.decompress(_data(name).read_bytes()).decode("utf-8"))


@cache
def _sentence_splitter() -> PunktSentenceTokenizer:
    """Punkt with the English model's parameters (nltk_data's ``punkt_tab/english``)."""
    folder = _data("punkt_tab").joinpath("english")

    def rows(name: str) -> list[list[str]]:
        return [line.split("\t") for line in folder.joinpath(name).read_text(encoding="utf-8").splitlines()]

    params = PunktParameters()
    params.abbrev_types = {row[0] for row in rows("abbrev_types.txt")}
    params.sent_starters = {row[0] for row in rows("sent_starters.txt")}
    params.collocations = {tuple(row) for row in rows("collocations.tab")}
    params.ortho_context = defaultdict(int, {word: int(flags) for word, flags in rows("ortho_context.tab")})
    return PunktSentenceTokenizer(params)


@cache
def _word_tokenizer() -> NLTKWordTokenizer:
    return NLTKWordTokenizer()


@cache
def _tagger() -> PerceptronTagger:
    """NLTK's averaged-perceptron tagger with the English model behind ``nltk.pos_tag``."""
    model = _read_json_gz("averaged_perceptron_tagger_eng.json.gz")
    tagger = PerceptronTagger(load=False)
    tagger.model.weights = model["weights"]
    tagger.tagdict = model["tagdict"]
    tagger.classes = tagger.model.classes = set(model["classes"])
    return tagger


@cache
def _wordnet() -> tuple[dict[str, frozenset[str]], dict[str, dict[str, list[str]]]]:
    data = _read_json_gz("wordnet-3.0.json.gz")
    return {pos: frozenset(names) for pos, names in data["lemmas"].items()}, data["exceptions"]


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize``: Punkt's English sentences, each split by NLTK's Treebank word tokenizer."""
    tokenizer = _word_tokenizer()
    return [
        token for sentence in _sentence_splitter().tokenize(text) for token in tokenizer.tokenize(sentence)
    ]


def pos_tag(tokens: list[str]) -> list[tuple[str, str]]:
    """``nltk.pos_tag``: Penn Treebank tags of ``tokens`` tagged as one sequence."""
    return _tagger().tag(tokens)


def lemmatize(word: str, pos: str = "n") -> str:
    """``WordNetLemmatizer().lemmatize(word, pos)`` on WordNet 3.0.

    The candidates are ``word`` itself plus, if ``word`` is in the part of speech's exception list, its
    listed base forms, otherwise the results of each detachment rule; those that are WordNet lemmas of
    that part of speech are kept, in order, and the shortest (the first of equal length) is the lemma.
    Without any, the word is returned unchanged.
    """
    lemmas, exceptions = _wordnet()
    names = lemmas[pos]
    if word in exceptions[pos]:
        forms = exceptions[pos][word]
    else:
        forms = [word[: -len(old)] + new for old, new in _SUBSTITUTIONS[pos] if word.endswith(old)]
    found = [form for form in dict.fromkeys([word, *forms]) if form in names]
    return min(found, key=len) if found else word


def wordnet_pos(tag: str) -> str:
    """The reference's ``get_wordnet_pos(tag) or wordnet.NOUN``."""
    return _WORDNET_POS.get(tag[:1], "n")


def tagged_lemmas(caption: str) -> list[tuple[str, str, str]]:
    """``(token, tag, lemma)`` of every token of the lower-cased caption, as the reference reads it."""
    tagged = pos_tag(word_tokenize(caption.lower()))
    return [(word, tag, lemmatize(word, wordnet_pos(tag))) for word, tag in tagged]


def caption_lemmas(caption: str) -> list[str]:
    """The lemma of every token of the lower-cased caption (the words of the reference's CHAIR)."""
    return [lemma for _, _, lemma in tagged_lemmas(caption)]

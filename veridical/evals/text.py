"""Caption text processing that reproduces the reference CHAIR scorer without NLTK data.

The reference scorer (Rohrbach et al.'s CHAIR as modified in OPERA and lmms-eval) lower-cases a
caption, splits it into sentences with NLTK's pre-trained Punkt model, tokenises each sentence with
NLTK's Treebank-style word tokenizer, POS-tags the tokens and lemmatises them with WordNet. NLTK's data
(Punkt parameters, tagger weights, WordNet) cannot be installed from a package registry, so this module
re-implements the parts that decide CHAIR's numbers:

- sentence splitting: on lower-cased text Punkt breaks after every ``.``/``?``/``!`` token except
  ellipses, known abbreviations, and numbers or single letters followed by a lower-case word;
- word tokenisation: the Treebank rules (punctuation, quotes, brackets, clitics such as ``'s``);
- lemmatisation: only lemmas that can reach the COCO vocabulary matter, so nouns are singularised with
  WordNet's detachment rules and irregular plurals, accepted only when the result is a vocabulary word,
  and the verb forms the tagger marks as verbs in captions (``skiing``, ``seated``, ``tied``, ...) are
  mapped to their verb lemma as WordNet does.

The golden test (OPERA's released LLaVA-1.5 captions) checks that this reproduces the reference's
CHAIR_s, CHAIR_i, Recall and Len to the published digit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# -- sentence splitting (Punkt on lower-cased text) -------------------------------------------------

#: Abbreviations of Punkt's English model that occur in image descriptions.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr co inc ltd corp vs etc e.g i.e a.m p.m u.s u.k no approx dept mt ft oz lb".split()
)
_SENT_END = re.compile(r"[.?!](?=[)\";}\]*:@'({\[!?]|\s+\S)")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"^[^\W\d]\.$")


def split_sentences(text: str) -> list[str]:
    """Sentences of lower-cased ``text`` as Punkt's English model splits them."""
    sentences, start = [], 0
    for match in _SENT_END.finditer(text):
        end = match.end()
        token = text[:end].split()[-1] if text[:end].split() else ""
        if not _is_break(token, text[end:]):
            continue
        # Punkt realigns closing quotes and brackets to the sentence they close.
        end += len(re.match(r"[\"')\]}]*", text[end:]).group())
        sentences.append(text[start:end].strip())
        rest = text[end:]
        start = end + (len(rest) - len(rest.lstrip()) if rest[:1].isspace() else 0)
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


def _is_break(token: str, following: str) -> bool:
    if not token.endswith("."):
        return True  # '?' or '!'
    if re.search(r"\.\.+$", token):
        return False  # ellipsis
    core = token.lstrip("\"'([{")[:-1]
    if core in ABBREVIATIONS or core.split("-")[-1] in ABBREVIATIONS:
        return False
    next_token = following.split()[0] if following.split() else ""
    if (_NUMBER.match(core + ".") or _INITIAL.match(core + ".")) and next_token[:1].islower():
        return False  # Punkt's orthographic heuristic: a lower-case word does not start a sentence
    return True


# -- word tokenisation (Treebank rules) ------------------------------------------------------------

_STARTING_QUOTES = [
    (re.compile(r"([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r'^"'), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b"), r"\1 \2"),
]
_PUNCTUATION = [
    (re.compile(r"([^.])(\.)([\])}>\"']*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"([^.])(\.)([\])}>\"']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_BRACKETS = (re.compile(r"[\]\[(){}<>]"), r" \g<0> ")
_DOUBLE_DASH = (re.compile(r"--"), r" -- ")
_ENDING_QUOTES = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [
    re.compile(p)
    for p in (
        r"(?i)\b(can)(?#X)(not)\b",
        r"(?i)\b(d)(?#X)('ye)\b",
        r"(?i)\b(gim)(?#X)(me)\b",
        r"(?i)\b(gon)(?#X)(na)\b",
        r"(?i)\b(got)(?#X)(ta)\b",
        r"(?i)\b(lem)(?#X)(me)\b",
        r"(?i)\b(more)(?#X)('n)\b",
        r"(?i)\b(wan)(?#X)(na)(?=\s)",
        r"(?i) ('t)(?#X)(is)\b",
        r"(?i) ('t)(?#X)(was)\b",
    )
]


def tokenize_sentence(sentence: str) -> list[str]:
    """Treebank-style word tokens of one sentence."""
    text = sentence
    for pattern, repl in _STARTING_QUOTES + _PUNCTUATION + [_BRACKETS, _DOUBLE_DASH]:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _ENDING_QUOTES:
        text = pattern.sub(repl, text)
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Tokens of ``text``: sentence split first, then Treebank rules per sentence."""
    return [tok for sentence in split_sentences(text) for tok in tokenize_sentence(sentence)]


# -- lemmatisation restricted to a vocabulary ------------------------------------------------------

#: WordNet's noun detachment rules (suffix, replacement).
_NOUN_RULES = (
    ("s", ""),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
)
#: Irregular plurals from WordNet's noun exception list whose singular names a COCO object.
_IRREGULAR_PLURALS = {
    "children": "child",
    "grandchildren": "grandchild",
    "mice": "mouse",
    "knives": "knife",
    "geese": "goose",
    "oxen": "ox",
    "calves": "calf",
    "thieves": "thief",
    "women": "woman",
    "men": "man",
    "gentlemen": "gentleman",
    "policemen": "policeman",
    "servicemen": "serviceman",
}
#: Verb forms the reference's tagger marks as verbs in captions, with WordNet's verb lemma.
VERB_LEMMAS = {
    "skiing": "ski",
    "skied": "ski",
    "snowboarding": "snowboard",
    "skateboarding": "skateboard",
    "biking": "bike",
    "biked": "bike",
    "seated": "seat",
    "tied": "tie",
    "tying": "tie",
}


class Lemmatizer:
    """Lemmas of tokens, exact for every word that can reach ``vocabulary``."""

    def __init__(self, vocabulary: Iterable[str]):
        self.vocabulary = frozenset(vocabulary)

    def __call__(self, token: str) -> str:
        if token in VERB_LEMMAS:
            return VERB_LEMMAS[token]
        if token in _IRREGULAR_PLURALS:
            return _IRREGULAR_PLURALS[token]
        # WordNet keeps every candidate that is a known lemma and returns the shortest.
        candidates = [token] + [token[: -len(old)] + new for old, new in _NOUN_RULES if token.endswith(old)]
        known = [c for c in candidates if c in self.vocabulary]
        return min(known, key=len) if known else token

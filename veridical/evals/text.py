"""Caption text processing that reproduces the reference CHAIR scorer without NLTK data.

The reference scorer (Rohrbach et al.'s CHAIR as modified in OPERA and lmms-eval) lower-cases a
caption, splits it into sentences with NLTK's pre-trained Punkt model, tokenises each sentence with
NLTK's Treebank-style word tokenizer, POS-tags the tokens and lemmatises them with WordNet. NLTK's data
(Punkt parameters, tagger weights, WordNet) cannot be installed from a package registry, so this module
re-implements the parts that decide CHAIR's numbers:

- sentence splitting: on lower-cased text Punkt breaks after every ``.``/``?``/``!`` token except
  ellipses, known abbreviations, and numbers or single letters followed by a lower-case word;
- word tokenisation: the Treebank rules (punctuation, quotes, brackets, clitics such as ``'s``);
- lemmatisation: only lemmas that can reach the COCO vocabulary matter. ``data/coco_lemmas.json`` holds
  WordNet 3.0's noun lemma of every surface form through which WordNet can reach a vocabulary word
  (generated once by ``scripts/build_chair_lemmas.py``; note WordNet keeps "men" as "men"), and the
  verb lemma of the -ing/-ed forms NLTK's tagger marks as verbs in captions ("skateboarding", "seated",
  "tied", "tying"; "skiing" and "snowboarding" are tagged as nouns).

The golden test (OPERA's released LLaVA-1.5 captions) checks that this reproduces the reference's
CHAIR_s, CHAIR_i, Recall and Len to the published digit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources

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


# -- lemmatisation ------------------------------------------------------------------------------

#: WordNet's noun detachment rules (suffix, replacement), for vocabularies beyond COCO's.
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


@cache
def coco_lemma_table() -> dict:
    """The lemma table generated from WordNet 3.0 by ``scripts/build_chair_lemmas.py``."""
    path = resources.files("veridical.evals") / "data" / "coco_lemmas.json"
    return json.loads(path.read_text(encoding="utf-8"))


class Lemmatizer:
    """Lemmas of caption tokens, as NLTK's tagger + WordNet lemmatizer give them for object words.

    Tokens of the COCO vocabulary's reach come from the WordNet table (so "men" stays "men", as in
    WordNet, and is no "man"); the verb forms NLTK tags as verbs in captions get their verb lemma.
    For words of another ``vocabulary`` (e.g. the synthetic world's), WordNet's noun detachment rules
    are applied and a result is kept when it is a vocabulary word.
    """

    def __init__(self, vocabulary: Iterable[str] = ()):
        table = coco_lemma_table()
        self.nouns: dict[str, str] = table["noun"]
        self.verbs: dict[str, str] = table["verb"]
        self.extra_vocabulary = frozenset(vocabulary) - frozenset(table["vocabulary"])

    def __call__(self, token: str) -> str:
        if token in self.verbs:
            return self.verbs[token]
        if token in self.nouns:
            return self.nouns[token]
        if self.extra_vocabulary:
            candidates = [token[: -len(old)] + new for old, new in _NOUN_RULES if token.endswith(old)]
            known = [c for c in candidates if c in self.extra_vocabulary]
            if known:
                return min(known, key=len)
        return token

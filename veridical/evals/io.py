"""Reading and writing the evals' data files with errors that name the file and the line.

Every reader here turns what a user can get wrong (a missing or unreadable file, bytes that are not
UTF-8, invalid JSON, an empty file, a file of another shape) into one :class:`DataFileError` line that
names the file and, where there is one, the line; none lets a ``UnicodeDecodeError`` or ``KeyError``
through. Text is read as UTF-8; a byte-order mark at the start is accepted and dropped.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from veridical.errors import VeridicalError


class DataFileError(VeridicalError):
    """A data file is missing, unreadable or malformed."""


class EmptyOutputsError(VeridicalError):
    """Every output of a run is empty: there is nothing to score."""


def check_not_all_empty(outputs: Sequence[str], what: str) -> None:
    """Refuse outputs that are all empty or whitespace: a run that generated nothing has no score."""
    if outputs and not any(str(text).strip() for text in outputs):
        raise EmptyOutputsError(
            f"all {len(outputs)} {what} are empty: generation produced nothing (check the method's "
            "hyper-parameters and max_new_tokens); nothing scored"
        )


def short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error lines that quote a record."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def decode_utf8(data: bytes, path: str | Path) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped); otherwise an error naming the line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataFileError(
            f"{path}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def read_bytes(path: str | Path) -> bytes:
    """The bytes of ``path`` (decompressed when it ends in ``.gz``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataFileError(f"cannot read {path}: {err.strerror or err}") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataFileError(f"{path}: not a readable gzip file ({err})") from None
    return data


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path`` (``.gz`` decompressed)."""
    return decode_utf8(read_bytes(path), path)


def load_json(path: str | Path, what: str = "JSON") -> Any:
    """One JSON document (``.gz`` decompressed); an empty file or invalid JSON names the file and line."""
    text = read_text(path)
    if not text.strip():
        raise DataFileError(f"{path} is empty: expected {what}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None


def read_located_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for the records of a JSON-lines file or a JSON array (detected from the
    content): ``where`` is ``"line N"`` for JSON lines and ``"record N"`` for an array, for messages.

    An empty file, an empty array, a single JSON object spread over several lines (a mapping, not
    records) and items that are not JSON objects are errors.
    """
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise DataFileError(f"{path} is empty: expected JSON lines or a JSON array of records")
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        located = [(f"record {i}", r) for i, r in enumerate(records, 1)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                if not located and stripped.startswith("{") and _is_one_object(text):
                    raise DataFileError(
                        f"{path} holds one JSON object, not records: expected one JSON object per line "
                        "or a JSON array of objects"
                    ) from None
                raise DataFileError(f"{path}: line {lineno} is not valid JSON: {err.msg}") from None
    if not located:
        raise DataFileError(f"{path} holds no records")
    bad = next(((where, r) for where, r in located if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataFileError(f"{path}: {bad[0]} is not a JSON object: {short(bad[1])}")
    return located


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file or a JSON array (see :func:`read_located_records`)."""
    return [record for _, record in read_located_records(path)]


def append_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append JSON lines and force them to disk, so a killed run keeps every finished record."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_resilient(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSON-lines file written by :func:`append_records`.

    A last line without its newline is the record a crash interrupted: it is ignored and, with
    ``repair``, cut from the file so later appends start on a clean line. A bad line elsewhere
    (invalid JSON or bytes that are not UTF-8) is corruption and raises, naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = read_bytes(path)
    complete, _, torn = data.rpartition(b"\n")
    if torn and repair:
        with open(path, "r+b") as f:
            f.truncate(len(complete) + 1 if complete else 0)
    records = []
    for lineno, line in enumerate(decode_utf8(complete, path).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}: line {lineno} is corrupt: {err.msg}") from err
    return records


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def quiet_coco(annotation_file: str | Path, required: Sequence[str] = ("images", "annotations")):
    """pycocotools' ``COCO`` over a COCO-format file, without its progress prints on stdout.

    The file is read here (UTF-8, errors naming the file and line) and must be a JSON object with the
    ``required`` lists; an annotation that pycocotools cannot index (no ``id`` or ``image_id``) is
    named too.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO

    path = Path(annotation_file)
    dataset = load_json(path, "COCO-format annotations")
    if not isinstance(dataset, dict):
        raise DataFileError(f"{path}: expected a COCO-format JSON object, got a {type(dataset).__name__}")
    missing = [key for key in required if not isinstance(dataset.get(key), list)]
    if missing:
        raise DataFileError(f"{path}: not COCO-format annotations: no {', '.join(map(repr, missing))} list")
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except KeyError as err:
        raise DataFileError(f"{path}: not COCO-format annotations: an entry lacks the key {err}") from None
    except TypeError as err:
        raise DataFileError(f"{path}: not COCO-format annotations: an entry is malformed ({err})") from None
    return coco

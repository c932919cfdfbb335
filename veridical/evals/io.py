"""Reading and writing the evals' data files with errors that name the file and the record."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from veridical.errors import VeridicalError


class DataFileError(VeridicalError):
    """A data file is missing, unreadable or malformed."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file or a JSON array (the format is detected from the content)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataFileError(f"cannot read {path}: {err.strerror or err}") from err
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}: line {lineno} is not valid JSON: {err.msg}") from err
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataFileError(f"{path}: record {bad + 1} is not a JSON object: {records[bad]!r}")
    return records


def append_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append JSON lines and force them to disk, so a killed run keeps every finished record."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_resilient(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSON-lines file written by :func:`append_records`.

    A last line without its newline is the record a crash interrupted: it is ignored and, with
    ``repair``, cut from the file so later appends start on a clean line. A bad line elsewhere is
    corruption and raises.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete, _, torn = data.rpartition(b"\n")
    if torn and repair:
        with open(path, "r+b") as f:
            f.truncate(len(complete) + 1 if complete else 0)
    records = []
    for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
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


def quiet_coco(annotation_file: str):
    """pycocotools' ``COCO(file)`` without its progress prints on stdout."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(annotation_file)

"""Reading and writing the evals' data files with errors that name the file and the record."""

from __future__ import annotations

import json
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

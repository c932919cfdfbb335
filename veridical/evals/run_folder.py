"""An eval run's output folder: who may write it, and whether a re-run resumes it.

A folder belongs to one run, identified by ``config.json`` (the full resolved setting, see
``EvalConfig.identity``). A re-run resumes the folder only when it asks exactly the same, compared
as values (paths resolved, every hyper-parameter filled in); otherwise it is refused before anything
is written. A folder without any finished sample is not a run yet: a corrected re-run takes it over.
``overwrite`` starts over on purpose. One process at a time holds the folder (an advisory lock on
``.lock``, released by the operating system when the process dies, so a crash never blocks a resume).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from veridical.evals.io import DataFileError, short, write_json_atomic

#: Version of the identity written to ``config.json``; folders of another version do not resume.
IDENTITY_FORMAT = 2
CONFIG = "config.json"
RESULTS = "results.json"
#: One file per process and invocation that generated samples: its wall time, tokens and memory.
PARTS = "parts"
LOCK = ".lock"
RECORDS_GLOB = "samples.rank*.jsonl"


def as_values(data: Any) -> Any:
    """``data`` as plain JSON values (tuples become lists), so identities compare like ``config.json``."""
    return json.loads(json.dumps(data))


def resolved_path(path: str | os.PathLike) -> str:
    """An absolute path with links resolved: ``./q.json`` and ``/abs/q.json`` name the same file."""
    return str(Path(path).expanduser().resolve())


def check_writable(out: Path) -> None:
    """Refuse an output that is a file, lies under a file, or whose nearest existing folder cannot be
    written (checked before the model loads; the folder itself is made only when the run starts)."""
    if out.exists() and not out.is_dir():
        raise DataFileError(f"--output {out} is a file; give a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise DataFileError(f"--output {out}: {existing} is a file, not a folder; choose another output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataFileError(f"--output {out}: cannot write in {existing} (permission denied)")


def has_records(out: Path) -> bool:
    return any(p.stat().st_size > 0 for p in out.glob(RECORDS_GLOB))


def check_resume(out: Path, identity: dict[str, Any]) -> str:
    """``new``, ``resume`` or ``takeover`` (a folder without finished samples); raises on a conflict.

    Reads only: a refused run leaves the folder as it was.
    """
    config_file = out / CONFIG
    if not config_file.exists():
        if out.is_dir() and has_records(out):
            raise DataFileError(f"{out} holds samples but no {CONFIG}; use another --output or --overwrite")
        return "new"
    if not has_records(out):
        return "takeover"
    try:
        previous = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataFileError(f"{config_file} is unreadable ({err}); use --overwrite to start over") from err
    if previous.get("format") != IDENTITY_FORMAT:
        raise DataFileError(
            f"{out} was written by an older veridical (its settings cannot be compared); "
            "use --overwrite (or delete the folder) to start over, or another --output"
        )
    identity = as_values(identity)
    if previous != identity:
        differ = sorted(k for k in {*identity, *previous} if previous.get(k) != identity.get(k))
        details = "; ".join(
            f"{k}: {short(previous.get(k))} there, {short(identity.get(k))} now" for k in differ
        )
        raise DataFileError(
            f"{out} holds a run with other settings ({details}); "
            "use the same settings to resume, another --output, or --overwrite to start over"
        )
    return "resume"


def clear(out: Path) -> None:
    """Remove a run's own files (records, settings, results, timings); other files are left alone."""
    for path in [*out.glob(RECORDS_GLOB), *out.glob(f"{PARTS}/*.json"), out / CONFIG, out / RESULTS]:
        path.unlink(missing_ok=True)


@contextmanager
def hold(out: Path) -> Iterator[None]:
    """Hold the folder's lock for the block; a second process gets one line naming the holder."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise DataFileError(
                f"{out} is in use by {holder}; wait for it to finish or use another --output"
            ) from None
        lock.seek(0)
        lock.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        lock.write(f"pid {os.getpid()} on {platform.node()} (since {started})")
        lock.flush()
        try:
            yield
        finally:
            lock.seek(0)
            lock.truncate()
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_for_writing(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Under the lock: start, take over or resume ``out`` for the run of ``identity``."""
    if overwrite:
        clear(out)
    status = check_resume(out, identity)
    if status in ("new", "takeover"):
        clear(out)  # a taken-over folder may hold empty record files of a run that finished nothing
        write_json_atomic(out / CONFIG, as_values(identity))

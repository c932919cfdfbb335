"""The world checkpoints shipped with the package, by the names the commands accept."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).parent / "checkpoints"
#: ``world`` is trained with the co-occurrence prior, ``world-noprior`` (the control) without it.
WORLD_MODELS = {"world": CHECKPOINTS / "world", "world-noprior": CHECKPOINTS / "world-noprior"}


def model_path(name_or_path: str) -> str:
    """The folder of a shipped world model, or ``name_or_path`` unchanged (a hub id or a folder)."""
    return str(WORLD_MODELS.get(name_or_path, name_or_path))

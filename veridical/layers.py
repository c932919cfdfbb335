"""Layer choices written for 32-layer decoders, mapped onto a model's own depth, and user layer lists
checked against it: what every method that picks decoder layers shares."""

from __future__ import annotations

from collections.abc import Sequence

from veridical.errors import MethodSpecError

#: Depth of the 7B models the official layer choices were written for.
REFERENCE_DEPTH = 32


def scale_index(index: int, depth: int, reference: int = REFERENCE_DEPTH) -> int:
    """Layer ``index`` of a ``reference``-deep model, at the same relative depth of a ``depth``-deep one."""
    return min(depth, round(index * depth / reference))


def layer_range(start: int, stop: int, depth: int) -> list[int]:
    """Layers ``start..stop-1`` of a 32-layer model, scaled to ``depth`` layers (never empty)."""
    first = min(scale_index(start, depth), depth - 1)
    return list(range(first, max(scale_index(stop, depth), first + 1)))


def check_layers(name: str, layers: Sequence[int] | int, depth: int) -> list[int]:
    """Validate a user's explicit layer list (or one layer) against the model's depth."""
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, str) or not all(isinstance(i, int) for i in layers):
        raise MethodSpecError(f"{name} layers must be layer indices, got {layers!r}")
    layers = sorted(set(layers))
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or not layers:
        raise MethodSpecError(
            f"{name} layers {bad or '[]'} are not in 0..{depth - 1} (the text decoder's layers)"
        )
    return layers

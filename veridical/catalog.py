"""The listing of ``veridical methods``, read from ``methods.json`` without importing torch.

``methods.json`` is generated from the live registry (:func:`build_manifest`): per built-in method its
name, class, the first line of its docstring, and each hyper-parameter's default and accepted range
(:meth:`veridical.params.Rule.describe`). A test compares the file with the registry, so it cannot go
stale; regenerate it after changing a method with::

    python -m veridical.catalog
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

#: The generated listing, shipped with the package.
MANIFEST = Path(__file__).with_name("methods.json")
#: The command that regenerates :data:`MANIFEST`.
REGENERATE = "python -m veridical.catalog"


def _json_value(value: Any) -> Any:
    """A default as JSON holds it (its ``repr`` where JSON has no such value)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def build_manifest() -> dict[str, Any]:
    """The listing of every built-in registered method, from the live registry (imports torch)."""
    from veridical.registry import hyperparameter_rules, hyperparameters, list_methods, method_class

    methods = []
    for name in list_methods():
        cls = method_class(name)
        if not cls.__module__.startswith("veridical."):  # registered by user code, not shipped
            continue
        rules = hyperparameter_rules(cls)
        doc = inspect.getdoc(cls) or ""
        methods.append(
            {
                "name": name,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "summary": doc.strip().splitlines()[0] if doc.strip() else "",
                "hyperparameters": [
                    {
                        "name": param,
                        "default": _json_value(default),
                        "range": rules[param].describe() if param in rules else "",
                    }
                    for param, default in hyperparameters(cls).items()
                ],
            }
        )
    return {"generated_by": REGENERATE, "methods": methods}


def write_manifest(path: Path = MANIFEST) -> None:
    """Write :func:`build_manifest` to ``path``."""
    Path(path).write_text(json.dumps(build_manifest(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    """The shipped listing (no torch)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def format_methods(manifest: dict[str, Any] | None = None) -> str:
    """One block per method: its name and summary, then each hyper-parameter's default and range.

    ::

        vcd  Visual Contrastive Decoding.
            alpha=1.0           [0, inf)
            contrast='noise'    noise|blank|no_image
    """
    manifest = load_manifest() if manifest is None else manifest
    blocks = []
    for method in manifest["methods"]:
        lines = [f"{method['name']}  {method['summary']}"]
        settings = [(f"{p['name']}={p['default']!r}", p["range"]) for p in method["hyperparameters"]]
        width = max((len(setting) for setting, _ in settings), default=0)
        lines += [f"    {setting:<{width}}  {allowed}".rstrip() for setting, allowed in settings]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    write_manifest()
    print(f"wrote {MANIFEST}")

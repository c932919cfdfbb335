"""``veridical sweep``: a YAML grid of models x benchmarks x method stacks, one eval run per cell.

```yaml
name: vcd-alpha                      # output goes to runs/sweeps/<name> unless `output` is given
models: [llava-hf/llava-1.5-7b-hf]
benchmarks:
  pope: {pope_set: coco/adversarial, images: /data/coco/val2014}
  chair: {images: /data/coco/val2014, coco_annotations: /data/coco/annotations, num_images: 500}
methods:                             # each entry is one stack of methods
  - []                               # vanilla
  - vcd                              # a name, with its defaults
  - {name: vcd, grid: {alpha: [0.5, 1.0, 2.0]}}   # one cell per value (cartesian over keys)
  - [var, {name: vcd, alpha: 1.0}]   # a stack: methods applied together
protocol: vcd                        # an official script's prompt and decoding (or a list: one cell each)
generation: {max_new_tokens: 64}     # overrides every cell's generation settings (and the protocol's)
batch_size: 8
seed: 0
compile: false                       # true: static cache and compiled decoding steps (as --compile)
```

Everything is validated before the first forward pass (unknown keys, methods or hyper-parameters are
reported with their line); ``--dry-run`` also checks each cell as its run would (model loaded,
methods built on the first batch). Finished cells are skipped on re-run, unfinished ones resume. A
failing cell does not stop the others: the summary marks it and the exit status is 1. The sweep ends
with ``summary.md``, ``summary.csv`` and ``summary.png``.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from veridical.errors import MethodSpecError, VeridicalError
from veridical.evals.protocols import ProtocolError, check_protocol
from veridical.evals.request import EvalRequest
from veridical.evals.runner import stack_label

TOP_KEYS = {
    "name",
    "output",
    "models",
    "benchmarks",
    "methods",
    "generation",
    "batch_size",
    "seed",
    "dtype",
    "device",
    "rule",
    "protocol",
    "compile",
}
BENCHMARK_KEYS = {
    "pope": {"images", "questions", "pope_set", "hf_dataset", "hf_split", "hf_category", "limit"},
    "chair": {"images", "gt", "coco_annotations", "num_images", "prompt", "limit", "synonyms"},
}
#: Per benchmark: the hallucination metric (y axis) and what it trades against (x axis).
PRIMARY = {"pope": ("f1", "yes_ratio"), "chair": ("CHAIRi", "Recall")}


class SweepError(VeridicalError):
    """A malformed sweep file."""


class _LineLoader(yaml.SafeLoader):
    """Records the line of every mapping under the key ``__line__``."""

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep=deep)
        mapping["__line__"] = node.start_mark.line + 1
        return mapping


def _line(obj: Any) -> str:
    return f"line {obj['__line__']}: " if isinstance(obj, dict) and "__line__" in obj else ""


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k != "__line__"}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


@dataclass
class Cell:
    model: str
    benchmark: str
    methods: list[Any]
    name: str
    #: ``--protocol`` of the cell; None when the sweep names none (the default protocol).
    protocol: str | None = None


def load_sweep(path: str | Path) -> tuple[dict[str, Any], list[Cell]]:
    """Parse and validate a sweep file; returns its settings and its cells."""
    from veridical.registry import validate_spec

    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
    except OSError as err:
        raise SweepError(f"cannot read {path}: {err}") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SweepError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from err
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping")
    unknown = set(raw) - TOP_KEYS - {"__line__"}
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    if not isinstance(raw.get("compile", False), bool):
        raise SweepError(f"{path}: 'compile' must be true or false, got {raw['compile']!r}")
    for key in ("models", "benchmarks", "methods"):
        if key not in raw:
            raise SweepError(f"{path}: missing {key!r}")
    models = raw["models"] if isinstance(raw["models"], list) else [raw["models"]]
    benchmarks = raw["benchmarks"]
    if not isinstance(benchmarks, dict) or not set(benchmarks) - {"__line__"}:
        raise SweepError(f"{path}: 'benchmarks' must map pope/chair to their data options")
    for bench, options in benchmarks.items():
        if bench == "__line__":
            continue
        if bench not in BENCHMARK_KEYS:
            raise SweepError(f"{path}: {_line(benchmarks)}unknown benchmark {bench!r}; use pope or chair")
        bad = set(options or {}) - BENCHMARK_KEYS[bench] - {"__line__"}
        if bad:
            raise SweepError(
                f"{path}: {_line(options)}unknown {bench} option(s) {sorted(bad)}; "
                f"valid: {sorted(BENCHMARK_KEYS[bench])}"
            )
    stacks = []
    for entry in raw["methods"]:
        try:
            for stack in _expand(entry):
                for spec in stack:
                    validate_spec(spec)
                stacks.append(stack)
        except (MethodSpecError, SweepError) as err:
            raise SweepError(f"{path}: {_line(entry) or _first_line(entry)}{err}") from None
    protocols = _protocols(raw, [b for b in benchmarks if b != "__line__"], path)
    cells = [
        Cell(model, bench, stack, _cell_name(model, bench, stack, protocol), protocol)
        for model in models
        for bench in benchmarks
        if bench != "__line__"
        for protocol in protocols
        for stack in stacks
    ]
    settings = _clean({k: v for k, v in raw.items() if k not in ("models", "methods")})
    settings.setdefault("name", path.stem)
    return settings, cells


def _protocols(raw: dict[str, Any], benchmarks: list[str], path: Path) -> list[str | None]:
    """The sweep's protocols (a name or a list of names), each checked against every benchmark."""
    value = raw.get("protocol")
    if value is None:
        return [None]
    names = value if isinstance(value, list) else [value]
    for name in names:
        if not isinstance(name, str):
            raise SweepError(f"{path}: 'protocol' must be a protocol name or a list of names, got {name!r}")
        for bench in benchmarks:
            try:
                check_protocol(name, bench)
            except ProtocolError as err:
                raise SweepError(f"{path}: {err}") from None
    return list(names)


def _first_line(entry: Any) -> str:
    if isinstance(entry, list):
        for item in entry:
            if _line(item):
                return _line(item)
    return ""


def _expand(entry: Any) -> list[list[Any]]:
    """The method stacks one ``methods`` entry stands for (grids expand into several)."""
    if entry in (None, "vanilla", []):
        return [[]]
    items = entry if isinstance(entry, list) else [entry]
    options = [_expand_one(item) for item in items]
    return [list(combo) for combo in itertools.product(*options)]


def _expand_one(item: Any) -> list[Any]:
    if isinstance(item, str):
        return [item]
    if not isinstance(item, dict) or "name" not in item:
        raise SweepError(f"a method must be a name or a mapping with 'name', got {_clean(item)!r}")
    item = _clean(item)
    grid = item.pop("grid", None)
    if grid is None:
        return [item]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"'grid' of {item['name']} must map hyper-parameters to non-empty lists")
    keys = list(grid)
    return [{**item, **dict(zip(keys, values, strict=True))} for values in itertools.product(*grid.values())]


def _cell_name(model: str, bench: str, stack: Sequence[Any], protocol: str | None = None) -> str:
    name = f"{Path(model).name}__{bench}__{stack_label(stack)}" + (f"__{protocol}" if protocol else "")
    return name.replace("/", "_").replace(" ", "")


def cell_request(settings: dict[str, Any], cell: Cell, output: Path, dry_run: bool = False) -> EvalRequest:
    """The ``veridical eval`` request of one cell."""
    options = dict(settings["benchmarks"].get(cell.benchmark) or {})
    for key in ("batch_size", "seed", "dtype", "device", "rule"):
        if key in settings and not (key == "rule" and cell.benchmark != "pope"):
            options[key] = settings[key]
    return EvalRequest(
        benchmark=cell.benchmark,
        model=cell.model,
        methods=list(cell.methods),
        protocol=cell.protocol,
        generation=dict(settings.get("generation") or {}),
        compile=bool(settings.get("compile")),
        output=str(output),
        dry_run=dry_run,
        progress=False,
        **options,
    )


def run_sweep(
    path: str | Path, output: str | Path | None = None, dry_run: bool = False, compile: bool = False
) -> list[dict[str, Any]]:
    """Run every unfinished cell, then write the summary; returns one row per cell.

    A cell that fails (a setting its model refuses, missing data, ...) does not stop the others: its
    row says ``failed`` with the reason, and :func:`failed_cells` counts them for the exit status.
    ``dry_run`` checks every cell as its run would (model loaded, methods built on the first batch)
    and writes nothing. ``compile`` compiles every cell's decoding (as the file's ``compile: true``).
    """
    settings, cells = load_sweep(path)
    settings["compile"] = bool(settings.get("compile")) or compile
    root = Path(output or settings.get("output") or Path("runs") / "sweeps" / settings["name"])
    print(f"sweep {settings['name']}: {len(cells)} cells -> {root}" + (" (dry run)" if dry_run else ""))
    failures: dict[str, str] = {}
    for i, cell in enumerate(cells, 1):
        cell_dir = root / cell.name
        if (cell_dir / "results.json").exists() and not dry_run:
            print(f"[{i}/{len(cells)}] {cell.name}: done, skipped")
            continue
        print(f"[{i}/{len(cells)}] {cell.name}")
        error = _run_cell(cell_request(settings, cell, cell_dir, dry_run))
        if error:
            failures[cell.name] = error
            print(f"[{i}/{len(cells)}] {cell.name}: FAILED: {error}")
    rows = [_row(cell, root / cell.name, failures.get(cell.name)) for cell in cells]
    if not dry_run:
        write_summary(rows, root)
    if failures:
        print(f"{len(failures)} of {len(cells)} cells failed" + ("" if dry_run else "; see the summary"))
    return rows


def _run_cell(request: EvalRequest) -> str | None:
    """Run one cell's eval; the reason it failed, or None. Ctrl-C stops the sweep."""
    from veridical.evals.commands import run_eval_request

    try:
        run_eval_request(request)
    except (VeridicalError, OSError) as err:
        return str(err)
    return None


def failed_cells(rows: Sequence[dict[str, Any]]) -> int:
    return sum(1 for row in rows if row.get("status", "").startswith("failed"))


def _row(cell: Cell, cell_dir: Path, failure: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "cell": cell.name,
        "model": cell.model,
        "benchmark": cell.benchmark,
        "methods": stack_label(cell.methods).replace(" ", ""),
        **({"protocol": cell.protocol} if cell.protocol else {}),
        "status": f"failed: {failure}" if failure else "ok",
    }
    results_file = cell_dir / "results.json"
    if results_file.exists() and not failure:
        results = json.loads(results_file.read_text(encoding="utf-8"))
        row.update({k: v for k, v in results["metrics"].items() if isinstance(v, (int, float))})
        run = results["run"]
        tokens = run.get("generated_tokens") or 0
        row["ms_per_token"] = round(1000 * run["wall_time_s"] / tokens, 3) if tokens else None
    return row


def write_summary(rows: list[dict[str, Any]], root: Path) -> None:
    """``summary.md``, ``summary.csv`` and ``summary.png`` (hallucination against recall and cost)."""
    root.mkdir(parents=True, exist_ok=True)
    columns = ["model", "benchmark", "methods", "status"]
    for row in rows:
        columns += [k for k in row if k not in columns and k != "cell"]
    with open(root / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    (root / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(rows, root / "summary.png")
    print("\n".join(lines))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in PRIMARY if any(r["benchmark"] == b and PRIMARY[b][0] in r for r in rows)]
    fig, axes = plt.subplots(max(len(benches), 1), 2, figsize=(11, 4 * max(len(benches), 1)), squeeze=False)
    for ax_row, bench in zip(axes, benches, strict=False):
        y_key, x_key = PRIMARY[bench]
        points = [r for r in rows if r["benchmark"] == bench and y_key in r]
        for ax, x in zip(ax_row, (x_key, "ms_per_token"), strict=True):
            for r in points:
                if r.get(x) is None:
                    continue
                ax.scatter(r[x], r[y_key])
                ax.annotate(
                    f"{r['methods']} ({Path(r['model']).name}"
                    + (f", {r['protocol']})" if r.get("protocol") else ")"),
                    (r[x], r[y_key]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            ax.set_xlabel(x if x != "ms_per_token" else "ms per generated token")
            ax.set_ylabel(f"{bench} {y_key}")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The protocol table (``veridical protocols``, README) and one protocol's settings with their sources."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from veridical.evals.protocols.registry import DEFAULT, PROTOCOLS, TEMPLATE_NAMES, WITHOUT_PROTOCOL
from veridical.evals.protocols.resolve import get_protocol, protocol_names, protocol_settings
from veridical.evals.protocols.spec import BENCHMARKS, DEFAULT_INSTRUCTION, RECORDED_KEYS, Setting

_CITED = re.compile(r"([\w.-]+/[\w.-]+)@(\w+) ([^\s:;]+):")


def _decoding(values: Mapping[str, Any]) -> str:
    if values.get("do_sample"):
        top_k = values.get("top_k")
        text = f"sampling, T={values.get('temperature', 1.0):g}, top-p={values.get('top_p', 1.0):g}, " + (
            "no top-k" if top_k in (0, None) else f"top-k={top_k}"
        )
    elif values.get("num_beams", 1) > 1:
        text = f"beam search, {values['num_beams']} beams"
    else:
        text = "greedy"
    extra = [f"{k}={values[k]:g}" for k in ("min_new_tokens", "repetition_penalty") if k in values]
    return ", ".join([text, *extra])


def _prompt(values: Mapping[str, Any], benchmark: str) -> str:
    if benchmark == "pope":
        suffix = values.get("question_suffix")
        ask = f"question + `{suffix!r}`" if suffix else "question as written"
    else:
        ask = f"`{values.get('instruction', DEFAULT_INSTRUCTION)}`"
    return f"{ask}; " + TEMPLATE_NAMES.get(values.get("template"), "processor's chat template")


def _method_values(values: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items() if "." in k
    )


def _difference(base: Mapping[str, Any], values: Mapping[str, Any], benchmark: str) -> str:
    """What a family changes, in words."""
    parts = []
    if values.get("template") != base.get("template") or values.get("question_suffix") != base.get(
        "question_suffix"
    ):
        parts.append("prompt " + _prompt(values, benchmark))
    if values.get("max_new_tokens") != base.get("max_new_tokens"):
        parts.append(f"{values['max_new_tokens']} tokens")
    if _decoding(values) != _decoding(base):
        parts.append(_decoding(values))
    changed = {k: v for k, v in values.items() if "." in k and base.get(k) != v}
    if changed:
        parts.append(_method_values(changed))
    return "; ".join(parts)


def _sources(settings: Mapping[str, Setting]) -> str:
    files: dict[str, list[str]] = {}
    for setting in settings.values():
        for repo, commit, path in _CITED.findall(setting.source):
            found = files.setdefault(f"{repo}@{commit}", [])
            if path not in found:
                found.append(path)
    return "; ".join(f"{repo} " + ", ".join(paths) for repo, paths in files.items())


def _ordered() -> list[str]:
    return [DEFAULT.name, *(n for n in protocol_names() if n != DEFAULT.name)]


def protocol_rows() -> list[dict[str, str]]:
    """One row per protocol x benchmark: LLaVA-1.5's settings, and what other families change."""
    rows = []
    for name in _ordered():
        protocol = PROTOCOLS[name]
        for benchmark in BENCHMARKS:
            row = {"protocol": name, "benchmark": benchmark}
            if benchmark not in protocol.benchmarks:
                row["prompt"] = f"not defined: {protocol.missing.get(benchmark, '')}"
                rows.append(row)
                continue
            bench = protocol.benchmarks[benchmark]
            generic = {k: s.value for k, s in bench.settings.items()}
            llava = protocol_settings(name, benchmark, "llava")
            values = {k: s.value for k, s in llava.items()}
            decoding = _decoding(values)
            if protocol.method_generation:
                decoding += (
                    "; the first method's paper decoding if it has one (VCD, AvisC: sampling; OPERA: 5 beams)"
                )
            others = []
            for family in bench.families:
                if family != "llava":
                    family_values = {
                        k: s.value for k, s in protocol_settings(name, benchmark, family).items()
                    }
                    others.append(f"{family}: {_difference(values, family_values, benchmark)}")
            if bench.families:
                others.append(f"others: {_difference(values, generic, benchmark)}")
            row.update(
                prompt=_prompt(values, benchmark),
                tokens=str(values.get("max_new_tokens", "")),
                decoding=decoding,
                rule=str(values.get("rule", "")),
                methods=_method_values(values),
                seed=str(values.get("seed", "")),
                families="; ".join(others),
                source=_sources(llava),
            )
            rows.append(row)
    return rows


def protocols_table(markdown: bool = False) -> str:
    """The protocol table (``veridical protocols``); ``markdown`` for the README."""
    rows = protocol_rows()
    if markdown:
        columns = (
            "protocol",
            "benchmark",
            "prompt",
            "tokens",
            "decoding",
            "rule",
            "methods",
            "seed",
            "families",
            "source",
        )
        heads = (
            "protocol",
            "benchmark",
            "prompt (LLaVA-1.5)",
            "max new tokens",
            "decoding",
            "POPE parser",
            "method values",
            "seed (recorded)",
            "other families",
            "source (per-value lines: `veridical protocols NAME`)",
        )
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(r.get(c, "").replace("|", "\\|") for c in columns) + " |" for r in rows]
        return "\n".join(lines)
    lines = []
    for r in rows:
        head = f"{r['protocol']:8s} {r['benchmark']:6s}"
        if "tokens" not in r:
            lines.append(f"{head}{r['prompt']}")
            continue
        rule = f", rule {r['rule']}" if r["rule"] else ""
        lines.append(f"{head}{r['tokens']} tokens, {r['decoding']}{rule}")
        lines.append(f"{'':15s}prompt: {r['prompt']}")
        for key, label in (("methods", "methods"), ("families", "other families")):
            if r[key]:
                lines.append(f"{'':15s}{label}: {r[key]}")
    for method, why in WITHOUT_PROTOCOL.items():
        lines.append(f"(no protocol for {method}: {why})")
    return "\n".join(lines)


def protocol_details(name: str) -> str:
    """Every setting of one protocol with its citation (``veridical protocols NAME``)."""
    protocol = get_protocol(name)
    lines = [f"{protocol.name}: {protocol.title}"]
    for benchmark in BENCHMARKS:
        if benchmark not in protocol.benchmarks:
            lines.append(f"\n{benchmark}: not defined ({protocol.missing.get(benchmark, '')})")
            continue
        bench = protocol.benchmarks[benchmark]
        for family, settings in (("every family", bench.settings), *bench.families.items()):
            lines.append(f"\n{benchmark}, {family}:")
            for key, setting in settings.items():
                note = " (recorded, not applied)" if key in RECORDED_KEYS else ""
                lines.append(f"  {key} = {setting.value!r}{note}\n      {setting.source}")
        for note in bench.notes:
            lines.append(f"  note: {note}")
    return "\n".join(lines)

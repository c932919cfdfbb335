"""Resolving a protocol and the user's explicit choices into one run's settings and prompt."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from veridical.evals.protocols.registry import DEFAULT, PROTOCOLS
from veridical.evals.protocols.spec import (
    GENERATION_KEYS,
    RECORDED_KEYS,
    SAMPLING_KEYS,
    Protocol,
    ProtocolError,
    Setting,
)


def protocol_names() -> list[str]:
    return sorted(PROTOCOLS)


def get_protocol(name: str | None) -> Protocol:
    """The protocol called ``name`` (``None``: the default); an unknown name is one clear error."""
    if name is None:
        return DEFAULT
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ProtocolError(
            f"unknown protocol {name!r}; known protocols: {', '.join(protocol_names())}"
        ) from None


def check_protocol(name: str | None, benchmark: str) -> Protocol:
    """``get_protocol`` that also requires the protocol to define ``benchmark``."""
    protocol = get_protocol(name)
    if benchmark not in protocol.benchmarks:
        having = [n for n in protocol_names() if benchmark in PROTOCOLS[n].benchmarks]
        why = protocol.missing.get(benchmark, "not defined")
        raise ProtocolError(
            f"protocol {protocol.name!r} defines no {benchmark} setting ({why}); "
            f"protocols with {benchmark}: {', '.join(having)}"
        )
    return protocol


def protocol_settings(name: str | None, benchmark: str, family: str | None = None) -> dict[str, Setting]:
    """The settings of a protocol for a benchmark and a model family (``model.config.model_type``)."""
    bench = check_protocol(name, benchmark).benchmarks[benchmark]
    return {**bench.settings, **bench.families.get(family or "", {})}


@dataclass
class ResolvedRun:
    """What a protocol and the user's explicit choices resolve into for one eval run."""

    generation: dict[str, Any]
    methods: list[Any]
    #: ``{"suffix": ..., "template": ...}`` (either may be absent) for :func:`render_prompt`.
    prompt: dict[str, str]
    instruction: str | None
    rule: str | None
    #: What ``results.json`` records under ``protocol``.
    record: dict[str, Any]


def resolve_run(
    name: str | None,
    benchmark: str,
    family: str | None,
    methods: Sequence[Any],
    generation: Mapping[str, Any] | None = None,
    rule: str | None = None,
    instruction: str | None = None,
    question_suffix: str | None = None,
    template: str | None = None,
) -> ResolvedRun:
    """Resolve protocol ``name`` for ``benchmark`` on a model of ``family`` with ``methods``.

    The keyword arguments are the user's explicit choices (``None``: not given); they win over the
    protocol, and every protocol value they replace is recorded under ``overridden``.
    """
    from veridical.evals.runner import method_name
    from veridical.registry import method_class

    protocol = get_protocol(name)
    settings = protocol_settings(name, benchmark, family)
    values = {k: s.value for k, s in settings.items()}
    overridden: dict[str, dict[str, Any]] = {}

    def choose(key: str, user: Any) -> Any:
        if user is not None and key in values:
            overridden[key] = {"protocol": values[key], "user": user}
        return user if user is not None else values.get(key)

    base = {k: v for k, v in values.items() if k in GENERATION_KEYS}
    if protocol.method_generation:
        for spec in reversed(list(methods)):
            base.update(getattr(method_class(method_name(spec)), "generation_defaults", {}))
    user_generation = dict(generation or {})
    for key, value in user_generation.items():
        if key in base:
            overridden[key] = {"protocol": base[key], "user": value}
    resolved_methods = []
    for spec in methods:
        name_ = method_name(spec)
        defaults = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f"{name_}.")}
        if not defaults or not isinstance(spec, (str, Mapping)):
            resolved_methods.append(spec)
            continue
        given = {k: v for k, v in spec.items() if k != "name"} if isinstance(spec, Mapping) else {}
        for key in set(given) & set(defaults):
            overridden[f"{name_}.{key}"] = {"protocol": defaults[key], "user": given[key]}
        resolved_methods.append({"name": name_, **defaults, **given})
    prompt = {}
    suffix = choose("question_suffix", question_suffix)
    if suffix:
        prompt["suffix"] = suffix
    chosen_template = choose("template", template)
    if chosen_template:
        if "{question}" not in chosen_template:
            raise ProtocolError(f"prompt template {chosen_template!r} has no {{question}} field")
        prompt["template"] = chosen_template
    record = {
        "name": protocol.name,
        "family": family,
        "settings": values,
        "citations": {k: s.source for k, s in settings.items()},
        "recorded_only": [k for k in values if k in RECORDED_KEYS],
        "overridden": overridden,
    }
    generation = {**base, **user_generation}
    if not generation.get("do_sample"):
        # A sampling default's warper settings mean nothing to greedy or beam search (transformers
        # warns that they are invalid there): keep only those the user asked for.
        generation = {k: v for k, v in generation.items() if k not in SAMPLING_KEYS or k in user_generation}
    return ResolvedRun(
        generation=generation,
        methods=resolved_methods,
        prompt=prompt,
        instruction=choose("instruction", instruction) if benchmark == "chair" else None,
        rule=choose("rule", rule) if benchmark == "pope" else None,
        record=record,
    )


_FIELD = re.compile(r"\{(image|question)\}")


def render_prompt(model, processor, question: str, prompt: Mapping[str, str] | None = None) -> str:
    """The text the processor receives: ``question`` plus the protocol's suffix, in the protocol's
    template for this family if it has one, else through the processor's chat template."""
    from veridical.adapters import get_adapter
    from veridical.evals.models import build_prompt

    prompt = prompt or {}
    text = question + prompt.get("suffix", "")
    template = prompt.get("template")
    if not template:
        return build_prompt(model, processor, text)
    fields = {"image": get_adapter(model).image_placeholder, "question": text}
    if fields["image"] and "{image}" not in template:
        raise ProtocolError(f"prompt template {template!r} has no {{image}} field for the image")
    return _FIELD.sub(lambda m: fields[m.group(1)], template)

"""Evaluation protocols: what each paper's official POPE / CHAIR script sets, under one name.

Most "I cannot reproduce your numbers" reports come from the protocol, not the method: the prompt
suffix, the conversation template, the answer length, the decoding and the answer parser. A protocol
fixes all of them as the official evaluation script does, so ``veridical eval pope --protocol vcd``
asks the question, decodes and parses the answer as ``DAMO-NLP-SG/VCD`` does, whatever methods run.

The registry (``registry.py``) is data: per protocol and benchmark, a table of settings, each with the
file and line of the official code it comes from (``owner/repo@commit path:line``, the snapshot read), plus
per-family differences (the scripts run LLaVA-1.5 through its own conversation code and InstructBLIP
through LAVIS). Keys:

- ``question_suffix`` (POPE): text appended to the question file's question.
- ``instruction`` (CHAIR): the captioning request.
- ``template``: the whole prompt, ``{image}`` standing for the model's image placeholder and
  ``{question}`` for the question (with its suffix). Families without one use the processor's chat
  template, as the default protocol does: the official scripts only cover LLaVA-1.5 and InstructBLIP.
- ``max_new_tokens``, ``min_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
  ``num_beams``, ``repetition_penalty``: passed to ``generate()``. ``top_k=0`` means "no top-k": the
  official LLaVA-path scripts pass ``top_k=None``, which transformers 4.x took as "no top-k warper";
  transformers 5 adds top-k 50 to sampling unless ``top_k`` is ``None`` or ``0`` (checked in 5.24:
  ``_get_logits_processor`` adds ``TopKLogitsWarper`` only for ``top_k not in (None, 0)``), and ``0``
  also survives JSON and YAML round trips as "off".
- ``rule`` (POPE): the answer parser of :mod:`veridical.evals.pope`.
- ``<method>.<hyper-parameter>``: the method's value in that script; applied only when the method
  is in the stack.
- ``seed``: recorded, not applied. The scripts seed a global generator once and sample question after
  question; veridical seeds every batch from ``--seed`` (so results do not depend on the process
  split), so the scripts' random streams cannot be reproduced and the value is kept as a record.

Precedence, lowest first: the default protocol's settings, each method's paper decoding
(``generation_defaults``; default protocol only) and per-benchmark hyper-parameters
(``benchmark_hyperparameters``), the protocol's settings, then whatever the user passes explicitly
(``--max-new-tokens``, ``--gen``, ``--rule``, ``--prompt``, ``--question-suffix``,
``--prompt-template``, ``--method vcd:beta=...``). ``results.json`` records the protocol's name,
its resolved settings with their citations, and every protocol value the user overrode.

**The default protocol** (``default``, used without ``--protocol``) is documented here and only here:
the question file's question as written, through the processor's chat template; greedy decoding with
at most 128 new tokens on POPE and 512 on CHAIR, unless the first method of the stack has a paper
decoding (VCD and AvisC sample with temperature 1 and top-p 1, OPERA searches 5 beams); CHAIR asks
"Please describe this image in detail."; POPE answers are parsed with the official POPE / LLaVA rule.
"""

from veridical.evals.protocols.listing import protocol_details, protocol_rows, protocols_table
from veridical.evals.protocols.registry import DEFAULT, PROTOCOLS, WITHOUT_PROTOCOL
from veridical.evals.protocols.resolve import (
    ResolvedRun,
    check_protocol,
    get_protocol,
    protocol_names,
    protocol_settings,
    render_prompt,
    resolve_run,
)
from veridical.evals.protocols.spec import (
    BENCHMARKS,
    GENERATION_KEYS,
    PROMPT_KEYS,
    RECORDED_KEYS,
    SAMPLING_KEYS,
    BenchmarkProtocol,
    Protocol,
    ProtocolError,
    Setting,
)

__all__ = [
    "BENCHMARKS",
    "DEFAULT",
    "GENERATION_KEYS",
    "PROMPT_KEYS",
    "PROTOCOLS",
    "RECORDED_KEYS",
    "SAMPLING_KEYS",
    "WITHOUT_PROTOCOL",
    "BenchmarkProtocol",
    "Protocol",
    "ProtocolError",
    "ResolvedRun",
    "Setting",
    "check_protocol",
    "get_protocol",
    "protocol_details",
    "protocol_names",
    "protocol_rows",
    "protocol_settings",
    "protocols_table",
    "render_prompt",
    "resolve_run",
]

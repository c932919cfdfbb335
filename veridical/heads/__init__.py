"""Heads: attention interventions attached to a model for the span of one ``generate()`` call.

Each is a context manager built on :func:`veridical.attention.intercept_attention` and a registered
method name for :func:`veridical.generate`::

    with VAR(model, inputs):
        model.generate(**inputs)
    veridical.generate(model, inputs, methods=["var", "vcd"])

Layer choices written for 32-layer models (PAI's 2..31, VHR's "last 14", ...) are mapped onto other
depths at the same relative depth (:func:`veridical.heads.base.layer_range`); ``layers=`` overrides.
"""

from veridical.heads.act import ACT, calibrate_act_heads, load_heads, save_heads
from veridical.heads.base import HeadMethod
from veridical.heads.memvr import MemVR
from veridical.heads.pai import PAI
from veridical.heads.paint import PAINT
from veridical.heads.sinks import detect_sink_dims
from veridical.heads.vaf import VAF
from veridical.heads.var import VAR
from veridical.heads.vhr import VHR
from veridical.heads.vista import VISTA

__all__ = [
    "ACT",
    "MemVR",
    "PAI",
    "PAINT",
    "VAF",
    "VAR",
    "VHR",
    "VISTA",
    "HeadMethod",
    "calibrate_act_heads",
    "detect_sink_dims",
    "load_heads",
    "save_heads",
]

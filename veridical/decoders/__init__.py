"""Decoders: logits processors that change the next-token distribution.

Pass an instance to a stock ``model.generate(..., logits_processor=[...])`` or name it in
:func:`veridical.generate`.
"""

from veridical.contrastive import ContrastiveDecoder
from veridical.decoders.avisc import AvisC
from veridical.decoders.deco import DeCo
from veridical.decoders.m3id import M3ID
from veridical.decoders.opera import OPERA
from veridical.decoders.vcd import VCD

__all__ = ["VCD", "M3ID", "AvisC", "DeCo", "OPERA", "ContrastiveDecoder"]

"""Composing cartridges: several cartridges read as one buffer in one question.

Two layouts, chosen by measurement (docs/experiments.md):
- `consecutive`: each cartridge's buffer moved to follow the previous one, like consecutive
  text (a normalised cartridge sits at 0..K-1, so the second is re-rotated to start at K1);
- `overlap`: every buffer keeps its own positions and the question goes after the largest.
Both keep each cartridge's own internal distances; they differ in how far the question is
from each cartridge's entries.
"""

from __future__ import annotations

from typing import Literal

from .buffer import Buffer
from .errors import ModelMismatchError
from .format.cartridge import Cartridge

Layout = Literal["consecutive", "overlap"]
DEFAULT_LAYOUT: Layout = "consecutive"


def combine(carts: list[Cartridge], layout: Layout = DEFAULT_LAYOUT, force: bool = False) -> Buffer:
    """One reader buffer from several cartridges (all for the same model, unless forced)."""
    if len({c.fingerprint for c in carts}) > 1 and not force:
        raise ModelMismatchError("the cartridges were made for different models", hint="pass --force to mix them")
    if len(carts) == 1 or layout == "overlap":
        return Buffer.concat([c.buffer for c in carts])
    parts, offset = [], 0
    for cart in carts:
        low = int(cart.buffer.positions.min())
        part = cart.buffer.moved(cart.rope, offset - low)
        parts.append(part)
        offset = part.first_query_position
    return Buffer.concat(parts)

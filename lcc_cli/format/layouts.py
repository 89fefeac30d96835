"""Cartridge layouts: where each stored entry sits in RoPE positions, one entry of a table per
layout (after mlx-lm's cache kinds: a new layout is one row, and reading, checking and writing
do not change).

A cartridge stores entries in cache order: first its compiled segments' buffers, then, in an
indexed cartridge, the document's own KV window by window. A layout says

- where segment i must start (`segment_starts`): the manifest's `position_start` is checked
  against it, so a manifest that lies about positions is refused instead of answering nonsense;
- whether a file in it is readable only (`v1`: converted on load; saving lays it out anew),
  or only as an unfinished compile (`segments`);
- whether entries follow the segments (`indexed`: the document's KV, with its pages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import CartridgeError


def consecutive_starts(segments: list[dict]) -> list[int]:
    """One after another from 0, like consecutive text."""
    out, start = [], 0
    for s in segments:
        out.append(start)
        start += s["slots"]
    return out


@dataclass(frozen=True)
class Layout:
    name: str
    segment_starts: Callable[[list[dict]], list[int]]
    partial_only: bool = False  # only an unfinished compile's checkpoint is laid out so
    readable_only: bool = False  # never written: saving lays the buffers out consecutively
    indexed: bool = False  # the document's own KV follows the segments (manifest `index`)


LAYOUTS = {
    # every finished cartridge: buffers one after another, the question after the last
    "consecutive": Layout("consecutive", consecutive_starts),
    # a partial file keeps every finished segment at its own positions 0..K-1, so that a
    # resumed compile reproduces the uninterrupted one bit for bit
    "segments": Layout("segments", lambda segments: [0] * len(segments), partial_only=True),
    # lcc 0.1: each buffer right after its own segment's text (converted to v2 on load)
    "v1": Layout("v1", lambda segments: [s["token_count"] for s in segments], readable_only=True),
    # the gist (compiled segments, consecutive) and then the document's KV, window by window
    "indexed": Layout("indexed", consecutive_starts, indexed=True),
}


def layout_of(m: dict, name: str = "cartridge") -> Layout:
    key = "v1" if m.get("format_version") == 1 else m["buffer"].get("layout")
    layout = LAYOUTS.get(key) if isinstance(key, str) else None
    if layout is None:
        raise CartridgeError(f"{name}: unknown buffer.layout {str(key)[:20]!r}")
    return layout


def positions(m: dict) -> torch.Tensor:
    """The RoPE position of every stored entry, in cache order (a validated manifest)."""
    parts = [torch.arange(s["position_start"], s["position_start"] + s["slots"]) for s in m["buffer"]["segments"]]
    for w in (m["index"]["windows"] if layout_of(m).indexed else []):
        parts.append(torch.arange(w["position_start"], w["position_start"] + w["entries"]))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

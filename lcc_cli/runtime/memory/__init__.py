"""Memory: the one place that builds what a question reads from cartridges.

`lcc ask`, `chat`, `serve` and `eval` all build their memories with `open_memory`, from
cartridge paths, cartridges already open (the server holds its files open, verified), or a
library folder:

    memory = open_memory(paths, loaded)        # format, model checks, composition, the kind
    memory.end(question)                       # where its prompt starts (the window check)
    view = memory.view(question)               # runtime.reading.View: what it reads
    answer_rows(loaded, [Row(view, prompt)])   # the reading engine

A kind of memory is one class with `view`, `end` and `key`; readers never learn which kind
they hold:

- `Whole`: every entry of its cartridges, side by side (the question reads them all);
- `Routed`: a multi-segment cartridge read through only the segments the question's own
  attention favours (one extra pass over the question's tokens; issue 18; routed.py);
- `Paged`: indexed cartridges, each question reading the pages it chooses up to a budget,
  re-laid at consecutive positions (issue 29; paged.py, select.py);
- `LibraryMemory`: a folder of indexed cartridges asked as one (issue 30; library.py).

Composition lays cartridges out one after another (`consecutive`, like consecutive text:
each one's keys re-rotated to follow the previous) or lets them overlap at their own
positions (`overlap`; the question after the largest). Both keep each cartridge's internal
distances (docs/experiments.md measured them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Literal, Protocol

from ...buffer import Buffer
from ...config import ReadConfig
from ...errors import CartridgeError, ModelMismatchError, UsageError
from ...format.cartridge import Cartridge, CartridgeFile, open_cartridge
from ...format.checks import check_compatible, check_fingerprint
from ...format.layouts import layout_of
from ...library.index import Library
from ..reading import View

Layout = Literal["consecutive", "overlap"]
DEFAULT_LAYOUT: Layout = "consecutive"


class Memory(Protocol):
    mode: str  # what `ask --json` reports: "cartridge", "indexed" or "library"

    def view(self, question: str) -> View:
        """What `question` reads (runtime.reading.View)."""

    def end(self, question: str) -> int:
        """Where the prompt of `question` starts (without a reading prefix): the window check,
        from the choice alone, before any entry is read."""

    def key(self, question: str) -> Hashable:
        """Equal for questions that read the same entries (they may share one batch)."""


def open_cartridges(paths: list[Path]) -> list[CartridgeFile]:
    """Every cartridge opened and checked as a file (header, manifest, digests; a v1/v2 file
    read whole): before a model loads, so that a bad file fails in a second, not after the
    model's load. Entries are read later, by range, as the memory needs them."""
    return [open_cartridge(p) for p in paths]


def check_model(cart: Cartridge | CartridgeFile, loaded, name: str, force: bool = False) -> None:
    """Shapes, RoPE and window must fit the model (even with force); the fingerprint must be
    the model's unless forced."""
    m = cart.manifest
    end = m["buffer"]["first_query_position"]
    if layout_of(m, name).indexed:
        # never read whole: its gist must fit the window, and each window was encoded within it
        end = sum(s["slots"] for s in m["buffer"]["segments"])
        limit = loaded.facts.max_positions
        if limit and any(w["position_start"] + w["entries"] > limit for w in m["index"]["windows"]):
            raise ModelMismatchError(f"{name}: its pages were encoded past the model's {limit}-position window")
        tensors = getattr(cart, "index", None) if hasattr(cart, "read") else getattr(cart, "index_tensors", None)
    check_compatible(m["model"], loaded.facts, end, name)
    check_fingerprint(m["model"], loaded.model_id, loaded.fingerprint, name, force)
    if layout_of(m, name).indexed:
        tensors = getattr(cart, "index", None) if hasattr(cart, "read") else getattr(cart, "index_tensors", None)
        ids = (tensors or {}).get("index.token_ids")
        vocab = getattr(loaded.model.config, "vocab_size", None)
        if ids is not None and ids.numel() and vocab and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            # made for this very model (its fingerprint): ids it could not have written are damage
            raise CartridgeError(f"{name}: its token ids run outside the model's {vocab}-token vocabulary "
                                 f"(file corrupted or modified)")


def check_composable(indexed: list[bool], names: list[str]) -> None:
    """Indexed cartridges are read page by page: they compose with each other, not with others."""
    if any(indexed) and not all(indexed):
        plain = names[indexed.index(False)]
        raise UsageError(f"{plain} is not indexed; indexed cartridges are read page by page and cannot be "
                         f"composed with one that is not", hint="ask it on its own, or recompile it with --index")


def compose(carts: list[Cartridge], layout: Layout = DEFAULT_LAYOUT, force: bool = False) -> Buffer:
    """One buffer from several cartridges (all for the same model, unless forced)."""
    if len({c.fingerprint for c in carts}) > 1 and not force:
        raise ModelMismatchError("the cartridges were made for different models", hint="pass --force to mix them")
    if len(carts) == 1 or layout == "overlap":
        return Buffer.concat([c.buffer for c in carts])
    return Buffer.laid_out([c.buffer for c in carts], carts[0].rope)


class Whole:
    """Every entry of the composed cartridges, for every question."""

    mode = "cartridge"

    def __init__(self, buffer: Buffer, loaded=None):
        self.buffer = buffer if loaded is None else buffer.to(loaded.device, loaded.dtype)
        self._view = View(self.buffer, key=("whole", id(self.buffer)))

    def view(self, question: str) -> View:
        return self._view

    def end(self, question: str) -> int:
        return self.buffer.first_query_position

    def key(self, question: str) -> Hashable:
        return self._view.key


def open_memory(sources: list, loaded, names: list[str] | None = None, force: bool = False,
                layout: Layout = DEFAULT_LAYOUT, route: int | None = None, read: ReadConfig | None = None,
                library=None) -> Memory:
    """The memory a question reads, checked against the model. `sources`: cartridge paths, or
    cartridges already open (CartridgeFile, Cartridge); `library`: a library (library.index
    .Library, or its folder) instead. Indexed cartridges are read page by page (`read`: budget,
    selector, layout, re-encoding), others whole (`route`: each question reads only that many
    segments of a one-cartridge, multi-segment memory)."""
    if library is not None:
        from .library import LibraryMemory

        if not hasattr(library, "search"):
            library = Library(Path(library))
        library.refresh(check=lambda f, name: check_model(f, loaded, name, force))  # what ask would refuse, skipped
        return LibraryMemory(loaded, library, read, check=lambda s: check_model(s.handle, loaded, s.name, force))
    carts = [open_cartridge(s) if isinstance(s, (str, Path)) else s for s in sources]
    names = names or [Path(s).name if isinstance(s, (str, Path)) else f"cartridge {i + 1}"
                      for i, s in enumerate(sources)]
    for cart, name in zip(carts, names):
        check_model(cart, loaded, name, force)
    if len({c.manifest["model"]["fingerprint"] for c in carts}) > 1 and not force:
        raise ModelMismatchError("the cartridges were made for different models", hint="pass --force to mix them")
    indexed = [layout_of(c.manifest).indexed for c in carts]
    check_composable(indexed, names)
    if any(indexed):
        from .paged import Paged, Source

        return Paged(loaded, [Source(n, c) for n, c in zip(names, carts)], read)
    whole = [c.cartridge() if isinstance(c, CartridgeFile) else c for c in carts]
    if route and len(whole) == 1 and len(whole[0].segments) > route:
        from .routed import Routed

        return Routed(loaded, whole[0], route)
    return Whole(compose(whole, layout, force), loaded)


def open_library(folder: Path):
    """A folder of cartridges asked as one, its index opened (and checked: library/); it is
    brought up to date, with the model's checks, when its memory is opened."""
    return Library(folder)

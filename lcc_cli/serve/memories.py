"""Memories the server reads per request: indexed cartridges (each request's own pages) and the
served folder asked as one library. Both run in worker threads; each guards its own state."""

from __future__ import annotations

from ..errors import LccError, UsageError
from .catalog import Catalog
from .errors import ApiError


class PagedCartridges:
    """Indexed cartridges for the server: one `Paged` memory per set of cartridges (by their
    digests), its files held open, the few most recent kept; each request's pages read from
    them by range, under that memory's lock (it remembers its last choice)."""

    KEEP = 16

    def __init__(self, loaded, catalog: Catalog):
        import threading
        from collections import OrderedDict

        self.loaded, self.catalog = loaded, catalog
        self._memories: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def retain(self, live: set[str]) -> None:
        """Drop the memories (and close the files) of cartridges no longer served."""
        with self._lock:
            for key in [k for k in self._memories if not all(d in live for d in k)]:
                del self._memories[key]

    def view(self, key: tuple, entries: list, question: str, admit):
        memory, lock = self._memory(key, entries)
        with lock:
            try:
                buffer = memory.view(question)
            except LccError as exc:  # a file changed or damaged under us: never served
                with self._lock:
                    self._memories.pop(key, None)
                raise ApiError(503, f"{exc.message}: try again", "server_error", "model_changed") from None
            admit(buffer.first_query_position)
            return (key, memory.key(question)), buffer, memory.read_pages(question)

    def _memory(self, key, entries):
        import threading

        from ..runtime.memory.paged import Paged, Source

        with self._lock:
            if key in self._memories:
                self._memories.move_to_end(key)
                return self._memories[key]
        try:
            held = {e.facts.digest: self.catalog.held(e) for e in entries}
        except (LccError, OSError):
            raise ApiError(503, "a cartridge changed on disk: try again", "server_error", "model_changed") from None
        memory = Paged(self.loaded, [Source(e.found.shown, held[e.facts.digest]) for e in entries])
        with self._lock:
            self._memories[key] = (memory, threading.Lock())
            while len(self._memories) > self.KEEP:
                self._memories.popitem(last=False)
            return self._memories[key]


class ServedLibrary:
    """The first served folder asked as one (model name `library`): its index brought up to
    date before every request (a cartridge dropped in is searchable at once; one listing and a
    stat per file when nothing changed), then a `LibraryMemory` chooses and reads the pages."""

    def __init__(self, loaded, folder):
        import threading

        self.loaded, self.folder = loaded, folder
        self._lock = threading.Lock()
        self._library = None
        self._memory = None

    def _ready(self):
        from ..library.index import Library
        from ..runtime.memory import check_model
        from ..runtime.memory.library import LibraryMemory

        if self._library is None:
            self._library = Library(self.folder)
        self._library.refresh()
        if self._memory is None:
            self._memory = LibraryMemory(self.loaded, self._library,
                                         check=lambda s: check_model(s.handle, self.loaded, s.name))
        self._memory.forget_choices()  # the index may have changed: choose (and read) afresh
        return self._memory

    def view(self, question: str, admit):
        with self._lock:
            try:
                memory = self._ready()
                buffer = memory.view(question)
            except LccError as exc:
                raise ApiError(404 if isinstance(exc, UsageError) else 503, exc.message,
                               code="model_unavailable") from None
            admit(buffer.first_query_position)
            return ("library", memory.checksums(question), memory.key(question)), buffer, memory.read_pages(question)

    def summary(self) -> dict:
        with self._lock:
            try:
                from ..library.index import Library

                self._library = self._library or Library(self.folder)
                self._library.refresh()
                carts = self._library.cartridges()
            except LccError as exc:
                return {"available": False, "reason": exc.message, "library": True}
        return {"available": bool(carts), "library": True, "cartridges": len(carts),
                "pages": sum(c["pages"] or 0 for c in carts), "tokens": sum(c["tokens"] or 0 for c in carts)}

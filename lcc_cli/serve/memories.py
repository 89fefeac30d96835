"""Memories the server reads per request: indexed cartridges (each request's own pages) and the
served folder asked as one library. Both are built by `runtime.memory.open_memory`, as for
`lcc ask`; both run in worker threads, and each guards its own state."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..config import ReadConfig
from ..errors import LccError, UsageError
from .catalog import Catalog
from .errors import ApiError


def _keyed(view, key: tuple):
    """The view under the server's batch key (what it reads, by content: digests and choice)."""
    view.key = key
    return view


class PagedCartridges:
    """Indexed cartridges for the server: one memory per set of cartridges (by their digests)
    and read settings, its files held open, the few most recent kept; each request's pages
    read from them by range, under that memory's lock."""

    KEEP = 16

    def __init__(self, loaded, catalog: Catalog):
        self.loaded, self.catalog = loaded, catalog
        self._memories: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def retain(self, live: set[str]) -> None:
        """Drop the memories (and close the files) of cartridges no longer served."""
        with self._lock:
            for key in [k for k in self._memories if not all(d in live for d in k[0])]:
                del self._memories[key]

    def view(self, key: tuple, entries: list, question: str, admit, read: ReadConfig):
        memory, lock = self._memory(key, entries, read)
        with lock:
            try:
                admit(memory.end(question))  # the window, from the choice, before any page is read
                view = memory.view(question)
            except ApiError:
                raise
            except UsageError as exc:
                raise ApiError(400, exc.message, code="invalid_request") from None
            except LccError as exc:  # a file changed or damaged under us: never served
                with self._lock:
                    self._memories.pop((key, _read_key(read)), None)
                raise ApiError(503, f"{exc.message}: try again", "server_error", "model_changed") from None
            return _keyed(view, (key, memory.key(question)))

    def _memory(self, key, entries, read: ReadConfig):
        from ..runtime.memory import open_memory

        slot = (key, _read_key(read))
        with self._lock:
            if slot in self._memories:
                self._memories.move_to_end(slot)
                return self._memories[slot]
        try:
            held = [self.catalog.held(e) for e in entries]
            memory = open_memory(held, self.loaded, [e.found.shown for e in entries], read=read)
        except UsageError as exc:
            raise ApiError(400, exc.message, code="invalid_request") from None
        except (LccError, OSError):
            raise ApiError(503, "a cartridge changed on disk: try again", "server_error", "model_changed") from None
        with self._lock:
            self._memories[slot] = (memory, threading.Lock())
            while len(self._memories) > self.KEEP:
                self._memories.popitem(last=False)
            return self._memories[slot]


class ServedLibrary:
    """The first served folder asked as one (model name `library`): its index brought up to
    date before every request (a cartridge dropped in is searchable at once; one listing and a
    stat per file when nothing changed), then a `LibraryMemory` chooses and reads the pages."""

    def __init__(self, loaded, folder):
        self.loaded, self.folder = loaded, folder
        self._lock = threading.Lock()
        self._library = None
        self._memories: dict = {}

    def _ready(self, read: ReadConfig):
        from ..library.index import Library
        from ..runtime.memory import open_memory

        from ..runtime.memory import check_model

        if self._library is None:
            self._library = Library(self.folder)
        self._library.refresh(check=lambda f, name: check_model(f, self.loaded, name))
        if not self._library.cartridges():
            raise ApiError(404, "the library holds no indexed cartridges the model can read", code="model_unavailable")
        slot = _read_key(read)
        if slot not in self._memories:
            if len(self._memories) > 16:
                self._memories.clear()
            self._memories[slot] = open_memory([], self.loaded, read=read, library=self._library)
        memory = self._memories[slot]
        memory.forget_choices()  # the index may have changed: choose (and read) afresh
        return memory

    def view(self, question: str, admit, read: ReadConfig):
        with self._lock:
            try:
                memory = self._ready(read)
                admit(memory.end(question))
                view = memory.view(question)
            except ApiError:
                raise
            except UsageError as exc:
                raise ApiError(400, exc.message, code="invalid_request") from None
            except LccError as exc:
                raise ApiError(503, exc.message, code="model_unavailable") from None
            return _keyed(view, ("library", memory.checksums(question), memory.key(question)))

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


def _read_key(read: ReadConfig) -> tuple:
    return tuple(sorted(vars(read).items()))

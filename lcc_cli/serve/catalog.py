"""Which cartridges a server offers: every *.lcc in the served folders (looked at again
whenever a request needs the list) and every file named on the command line.

Each file is verified before it is served, with the checks `lcc verify` runs: the header and
manifest, every block's sha256 and every value, then shapes, RoPE, window and fingerprint
against the loaded model. A file that fails is listed as unavailable with its reason and
never served. A request names cartridges only by their name in this catalog (the file
stem), so no request can make the server open a path.

The served folder is a boundary. A symbolic link in it is listed as unavailable and never
opened (a link could point anywhere, /etc/passwd included); so is anything that is not a
regular file, and a file whose name holds '+' (a model name joins cartridges with '+', so no
request could name it). Files are opened with format.cartridge.open_held (no link followed)
and read through that one descriptor, so a file swapped for a link after it was listed is not
followed either.
Reasons name files by their name in the folder, never by a server path.

A file is known by its content: its manifest digest (`tensor_sha256` and `lcc_checksum`,
read from the header). A change to a file, even one written in place with its mtime put
back, changes its ctime; the file is then verified again, and what is read for a request is
checked against the digest that was verified (and, block by block, against the file's own
sha256s).

Verification runs in the catalog's own thread. The lock that guards the list is held only to
read or swap entries, never while a file is read: /health and requests for cartridges already
verified never wait for the files being verified.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CartridgeError, LccError

LINK = "a symbolic link (links in a served folder are not followed)"
NOT_REGULAR = "not a regular file"
LIBRARY = "library"  # the model name of the served folder asked as one (runtime/memory/library.py)
PLUS = "its name holds '+', which joins cartridges in a model name: rename the file to serve it"
READ_STEP = 64  # blocks decoded at a time while a file is verified: memory stays bounded


@dataclass(frozen=True)
class Found:
    """A candidate file as the folder listing saw it."""

    name: str  # the model name it is asked by (the file stem)
    path: Path
    shown: str  # how messages name it: its name in the folder
    signature: tuple = ()  # (device, inode, size, mtime, ctime): ctime moves with every write
    refused: str = ""  # why it is not even opened


@dataclass(frozen=True)
class Facts:
    """What a verified cartridge is, read from its manifest: enough to check a request's
    window and compose its memory without building anything."""

    digest: str  # content key: tensor_sha256 and lcc_checksum
    slots: int
    low: int  # the lowest position of an entry
    first: int  # where the first token read after it goes
    summary: dict
    indexed: bool = False  # each question reads its own pages (runtime/memory/paged.py)


@dataclass(frozen=True)
class Entry:
    name: str
    found: Found
    facts: Facts | None = None  # when available
    reason: str = ""  # why it is unavailable
    pending: bool = False  # found, not yet verified

    @property
    def available(self) -> bool:
        return self.facts is not None

    def summary(self) -> dict:
        if self.pending:
            return {"available": False, "reason": "being verified"}
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, **self.facts.summary}


class Catalog:
    """Thread-safe. `refresh()` lists the folders and queues what is new or changed for the
    verifier thread (one directory listing and one lstat per file)."""

    def __init__(self, loaded, folders: list[Path], files: list[Path]):
        self.loaded, self.folders = loaded, [Path(f) for f in folders]
        # A file named on the command line is the operator's choice: a link there is resolved
        # once, here, and its target opened as any other file.
        self.files = [(Path(os.path.realpath(f)), Path(f).name) for f in files]
        self._entries: dict[str, Entry] = {}
        self._queue: list[Found] = []
        self._closed = False
        self._changed = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._verify_forever, name="lcc-catalog", daemon=True)
        self._thread.start()
        self.refresh()
        self.wait()

    # --- what requests ask ---------------------------------------------------------------------

    def get(self, name: str) -> Entry | None:
        with self._changed:
            return self._entries.get(name)

    def listing(self) -> list[Entry]:
        with self._changed:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def counts(self) -> dict:
        with self._changed:
            entries = list(self._entries.values())
        return {"cartridges": sum(e.available for e in entries),
                "unavailable": sum(not e.available and not e.pending for e in entries),
                "verifying": sum(e.pending for e in entries)}

    def digests(self) -> set[str]:
        with self._changed:
            return {e.facts.digest for e in self._entries.values() if e.available}

    def settled(self, names=None) -> bool:
        """True when none of `names` (default: every file) waits to be verified."""
        with self._changed:
            return not self._waiting(names)

    def wait(self, names=None, timeout: float = 600.0) -> None:
        """Block until `names` (default: every file) are verified."""
        with self._changed:
            self._changed.wait_for(lambda: not self._waiting(names), timeout)

    def refresh(self, urgent=()) -> None:
        """Look at the folders again: forget files that are gone, queue new and changed ones
        (those in `urgent`, named by a waiting request, first)."""
        found = self._scan()
        with self._changed:
            for name in [n for n in self._entries if n not in found]:
                del self._entries[name]
            self._queue = [f for f in self._queue if found.get(f.name) == f]
            for name, f in found.items():
                old = self._entries.get(name)
                if old is not None and old.found.path == f.path and old.found.signature == f.signature:
                    continue  # verified as it is now, or already queued
                if f.refused:
                    self._entries[name] = Entry(name, f, reason=f.refused)
                    continue
                self._entries[name] = Entry(name, f, pending=True)
                self._queue.append(f)
            self._queue.sort(key=lambda f: f.name not in urgent)
            self._changed.notify_all()

    def close(self) -> None:
        """End the verifier thread (a file it is verifying is finished first)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=60)

    def read(self, entry: Entry):
        """The cartridge (format.cartridge.Cartridge) behind a verified entry, read again and
        checked: every block it reads against its sha256, its digest against the one verified.
        A file that changed since is queued to be verified again and refused here."""
        try:
            return self.held(entry).cartridge()
        except Exception as exc:
            self._requeue(entry)
            if isinstance(exc, LccError):
                raise
            raise CartridgeError(f"{entry.found.shown} could not be read again ({type(exc).__name__})") from exc

    # --- under the lock ------------------------------------------------------------------------

    def _waiting(self, names) -> bool:
        if names is None:
            return any(e.pending for e in self._entries.values())
        return any(self._entries.get(n) is not None and self._entries[n].pending for n in names)

    def _requeue(self, entry: Entry) -> None:
        with self._changed:
            if self._entries.get(entry.name) == entry:
                self._entries[entry.name] = Entry(entry.name, entry.found, pending=True)
                self._queue.insert(0, entry.found)
                self._changed.notify_all()

    # --- the folders ---------------------------------------------------------------------------

    def _scan(self) -> dict[str, Found]:
        found: dict[str, Found] = {}
        for path, shown in self.files:
            found.setdefault(Path(shown).stem, self._look(path, Path(shown).stem, shown))
        for folder in self.folders:
            try:
                with os.scandir(folder) as listing:
                    names = sorted(item.name for item in listing)
            except OSError:
                continue
            for file_name in names:
                # *.lcc only: not partial files, not hidden temporary files of a write in progress
                if file_name.endswith(".lcc") and not file_name.startswith("."):
                    found.setdefault(file_name[:-4], self._look(folder / file_name, file_name[:-4], file_name))
        return found

    def _look(self, path: Path, name: str, shown: str) -> Found:
        try:
            st = os.lstat(path)
        except OSError as exc:
            return Found(name, path, shown, (), f"cannot read: {exc.strerror}")
        signature = _signature(st)
        if stat.S_ISLNK(st.st_mode):
            return Found(name, path, shown, signature, LINK)
        if not stat.S_ISREG(st.st_mode):
            return Found(name, path, shown, signature, NOT_REGULAR)
        if "+" in name:
            return Found(name, path, shown, signature, PLUS)
        if name in (self.loaded.model_id, LIBRARY):
            return Found(name, path, shown, signature, f"it has the {'plain model' if name != LIBRARY else 'library'}'s "
                                                       f"name, which a request for it would get instead: rename the "
                                                       f"file to serve it")
        return Found(name, path, shown, signature)

    # --- the verifier thread -------------------------------------------------------------------

    def _verify_forever(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                f = self._queue.pop(0)
            entry = self._verify(f)
            with self._changed:
                current = self._entries.get(f.name)
                if current is not None and current.pending and current.found == f:  # not superseded since
                    self._entries[f.name] = entry
                self._changed.notify_all()

    def _verify(self, f: Found) -> Entry:
        from ..format.cartridge import open_held

        try:
            cart = open_held(f.path, f.shown)
            facts = self._check_model(cart, f.shown)
            _read_every_block(cart)
            return Entry(f.name, replace(f, signature=_signature(cart.stat)), facts)
        except LccError as exc:
            return Entry(f.name, f, reason=LINK if "symbolic link" in exc.message else exc.message)
        except OSError as exc:
            return Entry(f.name, f, reason=f"cannot read: {exc.strerror}")
        except Exception as exc:  # never let one file take the server down
            return Entry(f.name, f, reason=f"unreadable ({type(exc).__name__})")

    def _check_model(self, cart, shown: str) -> Facts:
        from ..runtime.memory import check_model
        from ..runtime.memory.paged import default_budget

        m, positions = cart.manifest, cart.positions
        low, first = (int(positions.min()), int(positions.max()) + 1) if len(positions) else (0, 0)
        check_model(cart, self.loaded, shown)  # an indexed one: its gist, and each window it was encoded in
        source = m.get("source") or {}
        summary = {"slots": len(positions), "source": source.get("name"), "tokens": source.get("token_count"),
                   "ratio": source.get("ratio"), "segments": len(m["buffer"]["segments"]),
                   "created": m.get("created"), "compiler": (m.get("compiler") or {}).get("name")}
        index = m.get("index")
        if index:
            summary.update(indexed=True, pages=len(index["pages"]), storage=m["buffer"]["dtype"],
                           budget=default_budget(source["token_count"], source.get("ratio") or 16.0))
        return Facts(_digest(cart), len(positions), low, first, summary, bool(index))

    def held(self, entry: Entry):
        """A verified indexed cartridge kept open for ranged reads (format.cartridge.open_held:
        a question reads its pages only), its digest checked against the one verified."""
        from ..format.cartridge import open_held

        held = open_held(entry.found.path, entry.found.shown)
        if _digest(held) != entry.facts.digest:
            self._requeue(entry)
            raise CartridgeError(f"{entry.found.shown} changed since it was verified")
        return held


def composed_first(facts: list[Facts]) -> int:
    """Where the first token read after these cartridges, composed as `runtime.memory.compose`
    lays them out, goes: one keeps its positions; several follow one another, each keeping its
    own span."""
    if len(facts) == 1:
        return facts[0].first
    return sum(f.first - f.low for f in facts if f.slots)


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _digest(cart) -> str:
    return f"{cart.manifest.get('tensor_sha256')}:{cart.meta.get('lcc_checksum')}"


def _read_every_block(cart) -> None:
    """Every block read and checked (sha256, values), a few at a time; v1/v2 files were read
    and checked whole when opened."""
    if cart.version < 3:
        return
    step = cart.block * READ_STEP
    for start in range(0, cart.entries, step):
        cart.read(start, min(cart.entries, start + step))

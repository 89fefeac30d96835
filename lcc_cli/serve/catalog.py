"""Which cartridges a server offers: every *.lcc in the served folders (found at start and
whenever the folder changes) and every file named on the command line.

Each file is verified before it is served (the loader's integrity checks, then shapes and
fingerprint against the loaded model). A file that fails is listed as unavailable with its
reason and never served. A request names cartridges only by their name in this catalog
(the file stem), so no request can make the server open a path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import LccError


@dataclass
class Entry:
    name: str
    path: Path
    signature: tuple  # (mtime_ns, size): a changed file is verified again
    cartridge: object | None = None  # format.cartridge.Cartridge when available
    reason: str = ""  # why it is unavailable

    @property
    def available(self) -> bool:
        return self.cartridge is not None

    def summary(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason}
        m = self.cartridge.manifest
        return {"available": True, "slots": self.cartridge.slots, "source": m["source"].get("name"),
                "tokens": m["source"].get("token_count"), "ratio": m["source"].get("ratio"),
                "segments": len(self.cartridge.segments), "created": m.get("created"),
                "compiler": (m.get("compiler") or {}).get("name")}


class Catalog:
    """Thread-safe; `refresh()` is cheap when nothing changed (one directory listing)."""

    def __init__(self, loaded, folders: list[Path], files: list[Path]):
        self.loaded, self.folders, self.files = loaded, [Path(f) for f in folders], [Path(f) for f in files]
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self.refresh()

    def _candidates(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in self.files:
            found.setdefault(path.stem, path)
        for folder in self.folders:
            try:
                listing = sorted(folder.iterdir())
            except OSError:
                continue
            for path in listing:
                # *.lcc only: not partial files, not hidden temporary files of a write in progress
                if path.suffix == ".lcc" and not path.name.startswith("."):
                    found.setdefault(path.stem, path)
        return found

    def refresh(self) -> None:
        with self._lock:
            found = self._candidates()
            for name in list(self.entries):
                if name not in found:
                    del self.entries[name]
            for name, path in found.items():
                try:
                    st = path.stat()
                    signature = (st.st_mtime_ns, st.st_size)
                except OSError as exc:
                    self.entries[name] = Entry(name, path, (), reason=f"cannot read: {exc.strerror}")
                    continue
                old = self.entries.get(name)
                if old is None or old.signature != signature or old.path != path:
                    self.entries[name] = self._verify(name, path, signature)

    def _verify(self, name: str, path: Path, signature: tuple) -> Entry:
        from ..runtime.memory import check_model, read_cartridges

        try:
            (cart,) = read_cartridges([path])
            check_model(cart, self.loaded, path.name)
        except LccError as exc:
            return Entry(name, path, signature, reason=exc.message)
        except Exception as exc:  # never let one file take the server down
            return Entry(name, path, signature, reason=f"unreadable ({type(exc).__name__})")
        return Entry(name, path, signature, cartridge=cart)

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self.entries.get(name)

    def listing(self) -> list[Entry]:
        with self._lock:
            return sorted(self.entries.values(), key=lambda e: e.name)

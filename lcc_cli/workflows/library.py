"""`lcc index DIR`: a library's SQLite index brought up to date (library/index.py)."""

from __future__ import annotations

from pathlib import Path

from ..progress import NO_PROGRESS, Progress


def index_folder(folder: Path, rebuild: bool = False, progress: Progress = NO_PROGRESS):
    """Index every indexed cartridge in FOLDER (new, replaced and removed ones, by checksum);
    `rebuild` starts from an empty index. Returns library.index.RefreshResult."""
    from ..library.index import Library

    library = Library(folder)
    if rebuild:
        library.rebuild()
    progress.start("cartridges", 0)

    def step(done: int, total: int, name: str) -> None:
        if done == 0:
            progress.start("cartridges", total)
        progress.advance("cartridges")

    try:
        return library.refresh(progress=step)
    finally:
        library.close()

"""`lcc index DIR`: a library's SQLite index brought up to date (library/index.py)."""

from __future__ import annotations

from pathlib import Path

from ..config import RunOptions
from ..progress import NO_PROGRESS, Progress
from .common import load


def index_folder(folder: Path, rebuild: bool = False, progress: Progress = NO_PROGRESS, run: RunOptions | None = None,
                 loaded=None):
    """Index every indexed cartridge in FOLDER (new, replaced and removed ones, by checksum),
    each checked against the model as `ask` checks it (one that cannot be read is listed as
    unreadable, not indexed); `rebuild` starts from an empty index. `loaded`: the model already
    loaded (a batch compile's). Returns library.index.RefreshResult."""
    from ..library.index import Library
    from ..runtime.memory import check_model

    library = Library(folder, rebuild=rebuild)
    if rebuild:
        library.rebuild()
    if loaded is None:
        progress.status("loading model…")
        loaded = load(run or RunOptions())
    progress.start("cartridges", 0)

    def step(done: int, total: int, name: str) -> None:
        if done == 0:
            progress.start("cartridges", total)
        progress.advance("cartridges")

    try:
        return library.refresh(progress=step, check=lambda f, name: check_model(f, loaded, name))
    finally:
        library.close()

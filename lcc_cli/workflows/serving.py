"""`lcc serve`: the model loaded once, the cartridges served over HTTP until stopped."""

from __future__ import annotations

from pathlib import Path

from ..config import RunOptions
from ..errors import UsageError
from ..progress import NO_PROGRESS, Progress
from .common import governed, load


def serve(paths: list[Path], host: str, port: int, limits, api_key: str | None = None,
          run: RunOptions | None = None, progress: Progress = NO_PROGRESS, warn=None, access=None,
          read=None) -> None:
    """`lcc serve`: load the model once and answer from the cartridges over HTTP until stopped.
    `access` (serve.guard.Access): the Host names and web origins allowed besides the defaults;
    `read` (config.ReadConfig): how indexed cartridges are read unless a request says otherwise."""
    from ..serve.run import is_loopback, serve as serve_forever

    for path in map(Path, paths):
        if not path.exists():
            raise UsageError(f"nothing to serve at {path}: no such file or folder")
    if not api_key and not is_loopback(host) and warn is not None:
        warn(f"listening on {host} without --api-key: anyone who can reach this address can use the server")
    run = run or RunOptions()
    progress = governed(run, progress)
    progress.status("loading model…")
    serve_forever(load(run), [Path(p) for p in paths], host, port, limits, api_key, progress, access, read)



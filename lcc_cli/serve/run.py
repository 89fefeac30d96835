"""Start and stop the server: the model once, the catalog, the engine, the app, uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ..errors import UsageError
from .app import Limits, create_app
from .catalog import Catalog
from .engine import Engine


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(loaded, paths: list[Path], limits: Limits, api_key: str | None = None):
    """(app, catalog, engine) for these folders and files."""
    folders, files = [], []
    for path in map(Path, paths):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"nothing to serve at {path}: not a folder or a cartridge")
    catalog = Catalog(loaded, folders, files)
    engine = Engine(loaded, max_batch=limits.max_batch, max_queue=limits.max_queue)
    return create_app(loaded, catalog, engine, limits, api_key), catalog, engine


def _exit_zero_server(config):
    """A uvicorn server that treats SIGINT/SIGTERM as a shutdown asked for: uvicorn re-raises
    the signal after its graceful shutdown (the process then dies of it); here it exits 0."""
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            wanted = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, lambda sig, frame: self.handle_exit(sig, frame)) for s in wanted}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    return Server(config)


def serve(loaded, paths: list[Path], host: str, port: int, limits: Limits, api_key: str | None, progress) -> None:
    """Serve until SIGINT or SIGTERM; in-flight requests finish (30 s at most), then return."""
    import uvicorn

    app, catalog, engine = build(loaded, paths, limits, api_key)
    listing = catalog.listing()
    for entry in listing:
        if not entry.available:
            progress.status(f"unavailable: {entry.name} ({entry.reason})")
    progress.status(f"serving {sum(e.available for e in listing)} cartridges and {loaded.model_id} "
                    f"on http://{host}:{port}/v1")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                            limit_concurrency=limits.max_queue * 2 + 16)
    server = _exit_zero_server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit when it cannot bind
        raise UsageError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)",
                         field="port") from None
    finally:
        engine.stop()

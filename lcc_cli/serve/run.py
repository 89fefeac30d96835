"""Start and stop the server: the model once, the catalog, the engine, the app, uvicorn.

uvicorn runs with the guarded h11 protocol (protocol.py: header timeout, a connection cap
that idle sockets cannot fill) and without its own `limit_concurrency`, which counted idle
sockets against every request. Lines the server logs name files by their name in the
folder with control characters escaped: a file name cannot forge a log line.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ..errors import UsageError
from .app import create_app
from .schema import Limits
from .catalog import Catalog
from .engine import Engine
from .guard import Access
from .protocol import protocol_class


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def printable(text: str) -> str:
    """`text` on one line: control characters (newlines included) written as escapes."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


def build(loaded, paths: list[Path], limits: Limits, api_key: str | None = None, access: Access | None = None,
          read=None):
    """(app, catalog, engine) for these folders and files (`read`: the server's ReadConfig)."""
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
    return create_app(loaded, catalog, engine, limits, api_key, access or Access(), read), catalog, engine


def server_config(app, host: str, port: int, limits: Limits, **extra):
    """uvicorn's Config for the app: the guarded protocol, no limit_concurrency."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=protocol_class(limits.header_timeout, limits.max_connections),
                          timeout_graceful_shutdown=30, **{"log_level": "warning", **extra})


def announce(catalog: Catalog, loaded, host: str, port: int, progress) -> None:
    """What is served, and why each file that is not is unavailable."""
    listing = catalog.listing()
    for entry in listing:
        if not entry.available:
            progress.status(printable(f"unavailable: {entry.name} ({entry.reason})"))
    progress.status(printable(f"serving {sum(e.available for e in listing)} cartridges and {loaded.model_id} "
                              f"on http://{host}:{port}/v1"))


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


def serve(loaded, paths: list[Path], host: str, port: int, limits: Limits, api_key: str | None, progress,
          access: Access | None = None, read=None) -> None:
    """Serve until SIGINT or SIGTERM; in-flight requests finish (30 s at most), then return."""
    app, catalog, engine = build(loaded, paths, limits, api_key, access, read)
    announce(catalog, loaded, host, port, progress)
    server = _exit_zero_server(server_config(app, host, port, limits))
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit when it cannot bind
        raise UsageError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)",
                         field="port") from None
    finally:
        engine.stop()
        catalog.close()

"""The command line: app.py (the Typer app, shared options, the one error handler),
documents.py (compile, ask, chat, inspect, verify), tools.py (eval, export, import,
train-compiler, serve), progress.py (bars), render.py (safe output). Importing the command
modules registers their commands on the app."""

from . import documents, tools  # noqa: F401  (they register their commands)
from .app import app, main

__all__ = ["app", "main"]

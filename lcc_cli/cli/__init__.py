"""The command line: app.py (commands), progress.py (bars), render.py (safe output)."""

from .app import app, main

__all__ = ["app", "main"]

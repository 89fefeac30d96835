"""The one progress protocol: long work reports what it is doing; the CLI draws it.

Work is a set of named tasks ("segments", "steps", "documents", "train"), each started with
a total and advanced with optional metrics (losses, tokens per second). The base class
ignores everything, so engine code can always call it; `cli/progress.py` renders it with
rich, and tests subclass it to watch or to press Ctrl-C at a chosen moment.
"""

from __future__ import annotations


class Progress:
    def status(self, text: str) -> None:
        """A one-line message ("loading model…")."""

    def start(self, task: str, total: int | None, label: str = "") -> None:
        """Begin (or restart) a task of `total` units; `label` says what it is working on."""

    def advance(self, task: str, n: int = 1, **metrics) -> None:
        """`n` more units of `task` are done; `metrics` are the latest figures to show."""

    def note(self, text: str) -> None:
        """A line that stays in the log (a finished document, a retried unit)."""


NO_PROGRESS = Progress()

"""Rich rendering of the progress protocol (lcc_cli/progress.py): one bar per task, the
latest losses beside the step bar, and log lines above the bars."""

from __future__ import annotations

from ..progress import Progress
from .render import clean


class RichProgress(Progress):
    def __init__(self, console, quiet: bool):
        self.console, self.quiet = console, quiet
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        from rich.progress import BarColumn, Progress as Bars, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bars = Bars(TextColumn("[bold]{task.description}"), BarColumn(),
                         TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[metrics]}"),
                         TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                         console=self.console, disable=self.quiet, transient=False)
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def status(self, text: str) -> None:
        if not self.quiet:
            self.console.print(clean(text), markup=False, highlight=False)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.bars.print(clean(text), markup=False, highlight=False)

    def start(self, task: str, total: int | None, label: str = "") -> None:
        description = clean(label or task)
        if task in self.tasks:
            self.bars.reset(self.tasks[task], total=total, description=description, metrics="")
        else:
            self.tasks[task] = self.bars.add_task(description, total=total, metrics="")

    def advance(self, task: str, n: int = 1, **metrics) -> None:
        if task not in self.tasks:
            self.start(task, None)
        shown = " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                         if k in _SHOWN)
        self.bars.update(self.tasks[task], advance=n, **({"metrics": shown} if shown else {}))


# The figures worth a glance while work runs; everything else goes to the manifest or report.
_SHOWN = ("recon", "kl", "qa", "cloze", "loss", "tok_s")

"""`lcc chat`: a REPL over one Reader, the model loaded once.

It works as people expect a REPL to: line editing and history with the arrow keys (readline,
kept in $LCC_HOME/chat_history), Ctrl-C cancels the answer being written (or the line being
typed) and stays, Ctrl-D or /quit leaves. Commands start with '/': /help, /pages (what the
last answer read), /budget N (the entries each question reads; /budget alone: the default).
Each question is answered on its own: earlier turns are not remembered.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import AskConfig, lcc_home
from ..errors import LccError, UsageError
from ..runtime.reading import NO_PAGES
from .render import clean

HELP = """commands:
  /help          this list
  /pages         the pages the last answer read (indexed cartridges and libraries)
  /budget N      entries of pages each question reads (/budget alone: the cartridge's default)
  /quit          leave (or Ctrl-D); Ctrl-C cancels the answer being written"""


def _history() -> None:
    """Arrow-key editing and a history kept across sessions, where the terminal has readline."""
    try:
        import atexit
        import readline
    except ImportError:  # no readline (some platforms): plain input still works
        return
    path = lcc_home() / "chat_history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _save(readline, path))


def _save(readline, path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def repl(reader, cfg: AskConfig, out, err, show_pages: bool, print_pages) -> None:
    import sys

    if sys.stdin.isatty():
        _history()
    err.print(f"ready ({reader.mode}); ask a question, /help for commands, Ctrl-D to quit", highlight=False)
    last = None
    while True:
        try:
            line = input("> ")
        except EOFError:
            out.print()
            return
        except KeyboardInterrupt:  # the line being typed is dropped, the session goes on
            out.print()
            continue
        text = line.strip()
        if text.lower() in ("exit", "quit", "/quit", "/exit"):
            return
        if not text:
            continue
        if text.startswith("/"):
            last = _command(text, reader, last, out, err, print_pages)
            continue
        try:
            last = reader.ask(line, on_text=lambda piece: out.print(clean(piece), end="", markup=False), **vars(cfg))
        except KeyboardInterrupt:
            out.print()
            err.print("(cancelled)", highlight=False)
            continue
        except UsageError as exc:  # a question that does not fit: say so and go on
            err.print(f"lcc: {clean(exc.message)}", markup=False)
            continue
        out.print()
        if last.pages == []:
            err.print(f"lcc: {NO_PAGES}", markup=False)
        elif show_pages:
            print_pages(last.pages)


def _command(text: str, reader, last, out, err, print_pages):
    name, _, arg = text.partition(" ")
    if name == "/help":
        out.print(HELP, markup=False, highlight=False)
    elif name == "/pages":
        if last is None:
            err.print("lcc: nothing asked yet", markup=False)
        else:
            print_pages(last.pages)
    elif name == "/budget":
        try:
            budget = int(arg) if arg.strip() else None
            reader.reread(replace(reader.read, budget=budget, ratio=None if budget else reader.read.ratio))
        except ValueError:
            err.print(f"lcc: /budget takes a whole number of entries (got {clean(arg)!r})", markup=False)
        except LccError as exc:
            err.print(f"lcc: {clean(exc.message)}", markup=False)
        else:
            shown = budget if budget is not None else "the cartridge's default"
            err.print(f"each question now reads {shown} entries of pages", markup=False, highlight=False)
    else:
        err.print(f"lcc: unknown command {clean(name)!r}; /help lists them", markup=False)
    return last

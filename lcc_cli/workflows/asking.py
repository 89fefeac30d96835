"""`lcc ask` and `lcc chat`: questions answered from cartridges, a document, or nothing."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import AskConfig, ReadConfig, RunOptions
from ..errors import UsageError
from ..ingest import read_document
from .common import load


class Reader:
    """Cartridges, a library folder or a document, and the model, loaded once for many
    questions. Every answer goes through the reading engine (runtime/reading.py)."""

    CHUNK = 16  # questions whose views are held at once by `ask_many`

    def __init__(self, cartridges: list[Path] = (), context: Path | None = None, run: RunOptions | None = None,
                 force: bool = False, loaded=None, read: ReadConfig | None = None):
        from ..runtime.memory import open_cartridges, open_library, open_memory
        from ..runtime.prefix import reading_prefix

        if cartridges and context is not None:
            raise UsageError("give cartridges or --context, not both")
        paths = [p for p in cartridges if isinstance(p, (str, Path))]  # the rest: cartridges already in memory
        folders = [Path(p) for p in paths if Path(p).is_dir()]
        if folders and len(cartridges) > 1:
            raise UsageError("ask one library (a folder) or cartridges, not both")
        library = open_library(folders[0]) if folders else None  # opened (and checked) before the model loads
        carts = [] if library else [c if not isinstance(c, (str, Path)) else open_cartridges([c])[0]
                                    for c in cartridges]  # format errors before the slow model load
        self.document = read_document(context).text if context is not None else None
        self.loaded = loaded or load(run or RunOptions())
        self.read = read or ReadConfig()
        # loaded whatever is read (a bad --prefix-file is an error even for a plain question);
        # the engine decides which views read it (runtime.reading.View.document)
        self.prefix = reading_prefix(self.loaded, self.read.prefix, self.read.prefix_file)
        names = [Path(c).name if isinstance(c, (str, Path)) else
                 str(c.manifest["source"].get("name") or f"cartridge {i + 1}") for i, c in enumerate(cartridges)]
        self._opened = (carts, names, force, library)
        self.memory = open_memory(carts, self.loaded, self._opened[1], force, read=self.read,
                                  library=library) if library is not None or carts else None
        self.mode = self.memory.mode if self.memory else "context" if context is not None else "none"
        self._text_view = None

    def reread(self, read: ReadConfig) -> None:
        """Read the same cartridges with other settings (chat's /budget), the model kept."""
        from ..runtime.memory import open_memory
        from ..runtime.prefix import reading_prefix

        carts, names, force, library = self._opened
        memory = open_memory(carts, self.loaded, names, force, read=read,
                             library=library) if self.memory is not None else None
        self.read, self.memory = read, memory
        self.prefix = reading_prefix(self.loaded, read.prefix, read.prefix_file)

    def view(self, question: str):
        """What `question` reads (runtime.reading.View): its memory's view, or the context turn
        (the document, or the plain instruction) as text."""
        if self.memory is not None:
            return self.memory.view(question)
        if self._text_view is None:  # one view for every question: rows that share it are encoded once
            from ..runtime.reading import View

            self._text_view = View.text(self.loaded.prompter.context_ids(self.document),
                                        document=self.document is not None)
        return self._text_view

    def prompt(self, question: str) -> list[int]:
        """The question's turn as the reader sees it (with the read's answer format)."""
        return self.loaded.prompter.query_ids(question, self.read.answer_format)

    def check(self, questions: list[str], cfg: AskConfig | None = None) -> None:
        """Refuse any question that cannot be answered before the first is: empty, not text,
        too long in characters (checked before tokenising) or for the model's window (from
        what each question chose, before any entry is read)."""
        from ..runtime.reading import Row, check_rows
        from ..runtime.text import check_window

        cfg = cfg or AskConfig()
        for question in questions:
            check_question(question)
        kv = self.prefix.buffer if self.prefix is not None else None
        for question in questions:
            if self.memory is None:  # the text view is cheap: the engine's own rule decides
                check_rows(self.loaded, [Row(self.view(question), self.prompt(question), question)],
                           cfg.max_new_tokens, kv)
            else:  # counted as if the prefix is read, from what the question chose (no entry read yet)
                first = kv.slots if kv is not None else 0
                check_window(self.loaded, first + self.memory.end(question) + len(self.prompt(question)),
                             cfg.max_new_tokens)

    def ask(self, question: str, cfg: AskConfig | None = None, on_text=None):
        """One answer (runtime.reading.Answer), alone: it never depends on other questions."""
        from ..runtime.reading import Row, answer_rows

        check_question(question)
        row = Row(self.view(question), self.prompt(question), question)
        return answer_rows(self.loaded, [row], cfg, self.prefix, batch=False, on_text=on_text)[0]

    def ask_many(self, questions: list[str], cfg: AskConfig | None = None) -> list:
        """Every question answered from its own entries; questions that read the same ones (an
        indexed cartridge's questions that chose the same pages) are decoded together, and
        questions that read different pages in one batch, each row its own."""
        if self.memory is None or self.memory.mode == "cartridge" or len(questions) == 1:
            return [self.ask(q, cfg) for q in questions]  # each alone: an answer never depends on the others
        from ..runtime.reading import Row, answer_rows

        for q in questions:
            check_question(q)
        out = []
        for at in range(0, len(questions), self.CHUNK):
            views: dict = {}
            rows = []
            for q in questions[at:at + self.CHUNK]:
                view = self.memory.view(q)
                view = views.setdefault(view.key, view)  # the same entries: one view, read once
                rows.append(Row(view, self.prompt(q), q))
            out += answer_rows(self.loaded, rows, cfg, self.prefix, batch=True)
        return out


# A question is cut off in characters before anything tokenises it: far past any window a
# model here has (8,192 tokens is about 33,000 characters), and cheap to tokenise.
MAX_QUESTION_CHARS = 200_000


def check_question(question: str, where: str = "the question") -> None:
    """UsageError for a question that is empty, not text, or over MAX_QUESTION_CHARS."""
    if not question.strip():
        raise UsageError(f"{where} is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise UsageError(f"{where} is {len(question):,} characters; at most {MAX_QUESTION_CHARS:,}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where} is not valid text (it holds an undecodable byte)") from None


def ask(questions: list[str], cartridges: list[Path] = (), context: Path | None = None,
        cfg: AskConfig | None = None, run: RunOptions | None = None, force: bool = False, on_text=None,
        loaded=None, read: ReadConfig | None = None) -> list:
    """Answer questions from cartridges (composed), from a document in the prompt, or from
    nothing; one model load for all of them, each answered on its own."""
    reader = Reader(cartridges, context, run, force, loaded, read)
    reader.check(questions, cfg)
    return [reader.ask(q, cfg, on_text) for q in questions]


def read_questions(path: Path | str) -> list[str]:
    """Questions from a file ('-' = stdin): one per line, or JSONL rows with "q" or "question"."""
    from ..errors import InputError
    from ..ingest import read_jsonl

    out = []
    for number, line, row in read_jsonl(path, "questions from"):
        if not line.startswith("{"):
            out.append(line)
            continue
        q = row.get("q", row.get("question")) if isinstance(row, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{Path(str(path)).name} line {number}: need a \"q\" or \"question\" text field")
        out.append(q)
    for number, q in enumerate(out, 1):
        if len(q) > MAX_QUESTION_CHARS:
            check_question(q, f"question {number} of {Path(str(path)).name}")
    if not out:
        raise InputError(f"{path} holds no questions")
    return out



"""`lcc ask` and `lcc chat`: questions answered from cartridges, a document, or nothing."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import AskConfig, ReadConfig, RunOptions
from ..errors import UsageError
from ..ingest import read_document
from .common import load


class Reader:
    """Cartridges (runtime/memory/), or a document, and the model, loaded once for many
    questions."""

    def __init__(self, cartridges: list[Path] = (), context: Path | None = None, run: RunOptions | None = None,
                 force: bool = False, loaded=None, read: ReadConfig | None = None):
        from ..runtime.memory import open_cartridges, open_memory

        if cartridges and context is not None:
            raise UsageError("give cartridges or --context, not both")
        folders = [Path(p) for p in cartridges if Path(p).is_dir()]
        if folders and len(cartridges) > 1:
            raise UsageError("ask one library (a folder) or cartridges, not both")
        library = open_library(folders[0]) if folders else None  # indexed before the model loads
        carts = [] if library else open_cartridges(cartridges)  # format errors before the slow model load
        self.document = read_document(context).text if context is not None else None
        self.loaded = loaded or load(run or RunOptions())
        if library is not None:
            from ..runtime.memory import check_model
            from ..runtime.memory.library import LibraryMemory

            self.memory = LibraryMemory(self.loaded, library, read,
                                        check=lambda s: check_model(s.handle, self.loaded, s.name, force))
        else:
            self.memory = open_memory(carts, self.loaded, [Path(p).name for p in cartridges], force,
                                      read=read) if carts else None
        self.mode = self.memory.mode if self.memory else "context" if context is not None else "none"

    def _buffer(self, question: str):
        return self.memory.view(question) if self.memory is not None else None

    def check(self, questions: list[str], cfg: AskConfig | None = None) -> None:
        """Refuse any question that cannot be answered before the first is: empty, not text,
        too long in characters (checked before tokenising) or for the model's window."""
        from ..runtime.reader import check_fits

        for question in questions:
            check_question(question)
        for question in questions:
            check_fits(self.loaded, question, buffer=self._buffer(question), document=self.document,
                       cfg=cfg or AskConfig())

    def ask(self, question: str, cfg: AskConfig | None = None, on_text=None):
        """One answer (runtime.reader.Answer)."""
        from ..runtime.reader import answer

        check_question(question)
        started = time.perf_counter()
        buffer = self._buffer(question)  # an indexed cartridge chooses and reads its pages here
        chosen = time.perf_counter() - started
        a = answer(self.loaded, [question], buffer=buffer, document=self.document, cfg=cfg, on_text=on_text)[0]
        a.seconds_to_first_token += chosen  # the question waited for its pages too
        a.seconds_total += chosen
        a.pages = getattr(self.memory, "read_pages", lambda q: None)(question)
        return a

    def ask_many(self, questions: list[str], cfg: AskConfig | None = None) -> list:
        """Every question answered from its own entries; questions that read the same ones (an
        indexed cartridge's questions that chose the same pages) are decoded together."""
        if self.memory is None or self.memory.mode != "indexed" or len(questions) == 1:
            return [self.ask(q, cfg) for q in questions]  # each alone: an answer never depends on the others
        from ..runtime.memory import answer_all

        for q in questions:
            check_question(q)
        out = answer_all(self.loaded, self.memory, questions, cfg or AskConfig(), batch=True)
        for a in out:
            a.pages = getattr(self.memory, "read_pages", lambda q: None)(a.question)
        return out


def open_library(folder: Path):
    """A folder of cartridges asked as one: its index brought up to date first (library/)."""
    from ..library.index import Library

    library = Library(folder)
    library.refresh()
    return library


# A question is cut off in characters before anything tokenises it: far past any window a
# model here has (8,192 tokens is about 33,000 characters), and cheap to tokenise.
MAX_QUESTION_CHARS = 200_000


def check_question(question: str, where: str = "the question") -> None:
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



"""`lcc ask` and `lcc chat`: questions answered from cartridges, a document, or nothing."""

from __future__ import annotations

from pathlib import Path

from ..config import AskConfig, RunOptions
from ..errors import UsageError
from ..ingest import read_document
from .common import load

class Reader:
    """Cartridges (runtime/memory.py), or a document, and the model, loaded once for many
    questions."""

    def __init__(self, cartridges: list[Path] = (), context: Path | None = None, run: RunOptions | None = None,
                 force: bool = False, loaded=None):
        from ..runtime.memory import open_memory, read_cartridges

        if cartridges and context is not None:
            raise UsageError("give cartridges or --context, not both")
        carts = read_cartridges(cartridges)  # format errors before the slow model load
        self.document = read_document(context).text if context is not None else None
        self.loaded = loaded or load(run or RunOptions())
        self.mode = "cartridge" if carts else "context" if context is not None else "none"
        self.memory = open_memory(carts, self.loaded, [Path(p).name for p in cartridges], force) if carts else None

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
        return answer(self.loaded, [question], buffer=self._buffer(question), document=self.document, cfg=cfg,
                      on_text=on_text)[0]


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
        loaded=None) -> list:
    """Answer questions from cartridges (composed), from a document in the prompt, or from
    nothing; one model load for all of them, each answered on its own."""
    reader = Reader(cartridges, context, run, force, loaded)
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



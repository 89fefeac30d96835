"""lcc's Python API: compile documents into memory cartridges and ask them, without the CLI.

    import lcc

    model = lcc.load_model()                         # the embedded SmolLM2-135M, loaded once
    cart = model.compile("examples/harbor.md", ratio=8)
    reader = model.reader(cart)                      # one or several cartridges, or a library folder
    answer = reader.ask("Who designed the lighthouse?")
    print(answer.text)
    for page in answer.pages:                        # what the answer read, from the cartridge itself
        print(page.cartridge, page.page, page.text)

A `Model` is loaded once and compiles and reads many documents; a `Reader` opens its
cartridges once and answers many questions (`ask`, `ask_many`, or `stream` for the text as it is
written). Answers are `Answer` objects (text, the `Page`s read, timings, the reading prefix
read); `inspect` and `verify` return what `--json` prints. Errors are `LccError` subclasses,
one per exit code of the CLI (errors.py); nothing here prints or exits.

The CLI (cli/) is a thin layer over this module: it parses flags, calls these names and renders
what they return. Below the friendly layer are the workflows the CLI calls with its full set of
settings (`compile_file`, `compile_paths`, `ask`, `run_eval`, `serve`...), also public.

Why `import lcc`: it is the name users try first; the distribution and its implementation
package keep the name `lcc_cli` (the `lcc` package re-exports this module).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .compile.choice import resolve as resolve_compiler, settle
from .config import AskConfig, CompileConfig, ReadConfig, RunOptions
from .errors import (CartridgeError, CompilerFileError, InputError, Interrupted, LccError, ModelError,
                     ModelMismatchError, OutputExistsError, ResourceError, UsageError, VerifyFailed, WindowError)
from .progress import NO_PROGRESS, Progress
from .runtime.reading import Answer, Page
from .verify import Check, VerifyReport
from .workflows.asking import MAX_QUESTION_CHARS, Reader as _Reader, ask, check_question, read_questions
from .workflows.common import load
from .workflows.compiling import (BatchItem, BatchResult, CompileResult, compile_file, compile_paths,
                                  estimate_seconds)
from .workflows.evaluating import eval_methods, run_eval
from .workflows.files import export_cartridge, import_adapter, inspect, verify
from .workflows.library import index_folder
from .workflows.serving import serve
from .workflows.training import train_compiler, train_prefix

ProgressCallback = Callable[[str, "int | None", "int | None"], None]


class _Callback(Progress):
    """A user's `progress(what, done, total)` behind the engine's progress protocol: `what` is
    the work ("windows", "segments", "steps"...) with counts, or a message with `done` None."""

    def __init__(self, fn: ProgressCallback):
        self.fn, self.done, self.totals = fn, {}, {}

    def status(self, text: str) -> None:
        self.fn(text, None, None)

    def note(self, text: str) -> None:
        self.fn(text, None, None)

    def start(self, task: str, total: int | None, label: str = "") -> None:
        self.done[task], self.totals[task] = 0, total
        self.fn(task, 0, total)

    def advance(self, task: str, n: int = 1, **metrics) -> None:
        self.done[task] = self.done.get(task, 0) + n
        self.fn(task, self.done[task], self.totals.get(task))


def _progress(fn: ProgressCallback | None) -> Progress:
    return _Callback(fn) if fn is not None else NO_PROGRESS


@dataclass
class Cartridge:
    """A compiled cartridge: the one `Model.compile` returns (in memory until saved), or one
    read from a file. `manifest` is what `lcc inspect --json` shows under "manifest"."""

    stored: object  # format.cartridge.Cartridge: the manifest and every entry, as stored
    path: Path | None = None  # where it was written or read from, if anywhere

    @property
    def manifest(self) -> dict:
        return self.stored.manifest

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else str(self.manifest["source"].get("name") or "cartridge")

    @property
    def indexed(self) -> bool:
        return "index" in self.manifest

    @property
    def pages(self) -> int:
        """Pages a question chooses from (0 for a compiled buffer)."""
        return len(self.manifest["index"]["pages"]) if self.indexed else 0

    @property
    def tokens(self) -> int:
        return int(self.manifest["source"]["token_count"])

    @property
    def entries(self) -> int:
        return int(self.manifest["buffer"]["total_slots"])

    def to_bytes(self) -> bytes:
        from .format.cartridge import to_bytes

        return to_bytes(self.stored)

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the cartridge (atomically; an existing file only with `force`)."""
        from .format.cartridge import save_cartridge

        self.path = save_cartridge(self.stored, Path(path), overwrite=force)
        return self.path

    @classmethod
    def open(cls, path: str | Path) -> Cartridge:
        """A cartridge file, every check run as on load."""
        from .format.cartridge import load_cartridge

        return cls(load_cartridge(path), Path(path))


class Model:
    """A base model loaded once, on its device and in its dtype: compiles documents and opens
    readers. `load_model()` makes one."""

    def __init__(self, loaded):
        self.loaded = loaded  # runtime.model.LoadedModel

    @property
    def name(self) -> str:
        return self.loaded.model_id

    @property
    def fingerprint(self) -> str:
        """sha256 over weights, config and tokenizer: what cartridges pin."""
        return self.loaded.fingerprint

    def __repr__(self) -> str:
        return f"<lcc.Model {self.name} {self.fingerprint[:12]}>"

    def compile(self, source: str | Path | None = None, *, text: str | None = None, data: bytes | None = None,
                name: str | None = None, output: str | Path | None = None, force: bool = False,
                compiler: str = "auto", quality: str = "balanced", progress: ProgressCallback | None = None,
                **settings) -> Cartridge:
        """Compile one document: a file (`source`: .txt, .md or .pdf), a `text`, or `data` bytes
        (`name`'s suffix says how to read them). `settings` are CompileConfig fields (ratio=16,
        index, kv_dtype, window_tokens...) over the `quality` preset of the `compiler`. The
        cartridge stays in memory unless `output` names a file (written atomically; an existing
        one only with `force`)."""
        from .compile.document import compile_document
        from .ingest import Document, document_from_bytes, read_document

        given = [x is not None for x in (source, text, data)]
        if sum(given) != 1:
            raise UsageError("give one of source (a file), text or data")
        if source is not None:
            doc = read_document(Path(source))
        elif data is not None:
            doc = document_from_bytes(data, name or "document.txt")
        else:
            import hashlib

            if not text.strip():
                raise InputError("the text is empty")
            doc = Document(text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), name=name or "text")
        CompileConfig.from_dict({k: v for k, v in settings.items()})  # names and types, before any work
        stored = compile_document(self.loaded, doc, compiler, settings or None, quality, _progress(progress))
        cart = Cartridge(stored)
        if output is not None:
            cart.save(output, force=force)
        return cart

    def reader(self, *sources, context: str | Path | None = None, force: bool = False, **read) -> Reader:
        """A reader over cartridges (`Cartridge` objects or paths; several are read together),
        or one library folder; `context`: a document in the prompt instead (the baseline);
        nothing: the plain model. `read` are ReadConfig fields: budget or ratio, selector,
        reencode, floor, answer_format, prefix (True: the reading prefix, when one was trained
        for this model), prefix_file. `force` reads cartridges made for another model."""
        return Reader(list(sources), model=self, context=context, force=force, read=ReadConfig.from_dict(read))

    def ask(self, question: str, *, document: str | Path | None = None, **decode) -> Answer:
        """One answer from the plain model, or with `document` (a file) in the prompt: the
        baselines a cartridge is measured against."""
        return self.reader(context=document).ask(question, **decode)


class Reader:
    """Cartridges (or a library folder) opened once for many questions. Each question is
    answered on its own; `ask_many` batches questions that read the same entries. Files are
    opened and checked before the model loads (when no `model` is given), so a bad file fails
    in a second."""

    def __init__(self, sources: list = (), *, model: Model | None = None, run: RunOptions | None = None,
                 context: str | Path | None = None, force: bool = False, read: ReadConfig | None = None):
        cartridges = [s.path if isinstance(s, Cartridge) and s.path is not None else
                      s.stored if isinstance(s, Cartridge) else Path(s) for s in sources]
        self._reader = _Reader(cartridges, Path(context) if context is not None else None, run, force,
                               loaded=model.loaded if model is not None else None, read=read)
        self.model = model or Model(self._reader.loaded)
        self.last: Answer | None = None

    @property
    def mode(self) -> str:
        """"indexed", "library", "cartridge" (every entry read), "context" or "none"."""
        return self._reader.mode

    @property
    def read(self) -> ReadConfig:
        return self._reader.read

    @property
    def memory(self):
        """What the questions read (runtime.memory: Whole, Routed, Paged or LibraryMemory), or None."""
        return self._reader.memory

    def reread(self, read: ReadConfig) -> None:
        """Read the same cartridges with other settings from now on (the model kept)."""
        self._reader.reread(read)

    def check(self, questions: list[str], **decode) -> None:
        """Raise for any question that cannot be answered (empty, too long, past the model's
        window), before any is answered."""
        self._reader.check(questions, AskConfig(**decode))

    def ask(self, question: str, *, on_text: Callable[[str], None] | None = None, **decode) -> Answer:
        """One answer: its text, the pages it read (None unless the read chooses pages) and its
        timings. `on_text(piece)` gets the text as it is written. `decode`: AskConfig fields
        (max_new_tokens=64, temperature=0.0, seed=0, stop_repeats=4)."""
        cfg = AskConfig(**decode)
        self._reader.check([question], cfg)
        self.last = self._reader.ask(question, cfg, on_text=on_text)
        return self.last

    def ask_many(self, questions: list[str], **decode) -> list[Answer]:
        """Every question answered (in order), each checked before the first is answered."""
        cfg = AskConfig(**decode)
        self._reader.check(questions, cfg)
        return self._reader.ask_many(questions, cfg)

    def stream(self, question: str, **decode) -> Iterator[str]:
        """The answer's text piece by piece as it is written (the model runs in a thread);
        afterwards `reader.last` holds the whole `Answer`. Closing the iterator early stops
        the answer."""
        cfg = AskConfig(**decode)
        self._reader.check([question], cfg)
        pieces: queue.Queue = queue.Queue()
        result: dict = {}
        stop = threading.Event()

        def put(piece: str) -> None:
            if stop.is_set():
                raise _Stopped()
            pieces.put(piece)

        def work():
            try:
                result["answer"] = self._reader.ask(question, cfg, on_text=put)
            except _Stopped:
                pass
            except BaseException as exc:  # handed to the caller's thread below
                result["error"] = exc
            finally:
                pieces.put(None)

        thread = threading.Thread(target=work, name="lcc-stream", daemon=True)
        thread.start()
        try:
            while (piece := pieces.get()) is not None:
                yield piece
        finally:
            stop.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        self.last = result.get("answer")


class _Stopped(Exception):
    """A stream's reader stopped reading."""


def reader(*sources, model: Model | None = None, context: str | Path | None = None, force: bool = False,
           **read) -> Reader:
    """A Reader with the default model (loaded once, after the files are checked): see
    `Model.reader`."""
    made = Reader(list(sources), model=model or _models.get((None, None, None, None)), context=context, force=force,
                  read=ReadConfig.from_dict(read))
    _models.setdefault((None, None, None, None), made.model)
    return made


_models: dict = {}


def load_model(model: str | None = None, *, device: str | None = None, dtype: str | None = None,
               threads: int | None = None) -> Model:
    """The base model: the embedded SmolLM2-135M-Instruct (default; `LCC_MODEL` overrides), or
    a local Hugging Face causal-LM folder. Loaded once per process and settings. Nothing is
    downloaded."""
    key = (model, device, dtype, threads)
    if key not in _models:
        _models[key] = Model(load(RunOptions(model=model, device=device, dtype=dtype, threads=threads)))
    return _models[key]


def verify_cartridge(path: str | Path, *, model: Model | bool = True, source: str | Path | None = None) -> VerifyReport:
    """Every check `lcc verify` runs (format, integrity, values, index; with a model: shape,
    fingerprint, tokens, page text, page KV), each recorded; `report.ok` is True only if all
    pass. `model`: a Model, True (the default model), or False (file checks only)."""
    from .verify import verify_file

    loaded = model.loaded if isinstance(model, Model) else (lambda: load_model().loaded) if model else None
    return verify_file(Path(path), loaded, source)


def index(folder: str | Path, *, rebuild: bool = False, model: Model | None = None):
    """Bring a library folder's index up to date (what `lcc index DIR` does); returns what was
    added, replaced, removed and skipped (library.index.RefreshResult)."""
    return index_folder(Path(folder), rebuild=rebuild, loaded=(model or load_model()).loaded)


__all__ = [
    # the friendly layer
    "load_model", "Model", "Cartridge", "Reader", "reader", "Answer", "Page", "inspect", "verify_cartridge", "index",
    "VerifyReport", "Check",
    # settings
    "AskConfig", "CompileConfig", "ReadConfig", "RunOptions",
    # errors (one per exit code of the CLI)
    "LccError", "UsageError", "WindowError", "InputError", "ModelError", "CartridgeError", "CompilerFileError",
    "ModelMismatchError", "VerifyFailed", "ResourceError", "OutputExistsError", "Interrupted",
    # the workflows the CLI calls
    "BatchItem", "BatchResult", "CompileResult", "MAX_QUESTION_CHARS", "ask", "check_question", "compile_file",
    "compile_paths", "estimate_seconds", "eval_methods", "export_cartridge", "import_adapter", "index_folder", "load",
    "read_questions", "resolve_compiler", "run_eval", "serve", "settle", "train_compiler", "train_prefix", "verify",
]

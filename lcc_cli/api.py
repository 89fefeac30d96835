"""The typed Python API: the workflows behind each command. The CLI calls these and renders
what they return; nothing here prints or exits.

This is the only module that combines the file formats (format/), the model at run time
(runtime/), the compile path (compile/) and the executors (backends/).

    from lcc_cli import api
    result = api.compile_file("doc.md", "doc.lcc", {"ratio": 16})   # settings over the quality preset
    print(api.ask(["Who founded it?"], ["doc.lcc"])[0].text)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .compile.base import CompilerSpec
from .config import AskConfig, CompileConfig, EvalSettings
from .errors import Interrupted, OutputExistsError, UsageError
from .ingest import DEFAULT_MAX_BYTES, DOCUMENT_SUFFIXES, read_document
from .progress import NO_PROGRESS, Progress

# Above this estimated compile time, `compile` asks for --yes before starting.
CONFIRM_SECONDS = 3600.0
# Rough seconds per context token per optimisation step on 2 CPU cores (docs/experiments.md:
# ~2.4 s a step for a ~200-token paragraph), and per token for one forward pass.
_STEP_SECONDS_PER_TOKEN = 0.012
_PASS_SECONDS_PER_TOKEN = 0.002


@dataclass
class RunOptions:
    """How and where work runs (never changes what a compile produces)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None  # compute dtype; default float32 on CPU, bfloat16 on CUDA
    threads: int | None = None
    backend: str = "local"
    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self):
        if not isinstance(self.workers, int) or self.workers < 1:
            raise UsageError(f"workers must be at least 1 (got {self.workers!r})", field="workers")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UsageError(f"threads must be at least 1 (got {self.threads!r})", field="threads")
        from .backends import BACKENDS

        if self.backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})", field="backend")
        if self.backend == "local" and self.workers > 1:
            self.backend = "processes"


@dataclass
class CompileResult:
    path: str
    slots: int
    tokens: int
    segments: int
    seconds: float
    model: str
    compiler: dict
    metrics: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load(run: RunOptions):
    """The base model, on the chosen device, with the chosen thread count."""
    from .runtime.model import load_model, set_threads

    set_threads(run.threads)
    return load_model(run.model, device=run.device, dtype=run.dtype)


def _governed(run: RunOptions, progress: Progress) -> Progress:
    """Without --threads, the thread count follows the cores other programs leave free
    (runtime/threads.py); the long loops report progress, which is when it is re-checked."""
    if run.threads is not None or run.backend != "local":
        return progress
    from .runtime.threads import AutoThreads

    return AutoThreads(progress)


def _executor(run: RunOptions, loaded, compiler=None):
    from .backends import make_executor

    return make_executor(run.backend, loaded, model=run.model, device=run.device, dtype=run.dtype,
                         workers=run.workers, threads=run.threads, ray_address=run.ray_address, compiler=compiler)


def resolve_compiler(loaded, choice: str | None, quality: str = "balanced") -> CompilerSpec:
    """--compiler auto | none | am | truncate | pretrained | PATH. `auto` follows the bench's
    table (compile/auto.py; `settle` also takes its settings); `pretrained` insists on the
    shipped compiler."""
    from .compile.pretrained import shipped_compiler
    from .format.compiler_file import read_compiler_manifest

    choice = choice or "auto"
    if choice == "auto":
        from .compile.auto import choose

        return choose(loaded, quality)[0]
    if choice == "none":
        return CompilerSpec("optimise")
    if choice in ("am", "truncate"):
        return CompilerSpec(choice)
    if choice == "pretrained":
        path = shipped_compiler()
        if path is not None and read_compiler_manifest(path)["model"]["fingerprint"] == loaded.fingerprint:
            return CompilerSpec("pretrained", str(path))
        raise UsageError("no pretrained compiler is shipped for this model", field="compiler",
                         hint="train one with `lcc train-compiler` and pass its file")
    if not Path(choice).is_file():
        raise UsageError(f"compiler must be auto, none, pretrained or a compiler file (no such file: {choice})",
                         field="compiler")
    return CompilerSpec("pretrained", str(Path(choice)))


def estimate_seconds(segment_tokens: list[int], cfg: CompileConfig) -> float:
    return sum(n * (cfg.steps * _STEP_SECONDS_PER_TOKEN + _PASS_SECONDS_PER_TOKEN) for n in segment_tokens)


def _check_target(source, output: Path, force: bool, resume: bool) -> tuple:
    """Before any work: the output may be written, and a partial file is either resumed
    (--resume), discarded (--force) or in the way. Returns the command's inputs."""
    from .format.cartridge import partial_path
    from .format.fsio import check_output
    from .ingest import STDIN

    inputs = () if str(source) == STDIN else (Path(source),)
    check_output(output, force, inputs)
    partial = partial_path(output)
    if partial.exists() and not (resume or force):
        raise OutputExistsError(f"an unfinished compile exists: {partial}",
                                hint="pass --resume to continue it or --force to start over")
    if partial.exists() and force and not resume:
        partial.unlink()  # starting over: its segments must not be mistaken for this run's
    return inputs


def _task(loaded, doc, output: Path, cfg: CompileConfig, info: dict, force: bool, resume: bool, inputs, progress):
    """A document's task: its segments, and those already done in its partial file."""
    from .compile.document import DocumentTask, read_partial, text_segments
    from .format.cartridge import partial_path

    task = DocumentTask(doc, output, text_segments(loaded, doc.text, cfg), overwrite=force, inputs=inputs)
    partial = partial_path(output)
    if resume and partial.exists():
        task.done = read_partial(partial, loaded, doc, cfg, info)
        progress.status(f"resuming: {len(task.done)} segment(s) already compiled in {partial.name}")
    return task


def compile_file(source: str | Path, output: str | Path | None, cfg: CompileConfig | dict | None = None,
                 compiler: CompilerSpec | str | None = None, run: RunOptions | None = None, force: bool = False,
                 resume: bool = False, max_bytes: int = DEFAULT_MAX_BYTES, yes: bool = False, quality: str = "balanced",
                 progress: Progress = NO_PROGRESS) -> CompileResult:
    """Read, compile and write one cartridge. Finished segments are checkpointed to
    OUTPUT.partial; on Ctrl-C they stay there for `resume`, and OUTPUT is never written
    half-way, nor over a file that appeared meanwhile (without `force`).

    `compiler` is a CompilerSpec, or "auto" / "none" / "pretrained" / a compiler file (see
    resolve_compiler); `cfg` a full CompileConfig, or a dict of explicit settings applied on
    top of the `quality` preset of the resolved method."""
    from .compile.document import compile_all
    from .format.cartridge import partial_path
    from .ingest import STDIN

    run = run or RunOptions()
    if output is None:
        if str(source) == STDIN:
            raise UsageError("reading the document from stdin needs an output path", field="output")
        output = Path(source).with_suffix(".lcc")
    output = Path(output)
    inputs = _check_target(source, output, force, resume)  # fail now, not after minutes of compiling
    doc = read_document(source, max_bytes=max_bytes)
    progress = _governed(run, progress)
    progress.status("loading model…")
    loaded = load(run)
    spec, cfg = settle(loaded, compiler, cfg, quality)
    method = _build(spec, loaded)
    task = _task(loaded, doc, output, cfg, method.describe(), force, resume, inputs, progress)
    _confirm(loaded, task.segments, cfg, yes, progress)
    try:
        compile_all(loaded, [task], cfg, spec, method.describe(), _executor(run, loaded, method), progress)
    except KeyboardInterrupt:
        kept = partial_path(output).exists()
        raise Interrupted("interrupted" + (f"; finished segments are kept in {partial_path(output)}" if kept else ""),
                          hint="rerun with --resume to continue" if kept else None) from None
    cart = task.cartridge
    m = cart.manifest
    return CompileResult(str(output), cart.slots, m["source"]["token_count"], len(task.segments),
                         m["metrics"]["seconds"], loaded.model_id, m["compiler"], m["metrics"]["segments"])


def _build(spec: CompilerSpec, loaded):
    from .compile.base import build_compiler

    return build_compiler(spec, loaded)


def settle(loaded, compiler, cfg, quality: str = "balanced") -> tuple[CompilerSpec, CompileConfig]:
    """The compiler to use and the settings to use it with: a CompileConfig is taken as it
    is; a dict (or None) of settings goes on top of the resolved method's quality preset."""
    from .config import compile_config

    if compiler in (None, "auto"):
        from .compile.auto import choose

        spec, quality, chosen = choose(loaded, quality)
        if not isinstance(cfg, CompileConfig):
            cfg = {**chosen, **{k: v for k, v in (cfg or {}).items() if v is not None}}
    else:
        spec = compiler if isinstance(compiler, CompilerSpec) else resolve_compiler(loaded, compiler)
    if not isinstance(cfg, CompileConfig):
        cfg = compile_config(spec.name, quality, **(cfg or {}))
    window = loaded.facts.max_positions
    if spec.name == "am" and window and 2 * cfg.segment_tokens + cfg.segment_tokens / cfg.ratio + 64 > window:
        from dataclasses import replace

        cfg = replace(cfg, segment_tokens=max(16, int((window - 64) / (2 + 1 / cfg.ratio))))  # the reference pass
    if spec.name == "optimise":
        from .compile.optimise import check_lora_targets

        check_lora_targets(loaded.model, cfg.lora_targets)  # now, not after the first minutes of work
    return spec, cfg


def _confirm(loaded, segments, cfg: CompileConfig, yes: bool, progress: Progress) -> None:
    tokens = [len(loaded.prompter.context_ids(s.text)) for s in segments]
    seconds = estimate_seconds(tokens, cfg)
    if seconds > CONFIRM_SECONDS and not yes:
        raise UsageError(f"this compile would take about {_duration(seconds)} here ({len(segments):,} segments, "
                         f"{cfg.steps} steps each)", hint="pass --yes to start it anyway, or split the document")
    if len(segments) > 1:
        progress.status(f"{len(segments)} segments, estimated {_duration(seconds)}")


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# --- batch compile ------------------------------------------------------------------------------

@dataclass
class BatchItem:
    source: str
    output: str | None
    status: str  # done | skipped | failed
    reason: str = ""
    slots: int = 0
    seconds: float = 0.0


@dataclass
class BatchResult:
    items: list[BatchItem]
    seconds: float
    backend: str

    @property
    def failed(self) -> list[BatchItem]:
        return [i for i in self.items if i.status == "failed"]

    def to_dict(self) -> dict:
        counts = {s: sum(i.status == s for i in self.items) for s in ("done", "skipped", "failed")}
        return {"counts": counts, "seconds": round(self.seconds, 2), "backend": self.backend,
                "documents": [asdict(i) for i in self.items]}


def expand_sources(sources: list, unlisted: list | None = None) -> list[Path]:
    """Files as given; folders walked (recursively, sorted) for documents lcc reads. A folder
    that cannot be listed is added to `unlisted` as (folder, reason) instead of vanishing."""
    import os

    out = []
    for source in map(Path, sources):
        if not source.is_dir():
            out.append(source)
            continue

        def failed(exc: OSError) -> None:
            if unlisted is not None:
                unlisted.append((exc.filename or str(source), exc.strerror or str(exc)))

        found = []
        for root, dirs, files in os.walk(source, onerror=failed):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(root) / f for f in files if not f.startswith(".")
                      and Path(f).suffix.lower() in DOCUMENT_SUFFIXES and (Path(root) / f).is_file()]
        out += sorted(found)
    return out


def _output_names(files: list[Path], out_dir: Path) -> list[Path]:
    """One distinct cartridge name per source, decided before any work: STEM.lcc, or
    STEM-2.lcc, STEM-3.lcc... when a name is taken by an earlier source of the batch (names
    are compared case-blind: some file systems are). A name that is taken is never reused,
    even by a source whose own stem looks like `doc-2`."""
    used: set[str] = set()
    names = []
    for f in files:
        stem = f.stem or "document"
        name, n = f"{stem}.lcc", 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}.lcc"
        used.add(name.lower())
        names.append(out_dir / name)
    return names


def _distinct(files: list[Path]) -> list[Path]:
    """Sources named twice (the same file by two paths) are compiled once."""
    seen, out = set(), []
    for f in files:
        try:
            key = f.resolve()
        except OSError:
            key = f
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def compile_paths(sources: list, out_dir: Path, cfg: CompileConfig | dict | None = None,
                  compiler: CompilerSpec | str | None = None, run: RunOptions | None = None, force: bool = False,
                  resume: bool = False, max_bytes: int = DEFAULT_MAX_BYTES, yes: bool = False,
                  quality: str = "balanced", progress: Progress = NO_PROGRESS) -> BatchResult:
    """Compile many documents (files and folders) into OUT_DIR, one cartridge each. A
    cartridge that already exists for the same source, settings, compiler and model is
    skipped; one bad document fails alone, with its reason, and never costs the others theirs.
    Partial files follow the single-file rules: --resume continues them, --force drops them."""
    import time

    from .compile.document import compile_all
    from .errors import LccError
    from .format.cartridge import load_cartridge

    started = time.perf_counter()
    run = run or RunOptions()
    unlisted: list[tuple[str, str]] = []
    files = _distinct(expand_sources(sources, unlisted))
    if any(str(f) == "-" for f in files):
        raise UsageError("stdin ('-') can only be compiled on its own")
    if not files and not unlisted:
        raise UsageError("no documents to compile (folders are searched for " + ", ".join(DOCUMENT_SUFFIXES) + ")")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out_dir}: {exc.strerror}", field="output") from exc
    progress = _governed(run, progress)
    progress.status("loading model…")
    loaded = load(run)
    spec, cfg = settle(loaded, compiler, cfg, quality)
    method = _build(spec, loaded)
    info = method.describe()
    items = [BatchItem(folder, None, "failed", f"cannot list this folder: {reason}") for folder, reason in unlisted]
    tasks, owners = [], []
    outputs = _output_names(files, out_dir)
    for source, output in zip(files, outputs):
        if output.stem != (source.stem or "document"):
            progress.status(f"{source} -> {output} (its name is taken by another source of this batch)")
    for source, output in zip(files, outputs):
        item = BatchItem(str(source), str(output), "failed")
        items.append(item)
        try:
            doc = read_document(source, max_bytes=max_bytes)
            if output.exists() and not force:
                if _same_compile(load_cartridge(output).manifest, loaded, doc, cfg, info):
                    item.status, item.reason = "skipped", "up to date"
                    continue
                raise UsageError(f"{output.name} exists, made from another source or settings",
                                 hint="pass --force to recompile")
            inputs = _check_target(source, output, force, resume)
            tasks.append(_task(loaded, doc, output, cfg, info, force, resume, inputs, progress))
            owners.append(item)
        except LccError as exc:
            item.reason = exc.message
    _confirm(loaded, [s for t in tasks for s in t.segments], cfg, yes, progress)
    try:
        compile_all(loaded, tasks, cfg, spec, info, _executor(run, loaded, method), progress, fail_fast=False)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; finished documents are written and finished segments kept in .partial "
                          "files", hint="rerun the same command with --resume to continue") from None
    for task, item in zip(tasks, owners):
        if task.cartridge is not None:
            item.status, item.slots, item.seconds = "done", task.cartridge.slots, round(task.seconds, 2)
        else:
            item.reason = task.error.message if task.error else "not compiled"
    return BatchResult(items, time.perf_counter() - started, run.backend)


def _same_compile(m: dict, loaded, doc, cfg: CompileConfig, info: dict) -> bool:
    return (m["source"].get("sha256") == doc.sha256 and m.get("compile") == cfg.to_dict()
            and m.get("compiler") == info and m["model"].get("fingerprint") == loaded.fingerprint
            and m["model"].get("dtype") == loaded.facts.dtype)


# --- ask --------------------------------------------------------------------------------------

class Reader:
    """Cartridges (runtime/memory.py), or a document, and the model, loaded once for many
    questions."""

    def __init__(self, cartridges: list[Path] = (), context: Path | None = None, run: RunOptions | None = None,
                 force: bool = False, loaded=None):
        from .runtime.memory import open_memory, read_cartridges

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
        from .runtime.reader import check_fits

        for question in questions:
            check_question(question)
        for question in questions:
            check_fits(self.loaded, question, buffer=self._buffer(question), document=self.document,
                       cfg=cfg or AskConfig())

    def ask(self, question: str, cfg: AskConfig | None = None, on_text=None):
        """One answer (runtime.reader.Answer)."""
        from .runtime.reader import answer

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
    from .errors import InputError
    from .ingest import read_jsonl

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


# --- verify and inspect -----------------------------------------------------------------------

def verify(path: Path, model: bool = True, run: RunOptions | None = None, source: Path | None = None,
           probe: bool = False):
    """Run verify.verify_file; model=False skips the model checks."""
    from .verify import verify_file

    if probe and (source is None or not model):
        raise UsageError("--probe needs --source and the model (not --no-model)")
    from .runtime.probe import probe_fidelity

    return verify_file(path, (lambda: load(run or RunOptions())) if model else None, source,
                       probe=probe_fidelity if probe else None)


def inspect(path: Path) -> dict:
    """The manifest of a cartridge or a compiler file, checked as on load, plus file facts."""
    from .format.cartridge import load_cartridge
    from .format.compiler_file import is_compiler_file, load_compiler

    path = Path(path)
    if path.is_file() and is_compiler_file(path):
        comp = load_compiler(path)
        return {"path": str(path), "kind": "compiler", "bytes": path.stat().st_size, "sha256": comp.sha256,
                "manifest": comp.manifest}
    cart = load_cartridge(path)
    return {"path": str(path), "kind": "cartridge", "bytes": path.stat().st_size, "manifest": cart.manifest}


# --- train-compiler -------------------------------------------------------------------------

def train_compiler(data: list[Path], output: Path, cfg, run: RunOptions | None = None, force: bool = False,
                   resume: bool = False, time_limit: float | None = None, stop_after: int | None = None,
                   progress: Progress = NO_PROGRESS, batched: bool | None = None):
    """`lcc train-compiler`: train a pretrained compiler for the model and write it."""
    from .compile.train import train_compiler as train
    from .format.fsio import check_output

    output = Path(output)
    check_output(output, force or resume, tuple(Path(d) for d in data))
    for d in data:
        if not Path(d).exists():  # a regular file or a pipe (ingest.check_readable), read later
            from .errors import InputError

            raise InputError(f"no such training data: {d}")
    run = run or RunOptions()
    if run.backend not in ("local", "ray"):
        raise UsageError("train-compiler runs in this process or on Ray Train (--backend ray)", field="backend")
    try:
        if run.backend == "ray":
            return _train_on_ray([Path(d) for d in data], output, cfg, run, force, resume, time_limit, stop_after,
                                 progress, batched)
        from .compile.train import read_training_data

        read = read_training_data([Path(d) for d in data], cfg.segment_tokens)  # bad data fails before the model loads
        progress = _governed(run, progress)
        progress.status("loading model…")
        loaded = load(run)
        return train(loaded, [Path(d) for d in data], output, cfg, resume=resume, time_limit=time_limit,
                     progress=progress, overwrite=force, stop_after=stop_after, batched=batched, read=read)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; checkpoints are kept in {output}.ckpt",
                          hint="rerun with --resume to continue") from None


def _train_on_ray(data, output: Path, cfg, run: RunOptions, force, resume, time_limit, stop_after, progress,
                  batched=None):
    """Data-parallel training (backends/ray_train.py); the result is read back from the file
    rank 0 wrote."""
    from .backends.ray_train import train_on_ray
    from .compile.train import TrainResult
    from .format.compiler_file import load_compiler

    train_on_ray(data, output, cfg, run, resume, time_limit, force, stop_after, progress, batched)
    comp = load_compiler(output)
    t = comp.manifest["training"]
    return TrainResult(str(output), comp.sha256, t["steps"], t["seconds"], t["tokens"], t["tokens_per_second"],
                       t["selected_step"], t["heldout_qa_kl"], t["history"])


# --- serve ------------------------------------------------------------------------------------

def serve(paths: list[Path], host: str, port: int, limits, api_key: str | None = None,
          run: RunOptions | None = None, progress: Progress = NO_PROGRESS, warn=None) -> None:
    """`lcc serve`: load the model once and answer from the cartridges over HTTP until stopped."""
    from .serve.run import is_loopback, serve as serve_forever

    for path in map(Path, paths):
        if not path.exists():
            raise UsageError(f"nothing to serve at {path}: no such file or folder")
    if not api_key and not is_loopback(host) and warn is not None:
        warn(f"listening on {host} without --api-key: anyone who can reach this address can use the server")
    run = run or RunOptions()
    progress = _governed(run, progress)
    progress.status("loading model…")
    serve_forever(load(run), [Path(p) for p in paths], host, port, limits, api_key, progress)


# --- eval -------------------------------------------------------------------------------------

def eval_methods(loaded, settings: EvalSettings, compiler=None) -> list:
    """The methods an eval compares (eval/run.py's Method), compilers resolved for this model."""
    from .config import method_overrides
    from .eval.run import Method

    if not settings.methods:
        # [compile] settings over the method's preset; a CompileConfig built in Python as it is
        explicit = settings.compile_table or (None if settings.compile == CompileConfig() else settings.compile)
        spec, cfg = settle(loaded, compiler, explicit)
        return [Method("cartridge", spec, {k: v for k, v in cfg.to_dict().items() if k != "ratio"})]
    out = []
    for m in settings.methods:
        spec, cfg = settle(loaded, m.get("compiler", "auto"), {**settings.compile_table, **method_overrides(m)},
                           m.get("quality", "balanced"))
        out.append(Method(m["label"], spec, {k: v for k, v in cfg.to_dict().items() if k != "ratio"},
                          m.get("stride", 1)))
    return out


def run_eval(data: Path, settings: EvalSettings, out: Path, compiler: CompilerSpec | str | None = "auto",
             run: RunOptions | None = None, progress: Progress = NO_PROGRESS) -> dict:
    """`lcc eval`: evaluate, then write report.md, results.json and the plot into `out`."""
    import platform
    from datetime import datetime, timezone

    from ._version import __version__
    from .config import cpu_count
    from .eval.data import load_dataset
    from .eval.report import write_report
    from .eval.run import evaluate

    rows = load_dataset(Path(data))
    if settings.documents:
        wanted = set(settings.documents)
        rows = [r for r in rows if r["id"] in wanted]
    rows = rows[: settings.limit] if settings.limit else rows
    if not rows:
        raise UsageError("no documents left to evaluate after --limit / documents")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror}") from exc
    run = run or RunOptions()
    loaded = load(run)
    methods = eval_methods(loaded, settings, compiler)
    built: dict = {}

    def compile_fn(doc, method, ratio, progress):
        """The one compile path, in memory, with each method's compiler built once."""
        from .compile.document import DocumentTask, compile_all, text_segments

        _, cfg = settle(loaded, method.spec, method.config(ratio))  # am sizes its segments per ratio
        if method.spec not in built:
            built[method.spec] = _build(method.spec, loaded)
        compiler = built[method.spec]
        task = DocumentTask(doc, None, text_segments(loaded, doc.text, cfg))
        compile_all(loaded, [task], cfg, method.spec, compiler.describe(), _executor(RunOptions(), loaded, compiler),
                    progress)
        return task.cartridge

    results = evaluate(loaded, rows, settings, out, methods, compile_fn, _governed(run, progress))
    facts = loaded.facts
    meta = {"model": loaded.model_id, "fingerprint": loaded.fingerprint, "data": Path(data).name,
            "methods": [{"label": m.label, "compiler": [m.spec.name, m.spec.path and Path(m.spec.path).name],
                         "settings": m.settings, "stride": m.stride} for m in methods],
            "ratios": settings.ratios, "lcc_version": __version__, "ask": vars(settings.ask),
            "machine": f"{platform.machine()}, {cpu_count()} CPU cores, "
                       f"{'cuda' if loaded.device.type == 'cuda' else 'no GPU'}",
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kv_bytes_per_position": 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim
            * loaded.model.dtype.itemsize}
    summary = write_report(results, out, meta)
    return {"out": str(out), "summary": summary}


# --- interchange --------------------------------------------------------------------------------

def export_cartridge(path: Path, to: str, out_dir: Path, force: bool = False, drop_bias: bool = False) -> Path:
    """`lcc export CART --to peft DIR`."""
    from .export.peft import export_peft
    from .format.cartridge import load_cartridge

    if to != "peft":
        raise UsageError(f"to must be peft (got {to!r})", field="to")
    return export_peft(load_cartridge(path), Path(out_dir), force=force, source=Path(path), drop_bias=drop_bias)


def import_adapter(directory: Path, output: Path, run: RunOptions | None = None, force: bool = False) -> CompileResult:
    """`lcc import DIR -o CART`: a PEFT Cartridge adapter (from lcc or trained elsewhere)
    becomes a cartridge pinned to the loaded model's fingerprint."""
    from ._version import __version__
    from .format import manifest as mf
    from .format.cartridge import Cartridge, check_values
    from .format.checks import check_fingerprint
    from .format.fsio import check_output
    from .export.peft import read_peft

    from .export.peft import ADAPTER_FILES, read_adapter_files

    output, directory = Path(output), Path(directory)
    files = read_adapter_files(directory)  # what can be checked without the model, before it loads
    inputs = tuple(directory / name for name in ADAPTER_FILES)
    check_output(output, force, inputs)  # before the model loads; never one of the adapter's own files
    loaded = load(run or RunOptions())
    buffer, theirs, sha = read_peft(directory, loaded.facts, files)
    check_values({f"{kind}.{i}": t for kind, ts in (("k", buffer.keys), ("v", buffer.values)) for i, t in enumerate(ts)},
                 directory.name)
    model = loaded.facts.to_manifest(loaded.model_id, loaded.fingerprint)
    rows = [{"index": 0, "slots": buffer.slots, "token_count": 0, "sink": False}]
    source = {"name": directory.name, "sha256": sha, "token_count": 0, "ratio": None}
    compile_, compiler, metrics = {}, {"name": "imported", "from": "peft", "sha256": sha}, {"segments": [{}]}
    if theirs is not None:
        # exported by lcc: keep its provenance, after checking it was made for this model
        check_fingerprint(theirs["model"], loaded.model_id, loaded.fingerprint, directory.name, force)
        segs = theirs["buffer"]["segments"]
        if sum(s["slots"] for s in segs) == buffer.slots:
            rows = [{k: s[k] for k in ("index", "slots", "token_count", "sink") if k in s} for s in segs]
        source, compile_, metrics = theirs["source"], theirs["compile"], theirs["metrics"]
        compiler = {**theirs["compiler"], "imported_from": "peft"}
    m = mf.build(model=model, segments=rows, source=source, compile=compile_, compiler=compiler, metrics=metrics,
                 version=__version__, storage_dtype=str(buffer.dtype).removeprefix("torch."))
    cart = Cartridge(m, buffer)
    from .format.cartridge import from_bytes, to_bytes

    data = to_bytes(cart)
    from_bytes(data, f"the adapter in {directory.name}")  # exactly the checks any later load runs
    from .format.fsio import atomic_write

    atomic_write(output, data, overwrite=force, inputs=inputs)
    return CompileResult(str(output), cart.slots, source.get("token_count", 0), len(rows), 0.0, loaded.model_id,
                         compiler, [])

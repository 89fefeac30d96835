"""`lcc compile`: one document or a batch of them into cartridges, with partial files and --resume."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..compile.base import CompilerSpec, build_compiler
from ..compile.choice import settle
from ..config import CompileConfig, RunOptions
from ..errors import Interrupted, LccError, OutputExistsError, UsageError
from ..ingest import DEFAULT_MAX_BYTES, DOCUMENT_SUFFIXES, distinct, expand_sources, output_names, read_document
from ..progress import NO_PROGRESS, Progress
from .common import executor, governed, load

# Above this estimated compile time, `compile` asks for --yes before starting.
CONFIRM_SECONDS = 3600.0
# Rough seconds per context token per optimisation step on 2 CPU cores (docs/experiments.md:
# ~2.4 s a step for a ~200-token paragraph), and per token for one forward pass.
_STEP_SECONDS_PER_TOKEN = 0.012
_PASS_SECONDS_PER_TOKEN = 0.002


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
    index: dict | None = None  # an indexed cartridge's pages and windows (metrics.index), and its default budget
    self_check_seconds: float | None = None  # --self-check's own time, beside the compile's

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_seconds(segment_tokens: list[int], cfg: CompileConfig) -> float:
    """Rough seconds a compile takes on 2 CPU cores, from its segments' tokens and steps."""
    return sum(n * (cfg.steps * _STEP_SECONDS_PER_TOKEN + _PASS_SECONDS_PER_TOKEN) for n in segment_tokens)


def _check_target(source, output: Path, force: bool, resume: bool) -> tuple:
    """Before any work: the output may be written, and a partial file is either resumed
    (--resume), discarded (--force) or in the way. Returns the command's inputs."""
    from ..format.cartridge import partial_path
    from ..format.fsio import check_output
    from ..ingest import STDIN

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
    from ..compile.document import DocumentTask, read_partial, text_segments
    from ..format.cartridge import partial_path

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
    from ..compile.document import compile_all
    from ..format.cartridge import partial_path
    from ..ingest import STDIN

    run = run or RunOptions()
    if output is None:
        if str(source) == STDIN:
            raise UsageError("reading the document from stdin needs an output path", field="output")
        output = Path(source).with_suffix(".lcc")
    output = Path(output)
    inputs = _check_target(source, output, force, resume)  # fail now, not after minutes of compiling
    doc = read_document(source, max_bytes=max_bytes)
    progress = governed(run, progress)
    progress.status("loading model…")
    loaded = load(run)
    spec, cfg = settle(loaded, compiler, cfg, quality)
    method = build_compiler(spec, loaded)
    task = _task(loaded, doc, output, cfg, method.describe(), force, resume, inputs, progress)
    _confirm(loaded, task.segments, cfg, yes, progress)
    try:
        compile_all(loaded, [task], cfg, spec, method.describe(), executor(run, loaded, method), progress)
    except KeyboardInterrupt:
        kept = partial_path(output).exists()
        raise Interrupted("interrupted" + (f"; finished segments are kept in {partial_path(output)}" if kept else ""),
                          hint="rerun with --resume to continue" if kept else None) from None
    cart = task.cartridge
    m = cart.manifest
    index = None
    if "index" in m:
        index = {**m["metrics"]["index"], "budget": math.ceil(m["source"]["token_count"] / cfg.ratio),
                 "bytes_per_token": round(output.stat().st_size / m["source"]["token_count"], 1),
                 "gist_entries": sum(s["slots"] for s in cart.segments), "dtype": m["buffer"]["dtype"]}
    return CompileResult(str(output), cart.slots, m["source"]["token_count"], len(task.segments),
                         m["metrics"]["seconds"], loaded.model_id, m["compiler"], m["metrics"]["segments"], index,
                         (m["metrics"].get("self_check") or {}).get("seconds"))


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


def compile_paths(sources: list, out_dir: Path, cfg: CompileConfig | dict | None = None,
                  compiler: CompilerSpec | str | None = None, run: RunOptions | None = None, force: bool = False,
                  resume: bool = False, max_bytes: int = DEFAULT_MAX_BYTES, yes: bool = False,
                  quality: str = "balanced", progress: Progress = NO_PROGRESS) -> BatchResult:
    """Compile many documents (files and folders) into OUT_DIR, one cartridge each. A
    cartridge that already exists for the same source, settings, compiler and model is
    skipped; one bad document fails alone, with its reason, and never costs the others theirs.
    Partial files follow the single-file rules: --resume continues them, --force drops them."""

    from ..compile.document import compile_all, recorded_compiler
    from ..format.cartridge import open_cartridge

    started = time.perf_counter()
    run = run or RunOptions()
    unlisted: list[tuple[str, str]] = []
    files = distinct(expand_sources(sources, unlisted))
    if any(str(f) == "-" for f in files):
        raise UsageError("stdin ('-') can only be compiled on its own")
    if not files and not unlisted:
        raise UsageError("no documents to compile (folders are searched for " + ", ".join(DOCUMENT_SUFFIXES) + ")")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out_dir}: {exc.strerror}", field="output") from exc
    progress = governed(run, progress)
    progress.status("loading model…")
    loaded = load(run)
    spec, cfg = settle(loaded, compiler, cfg, quality)
    method = build_compiler(spec, loaded)
    info = recorded_compiler(cfg, method.describe())
    items = [BatchItem(folder, None, "failed", f"cannot list this folder: {reason}") for folder, reason in unlisted]
    tasks, owners = [], []
    outputs = output_names(files, out_dir)
    for source, output in zip(files, outputs):
        if output.stem != (source.stem or "document"):
            progress.status(f"{source} -> {output} (its name is taken by another source of this batch)")
    for source, output in zip(files, outputs):
        item = BatchItem(str(source), str(output), "failed")
        items.append(item)
        try:
            doc = read_document(source, max_bytes=max_bytes)
            if output.exists() and not force:
                if _same_compile(open_cartridge(output).manifest, loaded, doc, cfg, info):  # its header alone
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
        compile_all(loaded, tasks, cfg, spec, info, executor(run, loaded, method), progress, fail_fast=False)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; finished documents are written and finished segments kept in .partial "
                          "files", hint="rerun the same command with --resume to continue") from None
    for task, item in zip(tasks, owners):
        if task.cartridge is not None:
            item.status, item.slots, item.seconds = "done", task.cartridge.slots, round(task.seconds, 2)
        else:
            item.reason = task.error.message if task.error else "not compiled"
    if cfg.index:  # the folder is a library: its index follows what was just written
        from .library import index_folder

        progress.status("indexing the library…")
        index_folder(out_dir, loaded=loaded)
    return BatchResult(items, time.perf_counter() - started, run.backend)


def _same_compile(m: dict, loaded, doc, cfg: CompileConfig, info: dict) -> bool:
    return (m["source"].get("sha256") == doc.sha256 and m.get("compile") == cfg.to_dict()
            and m.get("compiler") == info and m["model"].get("fingerprint") == loaded.fingerprint
            and m["model"].get("dtype") == loaded.facts.dtype)



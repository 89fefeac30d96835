"""The one compile path: documents -> text segments -> segment compiles -> cartridges.

`lcc compile` (one file or many), `lcc eval` and `--resume` all go through `compile_all`:

1. each document is split into `TextSegment`s that fit the model's window and the ratio;
2. every segment not already in the document's partial file becomes a `Unit` of work, and an
   executor (backends/) runs the units through a segment compiler (compile/base.py), in this
   process, in worker processes or on Ray, and streams results back;
3. here, in the driver alone, each result is checkpointed to OUT.partial, and a document whose
   segments are all done is assembled into one cartridge and written atomically.

Segments are independent (../shared/DESIGN.md §2, "Long documents"): each is compiled as if it were the
only text, and its buffer comes back at positions 0..K-1. The cartridge lays them out one
after another (consecutive positions, like consecutive text).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from ..buffer import Buffer
from ..config import CompileConfig
from ..errors import CartridgeError, LccError, UsageError
from ..format import manifest as mf
from ..format.cartridge import Cartridge, load_cartridge, partial_path, to_bytes
from ..format.fsio import atomic_write
from ..ingest import Document, TextSegment, split_text, token_spans_of
from ..progress import NO_PROGRESS, Progress
from ..runtime.prompts import prompt_record
from .base import CompilerSpec, SegmentResult, slot_count


def text_segments(loaded, text: str, cfg: CompileConfig) -> list[TextSegment]:
    """Split into segments of at most cfg.segment_tokens, and check that each fits the ratio
    and the model's window before minutes are spent on the first one."""
    limit = loaded.facts.max_positions
    # Training places the segment, its slots, then an instruction and the whole segment again.
    need = 2 * cfg.segment_tokens + math.ceil(cfg.segment_tokens / cfg.ratio) + 64
    if limit and need > limit:
        fit = int((limit - 64) / (2 + 1 / cfg.ratio))
        raise UsageError(f"segment_tokens {cfg.segment_tokens} does not fit the model's {limit}-position "
                         f"window during training", hint=f"use at most about {fit}", field="segment_tokens")
    if cfg.index and not cfg.gist:
        slot_count(len(loaded.prompter.context_ids(text)), cfg.ratio)  # its budget: at least one entry of text
        return []  # the document's own KV alone: nothing to compile segment by segment
    texts = split_text(text, token_spans_of(loaded.tokenizer), cfg.segment_tokens)
    for t in texts:
        slot_count(len(loaded.prompter.context_ids(t)), cfg.ratio)
    return [TextSegment(i, t) for i, t in enumerate(texts)]


@dataclass
class DocumentTask:
    """One document on its way to one cartridge."""

    doc: Document
    output: Path | None  # None: keep the cartridge in memory only (eval)
    segments: list[TextSegment]
    done: dict[int, SegmentResult] = field(default_factory=dict)
    overwrite: bool = False
    inputs: tuple = ()
    cartridge: Cartridge | None = None
    error: LccError | None = None
    seconds: float = 0.0

    @property
    def partial(self) -> Path | None:
        return partial_path(self.output) if self.output else None

    @property
    def finished(self) -> bool:
        return self.cartridge is not None or self.error is not None


@dataclass(frozen=True)
class Unit:
    """One segment to compile: what executors send to workers."""

    task: int  # index into the task list
    segment: TextSegment
    of: int  # segments in its document
    name: str  # its document's name, for progress lines


def compile_all(loaded, tasks: list[DocumentTask], cfg: CompileConfig, spec: CompilerSpec, compiler_info: dict,
                executor, progress: Progress = NO_PROGRESS, fail_fast: bool = True) -> list[DocumentTask]:
    """Compile every unfinished segment of every task, write each cartridge as soon as its
    document is complete. `compiler_info` is the compiler's describe() for the manifests.
    With fail_fast, the first error propagates (a single `compile`); otherwise it is
    recorded on its task and the other documents go on (batch compile)."""
    progress.start("cartridges", len(tasks))
    for task in tasks:
        if len(task.done) == len(task.segments):  # no segment to compile (pages only), or all resumed
            started = time.perf_counter()
            try:
                _finish(loaded, task, cfg, compiler_info, progress)
            except LccError as exc:
                if fail_fast:
                    raise
                task.error = exc
                progress.note(f"failed {task.doc.name}: {exc.message}")
            task.seconds = time.perf_counter() - started
            progress.advance("cartridges")
            if task.cartridge is not None and task.output is not None:
                progress.note(f"wrote {task.output}")
    units = [Unit(i, s, len(t.segments), t.doc.name) for i, t in enumerate(tasks) if not t.finished
             for s in t.segments if s.index not in t.done]
    started = time.perf_counter()

    class Sink:
        def wanted(self, unit: Unit) -> bool:
            return not tasks[unit.task].finished

        def done(self, unit: Unit, result: SegmentResult) -> None:
            task = tasks[unit.task]
            if task.finished:
                return
            task.done[unit.segment.index] = result
            progress.advance("segments")
            try:
                if len(task.done) == len(task.segments):
                    task.seconds = time.perf_counter() - started
                    _finish(loaded, task, cfg, compiler_info, progress)
                    progress.advance("cartridges")
                    if task.output is not None:
                        progress.note(f"wrote {task.output}")
                elif task.output is not None:
                    write_partial(loaded, task, cfg, compiler_info)
            except LccError as exc:
                self.failed(unit, exc)

        def failed(self, unit: Unit, error: BaseException) -> None:
            if fail_fast:
                raise error
            task = tasks[unit.task]
            if not task.finished:
                task.error = error if isinstance(error, LccError) else LccError(
                    f"unexpected {type(error).__name__}: {error}".splitlines()[0])
                progress.advance("cartridges")
                progress.note(f"failed {task.doc.name}: {task.error.message}")

    if units:  # pages alone have no segments to compile: no empty bar
        progress.start("segments", len(units))
        executor.run(units, cfg, spec, Sink(), progress)
    return tasks


def _finish(loaded, task: DocumentTask, cfg: CompileConfig, compiler_info: dict,
            progress: Progress = NO_PROGRESS) -> None:
    """Assemble and (if it has an output) write a complete document, then drop its partial.
    A buffer that every later load would refuse (non-finite or absurd values: a broken
    compiler) is refused here, before anything is written."""
    from ..errors import CompilerFileError
    from ..format.cartridge import check_values

    results = [task.done[s.index] for s in task.segments]
    if cfg.index:
        from .index import build_index

        pages = build_index(loaded, task.doc.text, cfg, progress, task.doc.name)
        cart = assemble_indexed(loaded, task.doc, results, cfg, compiler_info, pages)
    else:
        cart = assemble(loaded, task.doc, results, cfg, compiler_info)
    b = cart.buffer
    try:
        check_values({f"{kind}.{i}": t for kind, ts in (("k", b.keys), ("v", b.values), ("b", b.bias or []))
                      for i, t in enumerate(ts)}, task.doc.name)
    except CartridgeError as exc:
        who = compiler_info.get("file") or compiler_info.get("name", "the compiler")
        raise CompilerFileError(f"compiler {who} produced an unusable buffer for {task.doc.name} "
                                f"({exc.message.split(': ', 1)[-1]}); nothing was written") from None
    if cfg.self_check and cfg.index:  # its entries are read page by page, never as one buffer
        cart.manifest["metrics"]["self_check"] = {"questions": 0, "agreement": None,
                                                  "skipped": "an indexed cartridge: each question reads its own pages"}
    elif cfg.self_check:
        from ..runtime.selfcheck import self_check

        started = time.perf_counter()
        check = self_check(loaded, task.doc.text, cart.buffer, cfg.self_check)
        # its own time, beside the compile's: the check can take longer than the compile itself
        cart.manifest["metrics"]["self_check"] = {**check, "seconds": round(time.perf_counter() - started, 3)}
    if task.output is not None:
        _write_final(task, cart)
    task.cartridge = cart


def _write_final(task: DocumentTask, cart: Cartridge) -> None:
    """The finished cartridge replaces its partial file. If the disk is too full for both,
    the partial (whose content is in memory) is removed first and the write retried."""
    from ..errors import ResourceError

    data = to_bytes(cart)
    try:
        atomic_write(task.output, data, overwrite=task.overwrite, inputs=task.inputs)
    except ResourceError:
        if not task.partial.exists():
            raise
        kept = task.partial.read_bytes()
        task.partial.unlink()
        try:
            atomic_write(task.output, data, overwrite=task.overwrite, inputs=task.inputs)
        except ResourceError:
            try:
                atomic_write(task.partial, kept)
            except LccError:
                raise ResourceError(f"no space left to write {task.output}; the finished segments in "
                                    f"{task.partial.name} were lost too") from None
            raise ResourceError(f"no space left to write {task.output} (needs {len(data):,} bytes); finished "
                                f"segments are kept in {task.partial}", hint="free space, then --resume") from None
    task.partial.unlink(missing_ok=True)


def assemble(loaded, doc: Document, results: list[SegmentResult], cfg: CompileConfig, compiler_info: dict,
             indices: list[int] | None = None, partial: bool = False) -> Cartridge:
    """A cartridge from compiled segments: buffers laid out consecutively. A partial file
    keeps each buffer at its own positions 0..K-1 instead (never read as a cartridge), so
    that resuming reproduces the uninterrupted compile bit for bit."""
    indices = indices if indices is not None else list(range(len(results)))
    rows = [{"index": i, "slots": r.buffer.slots, "token_count": r.token_count, "sink": r.sink}
            for i, r in zip(indices, results)]
    model = loaded.facts.to_manifest(loaded.model_id, loaded.fingerprint)
    source = {"name": doc.name, "sha256": doc.sha256, "token_count": sum(r.token_count for r in results),
              "ratio": cfg.ratio}
    metrics = {"seconds": round(sum(r.metrics.get("seconds", 0) for r in results), 3),
               "segments": [r.metrics for r in results]}
    m = mf.build(model=model, segments=rows, source=source, prompt=prompt_record(), compile=cfg.to_dict(), compiler=compiler_info,
                 metrics=metrics, version=__version__,
                 storage_dtype=(not partial and cfg.kv_dtype) or str(results[0].buffer.dtype).removeprefix("torch."),
                 partial=partial)
    if partial:
        m["buffer"]["layout"] = "segments"
        m["buffer"]["segments"] = [{**row, "position_start": 0} for row in m["buffer"]["segments"]]
        m["buffer"]["first_query_position"] = max(row["slots"] for row in rows)
        return Cartridge(m, Buffer.concat([r.buffer for r in results]))
    return Cartridge(m, Buffer.laid_out([r.buffer for r in results], loaded.rope))


INDEX_STORAGE = "int8"  # an indexed cartridge's default storage (CompileConfig.kv_dtype)
PAGES_ONLY = {"name": "pages", "note": "the document's own KV in pages; no compiler ran"}


def recorded_compiler(cfg: CompileConfig, compiler_info: dict) -> dict:
    """What a manifest says compiled it: an indexed cartridge without a gist ran no compiler,
    so it does not name the one that was resolved."""
    return PAGES_ONLY if cfg.index and not cfg.gist else compiler_info


def assemble_indexed(loaded, doc: Document, results: list[SegmentResult], cfg: CompileConfig, compiler_info: dict,
                     idx) -> Cartridge:
    """An indexed cartridge: the gist (the compiled segments, if any, laid out from 0) and then
    the document's own KV (compile/index.py), stored as `cfg.kv_dtype`."""
    rows = [{"index": i, "slots": r.buffer.slots, "token_count": r.token_count, "sink": r.sink}
            for i, r in enumerate(results)]
    gist = sum(r["slots"] for r in rows)
    index = {**idx.index,
             "windows": [{**w, "entry_start": w["entry_start"] + gist} for w in idx.index["windows"]],
             "pages": [{**p, "start": p["start"] + gist} for p in idx.index["pages"]],
             "always": [[a + gist, b + gist] for a, b in idx.index["always"]]}
    model = loaded.facts.to_manifest(loaded.model_id, loaded.fingerprint)
    source = {"name": doc.name, "sha256": doc.sha256, "token_count": idx.token_count, "ratio": cfg.ratio}
    seconds = sum(r.metrics.get("seconds", 0) for r in results) + idx.seconds
    metrics = {"seconds": round(seconds, 3), "segments": [r.metrics for r in results],
               "index": {"seconds": round(idx.seconds, 3), "pages": len(index["pages"]),
                         "windows": len(index["windows"])}}
    m = mf.build(model=model, segments=rows, source=source, prompt=prompt_record(), compile=cfg.to_dict(),
                 compiler=recorded_compiler(cfg, compiler_info), metrics=metrics, version=__version__,
                 storage_dtype=cfg.kv_dtype or INDEX_STORAGE, index=index)
    parts = [Buffer.laid_out([r.buffer for r in results], loaded.rope)] if results else []
    return Cartridge(m, Buffer.concat(parts + [idx.buffer]), idx.tensors)


# --- partial files (interrupt and resume) --------------------------------------------------

def write_partial(loaded, task: DocumentTask, cfg: CompileConfig, compiler_info: dict) -> None:
    """Checkpoint finished segments. The manifest says `partial: true`, so `ask` and
    `verify` refuse it: it never looks like a complete cartridge."""
    indices = sorted(task.done)
    cart = assemble(loaded, task.doc, [task.done[i] for i in indices], cfg, compiler_info, indices, partial=True)
    atomic_write(task.partial, to_bytes(cart), overwrite=True)


def read_partial(path: Path, loaded, doc: Document, cfg: CompileConfig, compiler_info: dict) -> dict[int, SegmentResult]:
    """Finished segments from a partial file, after checking it belongs to this compile."""
    cart = load_cartridge(path, allow_partial=True)
    m = cart.manifest
    hint = "rerun with --force and without --resume to start over"
    if m["source"]["sha256"] != doc.sha256:
        raise UsageError(f"{path.name} was made from a different source file", hint=hint)
    if m["compile"] != cfg.to_dict() or m.get("compiler") != compiler_info:
        raise UsageError(f"{path.name} was made with different settings", hint=hint)
    if m["model"]["fingerprint"] != loaded.fingerprint or m["model"].get("dtype") != loaded.facts.dtype:
        raise UsageError(f"{path.name} was made with a different model or dtype", hint=hint)
    if m["buffer"].get("layout") != "segments":
        raise CartridgeError(f"{path.name} is not a partial file of this lcc version", hint=hint)
    out = {}
    for row, metrics, buffer in zip(cart.segments, m["metrics"]["segments"], cart.segment_buffers()):
        out[row["index"]] = SegmentResult(buffer, row["token_count"], metrics, row.get("sink", False))
    return out


def compile_text(loaded, text: str, name: str = "document.txt", compiler: str | CompilerSpec | None = "auto",
                 settings: dict | CompileConfig | None = None, quality: str = "balanced",
                 progress: Progress = NO_PROGRESS, built: dict | None = None) -> Cartridge:
    """`compile_document` for a text."""
    import hashlib

    doc = Document(text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), name=name)
    return compile_document(loaded, doc, compiler, settings, quality, progress, built)


def compile_document(loaded, doc: Document, compiler: str | CompilerSpec | None = "auto",
                     settings: dict | CompileConfig | None = None, quality: str = "balanced",
                     progress: Progress = NO_PROGRESS, built: dict | None = None) -> Cartridge:
    """One document compiled in memory with the model already loaded, through the one compile
    path (in this process), and returned as it would be read back from its file (keys and
    values stored as the settings store them: int8 for the default indexed cartridge).
    `built`: compilers already built, by spec, reused across calls."""
    from ..backends.local import LocalExecutor
    from ..format.cartridge import from_bytes, to_bytes
    from .base import build_compiler
    from .choice import settle

    spec, cfg = settle(loaded, compiler, settings, quality)
    built = {} if built is None else built
    if spec not in built:
        built[spec] = build_compiler(spec, loaded)
    method = built[spec]
    task = DocumentTask(doc, None, text_segments(loaded, doc.text, cfg))
    compile_all(loaded, [task], cfg, spec, method.describe(), LocalExecutor(loaded, method), progress)
    return from_bytes(to_bytes(task.cartridge), doc.name)

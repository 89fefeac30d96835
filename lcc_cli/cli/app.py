"""The `lcc` command line: parse flags, call the API (api.py), render what it returns.

This is the only module that prints or exits. Engine code raises `LccError` subclasses
naming config fields (`ratio`), which `_errors` shows as the flags users type (`--ratio`), in
one `lcc: error: ...` line on stderr with the exit code from errors.py. Heavy modules (torch, transformers) are imported inside commands,
never at import time, so `lcc --help` stays fast.
"""

from __future__ import annotations

import functools
import os
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .._version import __version__
from ..config import DEFAULT_MODEL, DEVICE_ENV, MODEL_ENV, AskConfig, CompileConfig, TrainConfig
from ..errors import (EXIT_CODES, EXIT_INTERRUPTED, EXIT_RESOURCES, EXIT_UNEXPECTED, EXIT_USAGE, LccError, UsageError,
                      VerifyFailed)
from .render import clean, compiler_rows, inspect_rows, markup_safe, print_json, print_json_line

app = typer.Typer(
    help="Compile documents into memory cartridges that a frozen language model reads instead of the document.",
    epilog="Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # never dump locals (which hold document text) at users
    add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs instead of keeping their line breaks
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ModelOpt = typer.Option(None, "--model", "-m", envvar=MODEL_ENV,
                        help=f"Base model: '{DEFAULT_MODEL}' (embedded) or a local Hugging Face model directory.")
DeviceOpt = typer.Option(None, "--device", envvar=DEVICE_ENV, help="auto | cpu | cuda (bf16 on CUDA).")
ThreadsOpt = typer.Option(None, "--threads", help="CPU math threads (default: the cores other programs leave "
                                                 "free, re-checked as work runs).")
DtypeOpt = typer.Option(None, "--dtype", help="Compute dtype: float32 (CPU default) | bfloat16 (CUDA default; "
                                             "2.3x faster on CPUs with AVX512-BF16).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")
# Shared by ask and chat.
ContextOpt = typer.Option(None, "--context", "-c", help="Answer with this document in the prompt instead (baseline).")
MaxTokensOpt = typer.Option(AskConfig.max_new_tokens, "--max-new-tokens", help="Longest answer, in tokens.")
TemperatureOpt = typer.Option(AskConfig.temperature, "--temperature", help="0 decodes greedily.")
ForceReadOpt = typer.Option(False, "--force", help="Use a cartridge even if it was made for another model.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _errors(fn):
    """Map engine errors to one stderr line and the exit-code table. LCC_DEBUG=1 adds the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LccError as exc:
            message = exc.message
            field = getattr(exc, "field", None)
            if field and message.startswith(field + " "):  # config fields read as the flags users typed
                message = _flag(field) + message[len(field):]
            _fail(message, exc.exit_code, exc.hint)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except MemoryError:
            _fail("out of memory", EXIT_RESOURCES, "close other programs or use a smaller model")
        except RecursionError:
            _fail("input nested too deeply to process", EXIT_USAGE)
        except RuntimeError as exc:
            if "out of memory" in str(exc) or "can't allocate memory" in str(exc):  # torch's CUDA/CPU allocators
                _fail("out of memory", EXIT_RESOURCES, "use fewer --workers, a smaller --segment-tokens, or the CPU")
            _fail(f"unexpected {type(exc).__name__}: {exc}".splitlines()[0], EXIT_UNEXPECTED,
                  "set LCC_DEBUG=1 for the traceback")
        except Exception as exc:  # the last resort: still one line, still a distinct code
            _fail(f"unexpected {type(exc).__name__}: {exc}".splitlines()[0], EXIT_UNEXPECTED,
                  "set LCC_DEBUG=1 for the traceback")

    return wrapper


def _fail(message: str, code: int, hint: str | None = None):
    if os.environ.get("LCC_DEBUG"):
        traceback.print_exc()
    line = clean(f"lcc: error: {message}".replace("\n", " ") + (f" ({hint})" if hint else ""))
    err.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool):
    if value:
        out.print(f"lcc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """lcc: latent context compilation for a frozen language model."""


def _progress(quiet: bool):
    from .progress import RichProgress

    return RichProgress(err, quiet=quiet or not err.is_terminal)


def _run(model, device, threads, dtype=None, **extra):
    from ..api import RunOptions

    return RunOptions(model=model, device=device, threads=threads, dtype=dtype, **extra)


@app.command("compile")
@_errors
def compile_cmd(
    sources: list[Path] = typer.Argument(..., metavar="SOURCE...",
                                         help="Documents (.txt, .md, .pdf; '-' reads stdin) or folders of them."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Cartridge path (default: SOURCE with .lcc suffix); with several "
                                              "sources, a folder, or a path ending in '/', the output directory."),
    ratio: float = typer.Option(CompileConfig.ratio, help="Compression: document tokens per buffer slot."),
    compiler: str = typer.Option("auto", "--compiler",
                                 help="auto (the shipped pretrained compiler when it fits the model, else the "
                                      "bench's pick for any model: lcc_cli/data/auto.json) | none (per-document "
                                      "optimisation from scratch) | am (Attention-Matching compaction: any model, "
                                      "one pass, no training) | truncate (the first tokens of each segment) | "
                                      "a compiler file. With am or truncate, --steps N refines the buffer's KV "
                                      "directly."),
    quality: str = typer.Option("balanced", "--quality",
                                help="fast | balanced | best: sets --steps, --lr and the KL pool from the measured "
                                     "frontier (README), per compiler; explicit flags win."),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps per segment (refinement steps for a "
                                                   "pretrained compiler; 0 = one forward pass). Default: --quality."),
    lr: Optional[float] = typer.Option(None, help="Learning rate for the LoRA compiler and buffer embeddings."),
    lora_rank: Optional[int] = typer.Option(None, help="Rank of the throwaway LoRA (with --compiler none only; a "
                                                       "pretrained compiler brings its own)."),
    teacher: Optional[str] = typer.Option(None, help="KL teacher for generic queries: context | plain."),
    self_check: Optional[int] = typer.Option(None, "--self-check", metavar="N",
                                             help="Ask the model N (up to 8) questions about the document and "
                                                  "record how well the cartridge's answers agree with the "
                                                  "document's (shown by inspect)."),
    bias: Optional[bool] = typer.Option(None, "--bias/--no-bias",
                                        help="Per-entry attention biases: am fits them (NNLS), refinement learns "
                                             "them. PEFT export then needs --drop-bias."),
    segment_tokens: Optional[int] = typer.Option(None, help=f"Longest segment compiled at once (default "
                                                          f"{CompileConfig.segment_tokens}; am: the whole document "
                                                          f"where it fits the window)."),
    seed: int = typer.Option(CompileConfig.seed, help="Random seed; a compile is deterministic for a seed."),
    max_bytes: int = typer.Option(20 * 1024 * 1024, help="Refuse source files larger than this."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = typer.Option(False, "--force", "-f",
                               help="Overwrite an existing output (a regular file only) and discard a partial one."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted compile from OUTPUT.partial."),
    workers: int = typer.Option(1, "--workers", help="Compile in N workers, each with its own model (N > 1 with "
                                                     "the local backend means processes)."),
    backend: str = typer.Option("local", "--backend", help="local (this process) | processes | ray."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="Ray cluster to use with --backend ray (default: a local one)."),
    dtype: Optional[str] = DtypeOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Start even if the estimate is over an hour."),
    as_json: bool = JsonOpt,
):
    """Compile documents into .lcc cartridges (latent context compilation).

    One SOURCE: one cartridge at --output. Several, or a folder: one cartridge each in
    OUTDIR, skipping those already compiled with the same settings, and a summary at the end
    (exit 10 if any document failed). Long documents are split into segments of at most
    --segment-tokens; each gets its own buffer. Ctrl-C keeps finished segments in
    OUTPUT.partial for --resume."""
    from .. import api

    settings = dict(ratio=ratio, steps=steps, lr=lr, lora_rank=lora_rank,
                    lora_alpha=2 * lora_rank if lora_rank else None, teacher=teacher, segment_tokens=segment_tokens,
                    seed=seed, bias=bias, self_check=self_check)
    run = _run(model, device, threads, dtype, workers=workers, backend=backend, ray_address=ray_address)
    batch = len(sources) > 1 or any(s.is_dir() for s in sources) or (
        output is not None and (output.endswith("/") or Path(output).is_dir()))
    if batch:
        if output is None:
            raise UsageError("compiling several documents needs --output OUTDIR")
        with _progress(as_json) as progress:
            summary = api.compile_paths(sources, Path(output), settings, compiler=compiler, quality=quality, run=run,
                                        force=force, resume=resume, max_bytes=max_bytes, yes=yes, progress=progress)
        _render_batch(summary, as_json)
        return
    (source,) = sources
    with _progress(as_json) as progress:
        result = api.compile_file(source, output and Path(output), settings, compiler=compiler, quality=quality,
                                  run=run, force=force,
                                  resume=resume, max_bytes=max_bytes, yes=yes, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    last = result.metrics[-1] if result.metrics else {}
    losses = ""
    if "final_recon" in last:
        kl = f", kl {last['final_kl']:.3f}" if "final_kl" in last else ""
        losses = f"; final recon {last['final_recon']:.3f}{kl}"
    method = result.compiler.get("name", "?") + (f" + {last.get('steps')} steps" if result.compiler.get("name")
                                                  == "pretrained" else "")
    out.print(f"wrote {clean(result.path)}: {result.slots} slots from {result.tokens} tokens "
              f"({result.segments} segment{'s' if result.segments != 1 else ''}) in {result.seconds:.1f}s "
              f"[{clean(method)}]{losses}", markup=False)


def _render_batch(summary, as_json: bool) -> None:
    from ..errors import EXIT_PARTIAL

    if as_json:
        print_json(summary.to_dict())
    else:
        table = Table(title=f"{len(summary.items)} documents in {summary.seconds:.1f} s ({summary.backend})",
                      title_justify="left")
        for col in ("status", "source", "output", "slots", "s", "reason"):
            table.add_column(col)
        colour = {"done": "green", "skipped": "dim", "failed": "red"}
        for i in summary.items:
            table.add_row(f"[{colour[i.status]}]{i.status}[/]", markup_safe(i.source), markup_safe(i.output or ""),
                          str(i.slots or ""), f"{i.seconds:.1f}" if i.seconds else "", markup_safe(i.reason))
        out.print(table)
    if summary.failed:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
@_errors
def ask(
    args: Optional[list[str]] = typer.Argument(None, metavar="[CARTRIDGE...] QUESTION",
                                               help="Zero or more .lcc cartridges, then the question ('-' reads stdin)."),
    questions: Optional[str] = typer.Option(None, "--questions", "-q", metavar="FILE",
                                            help="Answer every question in FILE (one per line, or JSONL with 'q'; "
                                                 "'-' = stdin) with one model load; always writes JSONL, one line "
                                                 "per answer."),
    context: Optional[Path] = ContextOpt,
    max_new_tokens: int = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceReadOpt,
    as_json: bool = JsonOpt,
):
    """Answer QUESTION from cartridges (or from --context FILE, or from nothing)."""
    import sys

    from .. import api

    args = list(args or [])
    if questions is None:
        if not args:
            raise UsageError("the question is missing (usage: lcc ask [CARTRIDGE...] QUESTION)")
        *cartridges, question = args
        if question.endswith(".lcc") and Path(question).is_file():
            raise UsageError("the question is missing (usage: lcc ask [CARTRIDGE...] QUESTION)")
        # stdin is read only as far as the longest question allowed (and one more to know)
        asked = [sys.stdin.read(api.MAX_QUESTION_CHARS + 1) if question == "-" else question]
        api.check_question(asked[0])
    else:
        cartridges, asked = args, api.read_questions(questions)
    cfg = AskConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    reader = api.Reader([Path(c) for c in cartridges], context, _run(model, device, threads, dtype), force)
    reader.check(asked, cfg)  # every question, before the first answer is printed
    if questions is not None:
        for q in asked:
            print_json_line(_answer_json(reader.ask(q, cfg), reader.mode))
        return
    stream = None if as_json else (lambda piece: out.print(clean(piece), end="", markup=False, highlight=False))
    result = reader.ask(asked[0], cfg, on_text=stream)
    if as_json:
        print_json(_answer_json(result, reader.mode))
    else:
        out.print()


@app.command()
@_errors
def chat(
    cartridges: Optional[list[Path]] = typer.Argument(None, help="Cartridges to read from (composed)."),
    context: Optional[Path] = ContextOpt,
    max_new_tokens: int = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceReadOpt,
):
    """Ask questions one after another with the model kept loaded (Ctrl-D or 'exit' ends).
    Each question is answered on its own: earlier turns are not remembered."""
    from .. import api

    cfg = AskConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    err.print("loading…", highlight=False)
    reader = api.Reader(list(cartridges or []), context, _run(model, device, threads, dtype), force)
    err.print(f"ready ({reader.mode}); ask a question, or Ctrl-D to quit", highlight=False)
    while True:
        try:
            question = input("> ")
        except EOFError:
            out.print()
            return
        if question.strip().lower() in ("exit", "quit"):
            return
        if not question.strip():
            continue
        try:
            reader.ask(question, cfg, on_text=lambda piece: out.print(clean(piece), end="", markup=False))
        except UsageError as exc:  # a question that does not fit: say so and go on
            err.print(f"lcc: {clean(exc.message)}", markup=False)
        out.print()


def _answer_json(a, mode: str) -> dict:
    return {"answer": a.text, "mode": mode, "question": a.question,
            "seconds_to_first_token": round(a.seconds_to_first_token, 4), "seconds_total": round(a.seconds_total, 4),
            "kv_positions": a.kv_positions, "prompt_tokens": a.prompt_tokens, "new_tokens": len(a.token_ids)}


@app.command()
@_errors
def inspect(cartridge: Path = typer.Argument(..., help="A .lcc cartridge or a compiler file."),
            as_json: bool = JsonOpt):
    """Show what is inside a cartridge (model, buffer layout, source, settings, metrics) or a
    pretrained compiler file (model, LoRA, training)."""
    from .. import api

    info = api.inspect(cartridge)
    if as_json:
        print_json(info)
        return
    table = Table(title=markup_safe(cartridge), show_header=False, title_justify="left")
    rows = compiler_rows(info) if info["kind"] == "compiler" else inspect_rows(info)
    for key, value in rows:
        table.add_row(markup_safe(key), markup_safe(value))
    out.print(table)


@app.command()
@_errors
def verify(
    cartridge: Path = typer.Argument(..., help="A .lcc file."),
    source: Optional[Path] = typer.Option(None, "--source", help="Also check it was compiled from this document."),
    no_model: bool = typer.Option(False, "--no-model", help="Skip the checks that load the base model."),
    probe: bool = typer.Option(False, "--probe", help="With --source: measure reconstruction fidelity."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
):
    """Check a cartridge: parse, version, schema, tensors, checksum, values, model and
    fingerprint (and the source, and a reconstruction probe, when asked).

    Exits 0 only if every check passes, 7 if any fails."""
    from .. import api

    report = api.verify(cartridge, model=not no_model, run=_run(model, device, threads), source=source, probe=probe)
    if as_json:
        print_json(report.to_dict())
    else:
        for c in report.checks:
            mark = {True: "[green]ok[/]  ", False: "[red]FAIL[/]", None: "[dim]skip[/]"}[c.ok]
            out.print(f"{mark} {c.name:<12} {markup_safe(c.detail)}")
    failed = report.first_failure
    if failed:
        raise VerifyFailed(f"check '{failed.name}' failed: {failed.detail}")


@app.command("eval")
@_errors
def eval_cmd(
    data: Path = typer.Argument(..., help="JSONL dataset: {id, title, context, questions: [{q, answers}]} per line."),
    ratio: Optional[list[float]] = typer.Option(None, "--ratio", help="Compression ratio; repeat for several."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N documents."),
    questions: Optional[int] = typer.Option(None, help="At most N questions per document."),
    steps: Optional[int] = typer.Option(None, help="Compile steps per segment (default: compile default)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML with [eval] (and [[eval.methods]]) and "
                                                               "[compile] tables."),
    compiler: str = typer.Option("auto", "--compiler", help="Without [[eval.methods]]: auto | none | pretrained | "
                                                            "a compiler file, with [compile] over its preset."),
    out_dir: Path = typer.Option(Path("eval-out"), "--out", help="Directory for report.md, results.json, plot."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
):
    """Measure cartridge quality and cost against full / none / truncate baselines.

    Finished documents are kept in --out; re-running resumes where an interrupted run stopped."""
    from dataclasses import replace

    from .. import api
    from ..config import load_eval_config
    from ..eval.report import cost_table, score_table

    settings = load_eval_config(config)
    if ratio:
        settings = replace(settings, ratios=list(ratio))
    if limit is not None:
        settings = replace(settings, limit=limit)
    if questions is not None:
        settings = replace(settings, questions_per_doc=questions)
    if steps is not None:
        if settings.methods:
            raise UsageError("--steps does not apply to [[eval.methods]]: set steps in each method")
        settings.compile = replace(settings.compile, steps=steps)
        settings.compile_table["steps"] = steps
    with _progress(as_json) as progress:
        result = api.run_eval(data, settings, out_dir, compiler=compiler, run=_run(model, device, threads),
                              progress=progress)
    if as_json:
        print_json(result)
        return
    from rich.markdown import Markdown

    out.print(Markdown(score_table(result["summary"]) + "\n\n" + cost_table(result["summary"])))
    out.print(f"report: {clean(out_dir / 'report.md')}", markup=False)


@app.command("export")
@_errors
def export_cmd(
    cartridge: Path = typer.Argument(..., help="A .lcc cartridge."),
    to: str = typer.Option("peft", "--to", help="Target format: peft (a PEFT Cartridge adapter directory)."),
    out_dir: Path = typer.Argument(..., metavar="DIR", help="Directory to write."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite files in a non-empty DIR."),
    drop_bias: bool = typer.Option(False, "--drop-bias", help="Export a cartridge that carries attention biases "
                                                              "without them (PEFT cannot hold them; answers change)."),
    as_json: bool = JsonOpt,
):
    """Write CARTRIDGE as a PEFT Cartridge adapter: `PeftModel.from_pretrained(base, DIR)`
    reads it with no lcc installed. lcc's manifest rides along in DIR/lcc_manifest.json."""
    from .. import api

    path = api.export_cartridge(cartridge, to, out_dir, force=force, drop_bias=drop_bias)
    if as_json:
        print_json({"path": str(path), "format": to})
    else:
        out.print(f"wrote {clean(path)} (PEFT Cartridge adapter)", markup=False)


@app.command("import")
@_errors
def import_cmd(
    directory: Path = typer.Argument(..., metavar="DIR", help="A PEFT Cartridge adapter directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Cartridge path to write."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUTPUT; accept an lcc manifest made for "
                                                           "another model."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
):
    """Read a PEFT Cartridge adapter (exported by lcc or trained elsewhere) into a cartridge
    pinned to the base model's fingerprint."""
    from .. import api

    result = api.import_adapter(directory, output, run=_run(model, device, threads), force=force)
    if as_json:
        print_json(result.to_dict())
    else:
        out.print(f"wrote {clean(result.path)}: {result.slots} slots", markup=False)


@app.command("train-compiler")
@_errors
def train_compiler_cmd(
    data: list[Path] = typer.Argument(..., help="JSONL training data: {context, questions: [{q}]} per line."),
    output: Path = typer.Option(..., "--output", "-o", help="Compiler file to write."),
    steps: int = typer.Option(TrainConfig.steps, help="Optimiser steps."),
    batch: int = typer.Option(TrainConfig.batch, help="Documents per optimiser step."),
    lr: float = typer.Option(TrainConfig.lr, help="Peak learning rate."),
    lora_rank: int = typer.Option(TrainConfig.lora_rank, help="Rank of the pretrained LoRA."),
    min_ratio: float = typer.Option(TrainConfig.min_ratio, help="Smallest compression ratio drawn."),
    max_ratio: float = typer.Option(TrainConfig.max_ratio, help="Largest compression ratio drawn."),
    checkpoint_every: int = typer.Option(TrainConfig.checkpoint_every, help="Steps between checkpoints."),
    seed: int = typer.Option(TrainConfig.seed, help="Random seed: a run is deterministic for a seed (and device)."),
    time_limit: Optional[float] = typer.Option(None, help="Stop after this many minutes (the file records the "
                                                          "steps done)."),
    stop_after: Optional[int] = typer.Option(None, help="Stop after this many steps of the --steps schedule (the "
                                                        "file records the steps done)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT.ckpt/."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing compiler file."),
    batched: Optional[bool] = typer.Option(None, "--batched/--per-document",
                                           help="A step's documents in a few padded passes (default on CUDA: far "
                                                "fewer kernel launches) or one document at a time (default on CPUs, "
                                                "where padding costs more than it saves)."),
    backend: str = typer.Option("local", "--backend", help="local (this process) | ray (data-parallel on Ray "
                                                           "Train: DDP over --workers processes)."),
    workers: int = typer.Option(1, "--workers", help="Ray Train workers; each computes its share of every step."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="Ray cluster to use with --backend ray (default: a local one)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
):
    """Pretrain a compiler for the base model: learn once how to compile any document.

    Each step compiles documents at a random ratio between --min-ratio and --max-ratio and
    trains the buffer-only LoRA on reconstruction plus KL to the full-context teacher on
    the data's questions. Checkpoints in OUTPUT.ckpt/ allow --resume."""
    from .. import api

    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, lora_rank=lora_rank, lora_alpha=lora_rank,
                      min_ratio=min_ratio, max_ratio=max_ratio, checkpoint_every=checkpoint_every, seed=seed)
    if time_limit is not None and not time_limit > 0:
        raise UsageError(f"time_limit must be a positive number of minutes (got {time_limit})", field="time_limit")
    if stop_after is not None and stop_after < 1:
        raise UsageError(f"stop_after must be at least 1 (got {stop_after})", field="stop_after")
    with _progress(as_json) as progress:
        run = _run(model, device, threads, dtype, workers=workers, backend=backend, ray_address=ray_address)
        result = api.train_compiler(data, output, cfg, run=run, force=force, resume=resume, batched=batched,
                                    time_limit=time_limit * 60 if time_limit else None, stop_after=stop_after,
                                    progress=progress)
    if as_json:
        print_json(vars(result))
        return
    out.print(f"wrote {clean(result.path)}: {result.steps} steps in {result.seconds:.0f}s "
              f"({result.tokens_per_second:,.0f} tokens/s); kept step {result.selected_step} "
              f"(held-out QA KL {result.heldout_qa_kl})", markup=False)


@app.command("serve")
@_errors
def serve_cmd(
    paths: list[Path] = typer.Argument(..., metavar="DIR|CART...", help="Folders of cartridges (new files are "
                                       "served as they appear) and cartridge files."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LCC_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (or set LCC_API_KEY)."),
    max_queue: int = typer.Option(32, "--max-queue", help="Requests waiting or running at once; more get 429."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests for one cartridge decoded together."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Largest max_tokens a request may ask for."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Serve cartridges over an OpenAI-compatible HTTP API (POST /v1/chat/completions).

    A request's model is a cartridge's name (its file stem), several joined with '+', or
    the plain model's name. Stop with Ctrl-C: requests in flight finish first."""
    from .. import api
    from ..serve.app import Limits

    for name, value, low in (("port", port, 0), ("max_queue", max_queue, 1), ("max_batch", max_batch, 1),
                             ("max_tokens", max_tokens, 1)):
        if value < low or (name == "port" and value > 65535):
            raise UsageError(f"{name} must be {'a port number' if name == 'port' else f'at least {low}'} "
                             f"(got {value})", field=name)
    limits = Limits(max_queue=max_queue, max_batch=max_batch, max_tokens=max_tokens,
                    default_max_tokens=min(256, max_tokens))
    with _progress(False) as progress:
        api.serve(paths, host, port, limits, api_key, run=_run(model, device, threads, dtype), progress=progress,
                  warn=lambda text: err.print(f"lcc: warning: {clean(text)}", markup=False))


def main():
    # Before torch loads OpenMP: waiting threads sleep instead of spinning on a core that
    # another program needs (runtime/threads.py; measured in bench/results).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Before anything imports tqdm (which reads this once): the GGUF de-quantiser's bars would
    # print a dozen lines on a first run; lcc draws its own progress.
    os.environ.setdefault("TQDM_DISABLE", "1")
    app()

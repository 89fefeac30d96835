"""The `lcc` command line: parse flags, call the engine, render results.

This is the only module that prints or exits. Engine code raises `LccError` subclasses;
`_errors` turns them into `lcc: error: ...` on stderr and the exit code from errors.py.
Heavy modules (torch, transformers) are imported inside commands, never at import time,
so `lcc --help` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import DEFAULT_MODEL, MODEL_ENV, AskConfig, CompileConfig
from .errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_RESOURCES, EXIT_UNEXPECTED, LccError, UsageError, VerifyFailed

app = typer.Typer(
    help="Compile documents into memory cartridges that a frozen language model reads instead of the document.",
    epilog="Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # never dump locals (which hold document text) at users
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ModelOpt = typer.Option(None, "--model", "-m", envvar=MODEL_ENV,
                        help=f"Base model: '{DEFAULT_MODEL}' (embedded) or a local Hugging Face model directory.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")


def _errors(fn):
    """Map engine errors to one stderr line and the exit-code table. LCC_DEBUG=1 adds the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LccError as exc:
            _fail(exc.message, exc.exit_code, exc.hint)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except MemoryError:
            _fail("out of memory", EXIT_RESOURCES, "try a smaller --segment-tokens")
        except Exception as exc:  # the last resort: still one line, still a distinct code
            _fail(f"unexpected {type(exc).__name__}: {exc}".splitlines()[0], EXIT_UNEXPECTED,
                  "set LCC_DEBUG=1 for the traceback")

    return wrapper


def _fail(message: str, code: int, hint: str | None = None):
    if os.environ.get("LCC_DEBUG"):
        traceback.print_exc()
    err.print(f"lcc: error: {message}" + (f" ({hint})" if hint else ""), markup=False, highlight=False,
              soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool):
    if value:
        out.print(f"lcc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """lcc: latent context compilation for a frozen language model."""


@app.command("compile")
@_errors
def compile_cmd(
    source: Path = typer.Argument(..., help="Document to compile: .txt, .md or .pdf."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Cartridge path (default: SOURCE with .lcc suffix)."),
    ratio: float = typer.Option(CompileConfig.ratio, help="Compression: document tokens per buffer slot."),
    steps: int = typer.Option(CompileConfig.steps, help="Optimisation steps per segment."),
    lr: float = typer.Option(CompileConfig.lr, help="Learning rate for the LoRA compiler and buffer embeddings."),
    lora_rank: int = typer.Option(CompileConfig.lora_rank, help="Rank of the throwaway LoRA compiler."),
    teacher: str = typer.Option(CompileConfig.teacher, help="KL teacher for generic queries: context | plain."),
    segment_tokens: int = typer.Option(CompileConfig.segment_tokens, help="Longest segment compiled at once."),
    seed: int = typer.Option(CompileConfig.seed, help="Random seed; a compile is deterministic for a seed."),
    max_bytes: int = typer.Option(20 * 1024 * 1024, help="Refuse source files larger than this."),
    model: Optional[str] = ModelOpt,
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output (and discard a partial one)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted compile from OUTPUT.partial."),
    workers: int = typer.Option(1, "--workers", help="Compile segments in N processes, each with its own model."),
    as_json: bool = JsonOpt,
):
    """Compile SOURCE into a .lcc cartridge (latent context compilation).

    Long documents are split into segments of at most --segment-tokens; each gets its own
    buffer. Ctrl-C keeps finished segments in OUTPUT.partial for --resume."""
    from . import engine

    cfg = CompileConfig(ratio=ratio, steps=steps, lr=lr, lora_rank=lora_rank, lora_alpha=2 * lora_rank,
                        teacher=teacher, segment_tokens=segment_tokens, seed=seed)
    output = output or source.with_suffix(".lcc")
    with CompileProgress(quiet=as_json or not err.is_terminal) as progress:
        result = engine.compile_file(source, output, cfg, model=model, force=force, max_bytes=max_bytes,
                                     progress=progress, resume=resume, workers=workers)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        m = result["metrics"]
        segs = m["segments"]
        out.print(f"wrote {result['path']}: {result['slots']} slots from {result['tokens']} tokens "
                  f"({len(segs)} segment{'s' if len(segs) != 1 else ''}) in {m['seconds']:.1f}s; "
                  f"final recon {segs[-1].get('final_recon', float('nan')):.3f}, "
                  f"kl {segs[-1].get('final_kl', float('nan')):.3f}")


class CompileProgress:
    """A rich progress bar over segments x steps, with the current losses."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} steps"), TextColumn("{task.fields[losses]}"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            console=err, disable=self.quiet, transient=False)
        self.bar.__enter__()
        self.task = None
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def status(self, text: str):
        if not self.quiet:
            err.print(text, highlight=False)

    def segment(self, index: int, total: int, tokens: int, steps: int):
        if self.task is None:
            self.task = self.bar.add_task("compiling", total=total * steps, losses="")
        if not self.quiet:
            self.bar.print(f"segment {index + 1}/{total}: {tokens} tokens", highlight=False)

    def step(self, step: int, total: int, metrics: dict):
        losses = f"recon {metrics['recon']:.3f} kl {metrics['kl']:.3f}"
        self.bar.update(self.task, advance=1, losses=losses)


@app.command()
@_errors
def ask(
    args: list[str] = typer.Argument(..., metavar="[CARTRIDGE...] QUESTION",
                                     help="Zero or more .lcc cartridges, then the question."),
    context: Optional[Path] = typer.Option(None, "--context", "-c",
                                           help="Answer with this document in the prompt instead (baseline)."),
    max_new_tokens: int = typer.Option(AskConfig.max_new_tokens, help="Longest answer, in tokens."),
    temperature: float = typer.Option(AskConfig.temperature, help="0 decodes greedily."),
    model: Optional[str] = ModelOpt,
    force: bool = typer.Option(False, "--force", help="Use a cartridge even if it was made for another model."),
    as_json: bool = JsonOpt,
):
    """Answer QUESTION from cartridges (or from --context FILE, or from nothing)."""
    from . import engine

    *cartridges, question = args
    if not question.strip():
        raise UsageError("the question is empty")
    if cartridges and context:
        raise UsageError("give cartridges or --context, not both")
    cfg = AskConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    stream = None if as_json else (lambda piece: out.print(piece, end="", markup=False, highlight=False))
    result = engine.ask(question, [Path(c) for c in cartridges], context=context, cfg=cfg, model=model,
                        force=force, on_text=stream)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print()


@app.command()
@_errors
def inspect(cartridge: Path = typer.Argument(..., help="A .lcc file."), as_json: bool = JsonOpt):
    """Show what is inside a cartridge: model, buffer layout, source, settings, metrics."""
    from .cartridge import load_cartridge

    cart = load_cartridge(cartridge)
    m = cart.manifest
    if as_json:
        out.print_json(json.dumps({"path": str(cartridge), "bytes": cartridge.stat().st_size, "manifest": m}))
        return
    table = Table(title=str(cartridge), show_header=False, title_justify="left")
    for key, value in _inspect_rows(cartridge, m):
        table.add_row(key, str(value))
    out.print(table)


def _inspect_rows(path: Path, m: dict):
    model, buf, src, c = m["model"], m["buffer"], m["source"], m["compile"]
    yield "format", f"{m['format']} v{m['format_version']} (lcc {m['lcc_version']}, {m['created']})"
    yield "model", f"{model['id']}  sha256:{model['fingerprint'][:16]}…"
    yield "model shape", (f"{model['num_layers']} layers, {model['num_kv_heads']} kv heads, head dim "
                          f"{model['head_dim']}, rope theta {model.get('rope_theta')}, {model['dtype']}")
    yield "buffer", (f"{buf['total_slots']} slots in {len(buf['segments'])} segment(s); "
                     f"question starts at position {buf['first_query_position']}")
    for s in buf["segments"][:8]:
        yield f"  segment {s.get('index', '?')}", (f"{s['token_count']} tokens -> {s['slots']} slots at "
                                                   f"positions {s['position_start']}..{s['position_start'] + s['slots'] - 1}")
    yield "source", f"{src.get('name')}  sha256:{str(src.get('sha256'))[:16]}…  {src.get('token_count')} tokens"
    yield "ratio", src.get("ratio")
    yield "compile", ", ".join(f"{k}={v}" for k, v in c.items() if k != "lora_targets")
    yield "compile time", f"{m['metrics'].get('seconds')} s"
    yield "file size", f"{path.stat().st_size:,} bytes"


@app.command()
@_errors
def verify(
    cartridge: Path = typer.Argument(..., help="A .lcc file."),
    source: Optional[Path] = typer.Option(None, "--source", help="Also check it was compiled from this document."),
    no_model: bool = typer.Option(False, "--no-model", help="Skip the checks that load the base model."),
    probe: bool = typer.Option(False, "--probe", help="With --source: measure reconstruction fidelity."),
    model: Optional[str] = ModelOpt,
    as_json: bool = JsonOpt,
):
    """Check a cartridge: parse, version, schema, checksum, shapes, model and fingerprint.

    Exits 0 only if every check passes, 7 if any fails."""
    from . import engine

    checks, probed = engine.verify(cartridge, model=None if no_model else (model or ""), source=source, probe=probe)
    ok = all(c.ok for c in checks)
    if as_json:
        out.print_json(json.dumps({"ok": ok, "checks": [c.__dict__ for c in checks], "probe": probed}))
    else:
        for c in checks:
            mark = {True: "[green]ok[/]  ", False: "[red]FAIL[/]", None: "[dim]skip[/]"}[c.ok]
            out.print(f"{mark} {c.name:<12} {c.detail}", highlight=False)
    if not ok:
        failed = next(c for c in checks if c.ok is False)
        raise VerifyFailed(f"check '{failed.name}' failed: {failed.detail}")


@app.command("eval")
@_errors
def eval_cmd(
    data: Path = typer.Argument(..., help="JSONL dataset: {id, title, context, questions: [{q, answers}]} per line."),
    ratio: Optional[list[float]] = typer.Option(None, "--ratio", help="Compression ratio; repeat for several."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N documents."),
    questions: Optional[int] = typer.Option(None, help="At most N questions per document."),
    steps: Optional[int] = typer.Option(None, help="Compile steps per segment (default: compile default)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML with [eval] and [compile] tables."),
    out_dir: Path = typer.Option(Path("eval-out"), "--out", help="Directory for report.md, results.json, plot."),
    model: Optional[str] = ModelOpt,
    as_json: bool = JsonOpt,
):
    """Measure cartridge quality and cost against full / none / truncate baselines.

    Finished documents are kept in --out; re-running resumes where an interrupted run stopped."""
    from dataclasses import replace

    from . import engine
    from .report import cost_table, score_table

    settings = engine.load_eval_config(config)
    if ratio:
        settings.ratios = list(ratio)
    if limit is not None:
        settings.limit = limit
    if questions is not None:
        settings.questions_per_doc = questions
    if steps is not None:
        settings.compile = replace(settings.compile, steps=steps)
    with EvalProgress(quiet=as_json or not err.is_terminal) as progress:
        result = engine.run_eval(data, settings, out_dir, model=model, progress=progress)
    if as_json:
        out.print_json(json.dumps(result))
        return
    from rich.markdown import Markdown

    out.print(Markdown(score_table(result["summary"]) + "\n\n" + cost_table(result["summary"])))
    out.print(f"report: {out_dir / 'report.md'}")


class EvalProgress(CompileProgress):
    """One bar across documents; the step bar of the current compile below it."""

    def __enter__(self):
        super().__enter__()
        self.docs = self.bar.add_task("documents", total=None, losses="")
        return self

    def doc(self, index: int, total: int, row: dict, cached: bool):
        self.bar.update(self.docs, total=total, completed=index, description=f"doc {row['id']}")
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None

    def step(self, step: int, total: int, metrics: dict):
        if self.task is None or step == 1:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task("compiling", total=total, losses="")
        super().step(step, total, metrics)


def main():
    app()

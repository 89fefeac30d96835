"""The commands on documents and cartridges: compile, ask, chat, inspect, verify."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..config import AskConfig, CompileConfig, ReadConfig
from ..errors import UsageError, VerifyFailed
from .app import (AnswerFormatOpt, BudgetOpt, ContextOpt, FloorOpt, DeviceOpt, DtypeOpt, ForceReadOpt, JsonOpt, MaxTokensOpt, ModelOpt,
                  PrefixFileOpt, PrefixOpt, ReadRatioOpt, ReencodeOpt, RepairOpt, SelectorOpt, ShowPagesOpt,
                  TemperatureOpt, ThreadsOpt,
                  _errors, _progress, _run, app, err, out)
from .render import clean, compiler_rows, inspect_rows, markup_safe, prefix_rows, print_json, print_json_line


# Long only in its signature: every flag is a typed parameter with its help (litgpt's way);
# the body hands the settings to the API and renders what comes back.
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
    index: Optional[bool] = typer.Option(None, "--index/--no-index",
                                         help="Also keep the document's own KV in pages that each question "
                                              "chooses from at ask time (an indexed cartridge)."),
    gist: Optional[bool] = typer.Option(None, "--gist/--no-gist",
                                        help="With --index: keep the compiled buffer beside the pages, read by "
                                             "every question."),
    pages: Optional[str] = typer.Option(None, "--pages", help="With --index: sentence (default) | fixed pages."),
    page_tokens: Optional[int] = typer.Option(None, "--page-tokens", help="With --pages fixed: tokens a page."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help="How keys and values are stored: float32 | "
                                                                    "bfloat16 | float16 | int8 | int4 (default: "
                                                                    "the compute dtype)."),
    key_summaries: Optional[bool] = typer.Option(None, "--key-summaries/--no-key-summaries",
                                                 help="With --index: keep each page's mean key, for ask "
                                                      "--selector attention (about 3% more bytes)."),
    window_tokens: Optional[int] = typer.Option(None, "--window-tokens",
                                                help="With --index: encode the document in windows of this many "
                                                     "positions (default 512; at most the model's window)."),
    window_mode: Optional[str] = typer.Option(None, "--window-mode", help="With --index: each later window re-reads "
                                                                          "the tokens before it (overlap) or "
                                                                          "carries them as KV (prefix)."),
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
                    seed=seed, bias=bias, self_check=self_check, index=index, gist=gist, pages=pages,
                    page_tokens=page_tokens, kv_dtype=kv_dtype, window_tokens=window_tokens, window_mode=window_mode,
                    key_summaries=key_summaries)
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
    _render_compiled(result)


def _render_compiled(result) -> None:
    if result.index:
        i = result.index
        gist = f" and a {i['gist_entries']}-entry gist" if i["gist_entries"] else ""
        out.print(f"wrote {clean(result.path)}: indexed, {i['pages']:,} pages over {result.tokens:,} tokens{gist} "
                  f"({i['dtype']}, {i['bytes_per_token']:,.0f} bytes a token) in {result.seconds:.1f}s; a question "
                  f"reads {i['budget']:,} entries of pages by default{' beside the gist' if gist else ''}",
                  markup=False)
        return
    last = result.metrics[-1] if result.metrics else {}
    losses = ""
    if "final_recon" in last:
        kl = f", kl {last['final_kl']:.3f}" if "final_kl" in last else ""
        losses = f"; final recon {last['final_recon']:.3f}{kl}"
    method = result.compiler.get("name", "?") + (f" + {last.get('steps')} steps" if result.compiler.get("name")
                                                  == "pretrained" else "")
    check = result.self_check_seconds
    seconds = f"{result.seconds:.1f}s" + (f" (and {check:.1f}s of self-check)" if check else "")
    out.print(f"wrote {clean(result.path)}: {result.slots} slots from {result.tokens} tokens "
              f"({result.segments} segment{'s' if result.segments != 1 else ''}) in {seconds} "
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
    budget: Optional[int] = BudgetOpt,
    ratio: Optional[float] = ReadRatioOpt,
    selector: str = SelectorOpt,
    repair: int = RepairOpt,
    reencode: int = ReencodeOpt,
    floor: int = FloorOpt,
    answer_format: str = AnswerFormatOpt,
    prefix: bool = PrefixOpt,
    prefix_file: Optional[Path] = PrefixFileOpt,
    show_pages: bool = ShowPagesOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceReadOpt,
    as_json: bool = JsonOpt,
):
    """Answer QUESTION from cartridges (or from --context FILE, or from nothing).

    An indexed cartridge (`compile --index`) is read page by page: each question reads the
    pages it picks (--selector) up to --budget entries, and `--show-pages` shows which."""
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
    read = ReadConfig(budget=budget, ratio=ratio, selector=selector, repair=repair, reencode=reencode, floor=floor,
                      answer_format=answer_format, prefix=prefix, prefix_file=str(prefix_file) if prefix_file else None)
    reader = api.Reader([Path(c) for c in cartridges], run=_run(model, device, threads, dtype), context=context,
                        force=force, read=read)
    reader.check(asked, **vars(cfg))  # every question, before the first answer is printed
    if questions is not None:
        for a in reader.ask_many(asked, **vars(cfg)):  # questions that read the same pages are decoded together
            print_json_line(_answer_json(a, reader.mode))
        return
    stream = None if as_json else (lambda piece: out.print(clean(piece), end="", markup=False, highlight=False))
    result = reader.ask(asked[0], on_text=stream, **vars(cfg))
    if as_json:
        print_json(_answer_json(result, reader.mode))
        return
    out.print()
    if result.pages == []:
        from ..runtime.reading import NO_PAGES

        err.print(f"lcc: {NO_PAGES}", markup=False)
    elif show_pages:
        _print_pages(result.pages)


@app.command()
@_errors
def chat(
    cartridges: Optional[list[Path]] = typer.Argument(None, help="Cartridges to read from (composed)."),
    context: Optional[Path] = ContextOpt,
    max_new_tokens: int = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    budget: Optional[int] = BudgetOpt,
    ratio: Optional[float] = ReadRatioOpt,
    selector: str = SelectorOpt,
    repair: int = RepairOpt,
    reencode: int = ReencodeOpt,
    floor: int = FloorOpt,
    answer_format: str = AnswerFormatOpt,
    prefix: bool = PrefixOpt,
    prefix_file: Optional[Path] = PrefixFileOpt,
    show_pages: bool = ShowPagesOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceReadOpt,
):
    """Ask questions one after another with the model kept loaded: arrow keys for history,
    Ctrl-C cancels an answer, Ctrl-D leaves, /help lists /pages and /budget N. Each question
    is answered on its own (from its own pages, for indexed cartridges): earlier turns are not
    remembered."""
    from .. import api
    from .chat import repl

    cfg = AskConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    read = ReadConfig(budget=budget, ratio=ratio, selector=selector, repair=repair, reencode=reencode, floor=floor,
                      answer_format=answer_format, prefix=prefix, prefix_file=str(prefix_file) if prefix_file else None)
    err.print("loading…", highlight=False)
    reader = api.Reader(list(cartridges or []), run=_run(model, device, threads, dtype), context=context, force=force,
                        read=read)
    repl(reader, cfg, out, err, show_pages, _print_pages)


def _answer_json(a, mode: str) -> dict:
    return a.to_dict(mode)


def _print_pages(pages: list[dict] | None) -> None:
    if pages is None:
        err.print("lcc: --show-pages: these cartridges are not indexed (every entry was read)", markup=False)
        return
    for p in pages:
        out.print(f"[{clean(p.cartridge)} p{p.page}, {_entries(p)}] {clean(p.text)}",
                  markup=False, highlight=False)


@app.command("index")
@_errors
def index_cmd(
    folder: Path = typer.Argument(..., metavar="DIR", help="A folder of indexed cartridges (a library)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Start from an empty index instead of updating it "
                                                           "(and replace a damaged index, or a link in its place)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
):
    """Index a library: every indexed cartridge in DIR, searchable from DIR/.lcc-index.sqlite.

    Updates incrementally (cartridges added, replaced or removed since, known by their
    checksum); each new one is checked against the model as `ask` checks it, and one that
    cannot be read is skipped. `lcc compile ... --index -o DIR/` and `lcc ask DIR` keep the
    index up to date themselves. Then `lcc ask DIR "question"` asks the whole folder."""
    from .. import api

    with _progress(as_json) as progress:
        result = api.index_folder(folder, rebuild=rebuild, progress=progress, run=_run(model, device, threads))
    if as_json:
        print_json(result.to_dict())
        return
    out.print(f"indexed {clean(folder)}: {result.cartridges:,} cartridges, {result.pages:,} pages "
              f"({len(result.added)} added, {len(result.replaced)} replaced, {len(result.removed)} removed) "
              f"in {result.seconds:.1f}s", markup=False)
    for name, reason in sorted(result.unreadable.items()):
        err.print(f"lcc: skipped {clean(name)}: {clean(reason)}", markup=False)


@app.command()
@_errors
def inspect(cartridge: Path = typer.Argument(..., help="A .lcc cartridge, a compiler file or a reading prefix."),
            as_json: bool = JsonOpt):
    """Show what is inside a cartridge (model, buffer layout, source, settings, metrics) or a
    pretrained compiler file (model, LoRA, training)."""
    from .. import api

    info = api.inspect(cartridge)
    if as_json:
        print_json(info)
        return
    table = Table(title=markup_safe(cartridge), show_header=False, title_justify="left")
    rows = {"compiler": compiler_rows, "prefix": prefix_rows}.get(info["kind"], inspect_rows)(info)
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


def _entries(page) -> str:
    total, n, done = page.page_entries, page.entries, page.reencoded
    shown = f"{n} entries" if n >= total else f"first {n} of {total} entries"
    return shown + (", re-encoded" if done >= n else f", first {done} re-encoded" if done else "")

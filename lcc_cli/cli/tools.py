"""The other commands: eval, export, import, train-compiler, serve."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import PrefixConfig, TrainConfig
from ..errors import UsageError
from .app import (DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, ThreadsOpt, _errors, _progress, _run, app, err, out)
from .render import clean, print_json


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


@app.command("train-prefix")
@_errors
def train_prefix_cmd(
    data: list[Path] = typer.Argument(..., help="JSONL question data: {context, questions: [{q, answers}]} per line "
                                                "(SQuAD train: `make data`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Reading-prefix file to write."),
    steps: int = typer.Option(PrefixConfig.steps, help="Optimiser steps."),
    lr: float = typer.Option(PrefixConfig.lr, help="Peak learning rate."),
    kl_weight: float = typer.Option(PrefixConfig.kl_weight, help="Weight of the KL term on generic instructions."),
    kl_rows: int = typer.Option(PrefixConfig.kl_rows, help="Generic-instruction rows a step."),
    kl_document_share: float = typer.Option(PrefixConfig.kl_document_share,
                                            help="Share of those rows that read a document."),
    warmup: int = typer.Option(PrefixConfig.warmup, help="Steps of learning-rate warm-up."),
    start_from: Optional[Path] = typer.Option(None, "--start-from", metavar="PREFIX",
                                              help="Start from a trained prefix (a second phase with other "
                                                   "weights) instead of the instruction's KV."),
    validate_every: int = typer.Option(PrefixConfig.validate_every, help="Steps between held-out validations."),
    seed: int = typer.Option(PrefixConfig.seed, help="Random seed: a run is deterministic for a seed."),
    stop_after: Optional[int] = typer.Option(None, help="Stop after this many steps (resume later)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT.ckpt/."),
    force: bool = typer.Option(False, "--force", "-f", help="Start over, replacing OUTPUT and its checkpoints."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
):
    """Train the reading prefix for the base model: KV entries read before every context turn
    that make the frozen model answer with the document's own short phrase.

    Trained on the reads `lcc ask` makes (paragraphs at 8x, long documents at 16x) with the
    gold answers, and KL to the plain model on generic instructions; whole articles are held
    out to choose the kept step. Checkpoints in OUTPUT.ckpt/ allow --resume."""
    from .. import api

    cfg = PrefixConfig(steps=steps, lr=lr, kl_weight=kl_weight, kl_rows=kl_rows, kl_document_share=kl_document_share,
                       warmup=warmup, start_from=str(start_from) if start_from else None,
                       validate_every=validate_every, seed=seed)
    if stop_after is not None and stop_after < 1:
        raise UsageError(f"stop_after must be at least 1 (got {stop_after})", field="stop_after")
    with _progress(as_json) as progress:
        result = api.train_prefix(data, output, cfg, run=_run(model, device, threads, dtype), force=force,
                                  resume=resume, stop_after=stop_after, progress=progress)
    if as_json:
        print_json({k: v for k, v in vars(result).items() if k != "history"})
        return
    done = "wrote " + clean(result.path) if Path(result.path).is_file() else "stopped"
    out.print(f"{done}: {result.steps} steps in {result.seconds:.0f}s; kept step {result.selected_step}", markup=False)


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
    cache_mb: int = typer.Option(1024, "--cache-mb", metavar="MB",
                                 help="RAM for decoded cartridges kept between requests (least recently used out "
                                      "first)."),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", metavar="NAME",
                                                   help="Also answer requests whose Host is NAME (any port) or "
                                                        "NAME:PORT, e.g. behind a proxy; repeatable."),
    allow_origin: Optional[list[str]] = typer.Option(None, "--allow-origin", metavar="ORIGIN",
                                                     help="Let web pages from ORIGIN (https://host[:port], or '*') "
                                                          "call the API (CORS); repeatable."),
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
    from ..serve.guard import Access

    for name, value, low in (("port", port, 0), ("max_queue", max_queue, 1), ("max_batch", max_batch, 1),
                             ("max_tokens", max_tokens, 1), ("cache_mb", cache_mb, 0)):
        if value < low or (name == "port" and value > 65535):
            raise UsageError(f"{name} must be {'a port number' if name == 'port' else f'at least {low}'} "
                             f"(got {value})", field=name)
    limits = Limits(max_queue=max_queue, max_batch=max_batch, max_tokens=max_tokens,
                    default_max_tokens=min(256, max_tokens), cache_bytes=cache_mb << 20)
    access = Access(allow_hosts=list(allow_host or []), allow_origins=list(allow_origin or []))
    with _progress(False) as progress:
        api.serve(paths, host, port, limits, api_key, run=_run(model, device, threads, dtype), progress=progress,
                  warn=lambda text: err.print(f"lcc: warning: {clean(text)}", markup=False), access=access)

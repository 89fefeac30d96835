"""The workflows behind each command, as plain functions: compile a file into a cartridge,
answer a question, verify a file. The CLI renders what these return; the Python API
(`lcc_cli.compile_file`, `lcc_cli.ask`) is these same functions.
"""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .cartridge import check_model, check_writable, combine, from_segments, load_cartridge, save_cartridge
from .config import AskConfig, CompileConfig, cpu_count
from .errors import Interrupted, OutputExistsError, UsageError
from .ingest import DEFAULT_MAX_BYTES, read_document


def validate_compile_config(cfg: CompileConfig) -> None:
    """Reject settings that cannot work before anything slow happens."""
    if cfg.ratio < 1:
        raise UsageError(f"--ratio must be at least 1 (got {cfg.ratio:g})")
    if cfg.steps < 0:
        raise UsageError(f"--steps must be 0 or more (got {cfg.steps})")
    if cfg.lr <= 0:
        raise UsageError(f"--lr must be positive (got {cfg.lr:g})")
    if cfg.lora_rank < 1:
        raise UsageError(f"--lora-rank must be at least 1 (got {cfg.lora_rank})")
    if cfg.teacher not in ("context", "plain"):
        raise UsageError(f"--teacher must be 'context' or 'plain' (got {cfg.teacher!r})")


def compile_file(source: Path, output: Path, cfg: CompileConfig, model: str | None = None, force: bool = False,
                 max_bytes: int = DEFAULT_MAX_BYTES, progress=None, resume: bool = False, workers: int = 1) -> dict:
    """Read, compile and write a cartridge. Finished segments are checkpointed to
    OUTPUT.partial; on Ctrl-C they stay there for `resume`, and OUTPUT is never written
    half-way. `progress` (optional) gets status / segment / step calls."""
    from .build import compile_document, partial_path, read_partial, write_partial
    from .models import load_model

    validate_compile_config(cfg)
    if workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {workers})")
    output = Path(output)
    check_writable(output, force)  # fail now, not after minutes of compiling
    partial = partial_path(output)
    if partial.exists() and not (resume or force):
        raise OutputExistsError(f"an unfinished compile exists: {partial}",
                                hint="pass --resume to continue it or --force to start over")
    if partial.exists() and force and not resume:
        partial.unlink()  # starting over: its segments must not be mistaken for this run's
    doc = read_document(source, max_bytes=max_bytes)
    if progress:
        progress.status("loading model…")
    loaded = load_model(model)
    done = read_partial(partial, loaded, doc, cfg) if resume and partial.exists() else {}
    if done and progress:
        progress.status(f"resuming: {len(done)} segment(s) already compiled in {partial.name}")
    try:
        segments = compile_document(
            loaded, doc, cfg, done=done, workers=workers, model=model,
            on_segment=(lambda i, n, t: progress.segment(i, n, t, cfg.steps)) if progress else None,
            on_step=progress.step if progress else None,
            on_segment_done=lambda d: write_partial(partial, loaded, d, doc, cfg))
    except KeyboardInterrupt:
        raise Interrupted("interrupted" + (f"; finished segments are kept in {partial}" if partial.exists() else ""),
                          hint="rerun with --resume to continue" if partial.exists() else None) from None
    cart = from_segments(loaded, segments, doc, cfg.to_dict(), __version__)
    save_cartridge(cart, output, force=True)
    partial.unlink(missing_ok=True)
    return {"path": str(output), "slots": cart.slots, "tokens": cart.manifest["source"]["token_count"],
            "segments": len(segments), "metrics": cart.manifest["metrics"], "model": loaded.model_id}


def ask(question: str, cartridges: list[Path], context: Path | None = None, cfg: AskConfig | None = None,
        model: str | None = None, force: bool = False, on_text=None) -> dict:
    """Answer from cartridges (composed), from a document in the prompt, or from nothing."""
    from .models import load_model
    from .reader import answer_from_kv, answer_from_text

    carts = [load_cartridge(p) for p in cartridges]  # format errors before the slow model load
    document = read_document(context).text if context else None
    loaded = load_model(model)
    for path, cart in zip(cartridges, carts):
        check_model(cart, loaded, path.name, force=force)
    if carts:
        kv, first = combine(carts)
        kv = [(k.to(loaded.model.device), v.to(loaded.model.device)) for k, v in kv]
        result = answer_from_kv(loaded, kv, first, question, cfg, on_text)
        mode = "cartridge"
    else:
        result = answer_from_text(loaded, question, document, cfg, on_text)
        mode = "context" if document is not None else "none"
    return {"answer": result.text, "mode": mode, "question": question,
            "seconds_to_first_token": round(result.seconds_to_first_token, 4),
            "seconds_total": round(result.seconds_total, 4), "kv_positions": result.kv_positions,
            "prompt_tokens": result.prompt_tokens, "new_tokens": len(result.token_ids)}


def verify(path: Path, model: str | None = None, source: Path | None = None, probe: bool = False):
    """Run `verify.verify_file`; `model=None` skips the model checks, "" means the default.
    Returns (checks, probe result or None)."""
    from .verify import verify_file

    if probe and (source is None or model is None):
        raise UsageError("--probe needs --source and the model (not --no-model)")
    loaded = None
    if model is not None:
        from .models import load_model

        loaded = load_model(model or None)
    return verify_file(path, loaded, source, probe=probe)


def load_eval_config(path: Path | None):
    """Read an eval TOML: an [eval] table (ratios, limit, questions_per_doc, max_new_tokens,
    general_probes) and a [compile] table of CompileConfig fields."""
    from dataclasses import fields

    from .evaluate import EvalSettings

    settings = EvalSettings()
    if path is None:
        return settings
    import tomli

    try:
        data = tomli.loads(Path(path).read_text())
    except (OSError, tomli.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config {path}: {exc}") from exc
    known = {f.name for f in fields(CompileConfig)}
    comp = data.get("compile", {})
    unknown = set(comp) - known
    if unknown:
        raise UsageError(f"unknown [compile] settings in {path}: {', '.join(sorted(unknown))}")
    if "lora_targets" in comp:
        comp["lora_targets"] = tuple(comp["lora_targets"])
    defaults = CompileConfig()
    for key, value in comp.items():
        want = type(getattr(defaults, key))
        if not isinstance(value, want) and not (want is float and isinstance(value, int)):
            raise UsageError(f"[compile] {key} in {path} must be {want.__name__}, not {value!r}")
    settings.compile = CompileConfig(**comp)
    ev = data.get("eval", {})
    try:
        settings.ratios = [float(r) for r in ev.get("ratios", settings.ratios)]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"[eval] ratios in {path} must be a list of numbers") from exc
    settings.limit = ev.get("limit", settings.limit)
    settings.questions_per_doc = ev.get("questions_per_doc", settings.questions_per_doc)
    settings.general_probes = ev.get("general_probes", settings.general_probes)
    settings.compose = ev.get("compose", settings.compose)
    settings.ask.max_new_tokens = ev.get("max_new_tokens", settings.ask.max_new_tokens)
    settings.documents = ev.get("documents", settings.documents)
    return settings


def run_eval(data: Path, settings, out: Path, model: str | None = None, progress=None) -> dict:
    """`lcc eval`: evaluate, then write report.md, results.json and the plot into `out`."""
    import platform
    from datetime import datetime, timezone

    from .evaluate import evaluate, load_dataset
    from .models import load_model
    from .report import write_report

    for ratio in settings.ratios:
        validate_compile_config(CompileConfig(**{**settings.compile.to_dict(), "ratio": ratio,
                                                 "lora_targets": settings.compile.lora_targets}))
    rows = load_dataset(Path(data))
    if settings.documents:
        rows = [r for r in rows if r["id"] in set(settings.documents)]
    rows = rows[: settings.limit] if settings.limit else rows
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror}") from exc
    loaded = load_model(model)
    results = evaluate(loaded, rows, settings, out, on_doc=progress.doc if progress else None,
                       on_step=progress.step if progress else None)
    facts = loaded.facts
    meta = {"model": loaded.model_id, "fingerprint": loaded.fingerprint, "data": Path(data).name,
            "compile": settings.compile.to_dict(), "ratios": settings.ratios, "lcc_version": __version__,
            "ask": vars(settings.ask), "machine": f"{platform.machine()}, {cpu_count()} CPU cores, "
                                                  f"{'cuda' if loaded.model.device.type == 'cuda' else 'no GPU'}",
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kv_bytes_per_position": 2 * facts["num_layers"] * facts["num_kv_heads"] * facts["head_dim"]
            * next(loaded.model.parameters()).element_size()}
    summary = write_report(results, out, meta)
    return {"out": str(out), "summary": summary}

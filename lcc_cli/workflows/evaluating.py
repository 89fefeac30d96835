"""`lcc eval`: quality and cost against the baselines, written as a report."""

from __future__ import annotations

from pathlib import Path

from ..compile.base import CompilerSpec, build_compiler
from ..compile.choice import settle
from ..config import CompileConfig, EvalSettings, ReadConfig, RunOptions
from ..errors import UsageError
from ..progress import NO_PROGRESS, Progress
from .common import executor, governed, load

def eval_methods(loaded, settings: EvalSettings, compiler=None) -> list:
    """The methods an eval compares (eval/run.py's Method), compilers resolved for this model."""
    from ..config import method_overrides
    from ..eval.run import Method

    if not settings.methods:
        # [compile] settings over the method's preset; a CompileConfig built in Python as it is
        explicit = settings.compile_table or (None if settings.compile == CompileConfig() else settings.compile)
        spec, cfg = settle(loaded, compiler, explicit)
        return [Method("cartridge", spec, {k: v for k, v in cfg.to_dict().items() if k != "ratio"})]
    out = []
    for m in settings.methods:
        spec, cfg = settle(loaded, m.get("compiler", "auto"), {**settings.compile_table, **method_overrides(m)},
                           m.get("quality", "balanced"))
        read = dict(m.get("read") or {})
        ReadConfig.from_dict(read, where=f"[[eval.methods]] {m['label']!r} read setting")  # checked now
        out.append(Method(m["label"], spec, {k: v for k, v in cfg.to_dict().items() if k != "ratio"},
                          m.get("stride", 1), read))
    return out


def run_eval(data: Path, settings: EvalSettings, out: Path, compiler: CompilerSpec | str | None = "auto",
             run: RunOptions | None = None, progress: Progress = NO_PROGRESS) -> dict:
    """`lcc eval`: evaluate, then write report.md, results.json and the plot into `out`."""
    import platform
    from datetime import datetime, timezone

    from .._version import __version__
    from ..config import cpu_count
    from ..eval.data import load_dataset
    from ..eval.report import write_report
    from ..eval.run import evaluate

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
        from ..compile.document import DocumentTask, compile_all, text_segments

        _, cfg = settle(loaded, method.spec, method.config(ratio))  # am sizes its segments per ratio
        if method.spec not in built:
            built[method.spec] = build_compiler(method.spec, loaded)
        compiler = built[method.spec]
        task = DocumentTask(doc, None, text_segments(loaded, doc.text, cfg))
        compile_all(loaded, [task], cfg, method.spec, compiler.describe(), executor(RunOptions(), loaded, compiler),
                    progress)
        return task.cartridge

    results = evaluate(loaded, rows, settings, out, methods, compile_fn, governed(run, progress))
    from ..runtime.prefix import reading_prefix
    from ..runtime.prompts import prompt_record

    prefix = reading_prefix(loaded)
    facts = loaded.facts
    meta = {"model": loaded.model_id, "fingerprint": loaded.fingerprint, "data": Path(data).name,
            "methods": [{"label": m.label, "compiler": [m.spec.name, m.spec.path and Path(m.spec.path).name],
                         "settings": m.settings, "stride": m.stride} for m in methods],
            "ratios": settings.ratios, "lcc_version": __version__, "ask": vars(settings.ask),
            "prompt": prompt_record(), "reading_prefix": prefix.name if prefix is not None else None,
            "machine": f"{platform.machine()}, {cpu_count()} CPU cores, "
                       f"{'cuda' if loaded.device.type == 'cuda' else 'no GPU'}",
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kv_bytes_per_position": 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim
            * loaded.model.dtype.itemsize}
    summary = write_report(results, out, meta)
    return {"out": str(out), "summary": summary}



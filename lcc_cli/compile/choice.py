"""Which method a compile uses, and with which settings: `--compiler` and `--quality`
resolved through the registry (base.py), fitted to the model and checked before any work.

`auto` follows the bench's table (auto.py); every other word is a registered method's.
"""

from __future__ import annotations

from pathlib import Path

from ..config import CompileConfig
from ..errors import UsageError
from .auto import choose
from .base import QUALITIES, CompilerSpec, method, method_of, registered


def resolve(loaded, choice: str | None, quality: str = "balanced") -> CompilerSpec:
    """--compiler auto | a method's word (none, am, truncate, pretrained...) | a compiler file.
    `auto` follows the bench's table (compile/auto.py)."""
    choice = choice or "auto"
    if choice == "auto":
        return choose(loaded, quality)[0]
    for m in registered():
        if choice in m.words:
            return m.resolve(loaded, choice) if m.resolve else CompilerSpec(m.name)
    files = [m for m in registered() if m.takes_files]
    if not Path(choice).is_file() or not files:
        words = ["auto"] + [w for m in registered() for w in m.words]
        raise UsageError(f"compiler must be {', '.join(words)} or a compiler file (no such file: {choice})",
                         field="compiler")
    return files[0].resolve(loaded, choice)


def compile_config(name: str, quality: str = "balanced", **overrides) -> CompileConfig:
    """The CompileConfig for a method at a quality preset, with explicit settings on top."""
    if quality not in QUALITIES:
        raise UsageError(f"quality must be fast, balanced or best (got {quality!r})", field="quality")
    preset = method(name).presets[quality]
    return CompileConfig.from_dict({**preset, **{k: v for k, v in overrides.items() if v is not None}})


def settle(loaded, compiler, cfg, quality: str = "balanced") -> tuple[CompilerSpec, CompileConfig]:
    """The compiler to use and the settings to use it with: a CompileConfig is taken as it
    is; a dict (or None) of settings goes on top of the resolved method's quality preset; then
    the method fits them to the model's window and checks its requirements."""
    if compiler in (None, "auto"):
        spec, quality, chosen = choose(loaded, quality)
        if not isinstance(cfg, CompileConfig):
            cfg = {**chosen, **{k: v for k, v in (cfg or {}).items() if v is not None}}
    else:
        spec = compiler if isinstance(compiler, CompilerSpec) else resolve(loaded, compiler)
    m = method_of(spec)
    if not isinstance(cfg, CompileConfig):
        cfg = compile_config(spec.name, quality, **(cfg or {}))
    cfg = _indexed_or_not(cfg, compiler in (None, "auto"))
    if m.fit is not None:
        cfg = m.fit(cfg, loaded.facts.max_positions)
    if m.check is not None:
        m.check(loaded, cfg)
    return spec, cfg


def _indexed_or_not(cfg: CompileConfig, auto: bool) -> CompileConfig:
    """`index` and `gist` left open (None) are decided here: with `--compiler auto`, an indexed
    cartridge of pages alone (measured best: README, bench/results/indexed-*); with a compiler
    named on purpose, that compiler's buffer (and, with --index, that buffer as the gist)."""
    from dataclasses import replace

    from .document import INDEX_STORAGE

    index = auto if cfg.index is None else cfg.index
    gist = (not auto) if cfg.gist is None else cfg.gist
    kv_dtype = cfg.kv_dtype or (INDEX_STORAGE if index else None)  # the manifest records what was stored
    return replace(cfg, index=index, gist=gist, kv_dtype=kv_dtype)

"""The segment-compiler protocol, its registry, and what a compile of one segment returns.

A segment compiler turns one `TextSegment` into a `Buffer` normalised to positions
0..K-1 (a question read after it starts at K). The compile path (document.py) never knows
which method ran: it asks the registry for a compiler by name, hands it segments, and
assembles what comes back. Adding a method means writing one class, registering it with what lcc needs to know about
it (its --quality presets, the --compiler words that pick it, how it fits the model's window,
what it requires), and listing its module in methods.py:

    @register("mine", presets={"fast": {"steps": 0}, "balanced": {...}, "best": {...}})
    def _build(spec, loaded):
        return MyCompiler(loaded)

The registry imports no method: methods.py imports them all, once, when a method is first
looked up (as peft's tuners/__init__.py does).

`CompilerSpec` is the picklable recipe (name and, for a pretrained compiler, its file) that
executors send to worker processes and Ray actors, which build their own instance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..buffer import Buffer
from ..config import CompileConfig
from ..errors import UsageError
from ..ingest import TextSegment
from ..progress import Progress


@dataclass
class SegmentResult:
    buffer: Buffer  # at positions 0..K-1
    token_count: int  # tokens of the context turn the buffer replaces
    metrics: dict = field(default_factory=dict)
    sink: bool = False  # the first entry is the context's first token, kept as an attention sink


class SegmentCompiler(Protocol):
    name: str

    def describe(self) -> dict:
        """What the manifest records about the method (name, file hash, steps...)."""

    def compile(self, segment: TextSegment, cfg: CompileConfig, progress: Progress) -> SegmentResult:
        """Compile one segment; must leave the base model exactly as it found it."""


@dataclass(frozen=True)
class CompilerSpec:
    name: str = "optimise"
    path: str | None = None  # a pretrained compiler's file
    plugin: str | None = None  # a module to import first: it registers a compiler defined outside lcc


QUALITIES = ("fast", "balanced", "best")


@dataclass(frozen=True)
class Method:
    """Everything lcc knows about a compile method, declared where the method registers.

    `presets`: the settings behind --quality (fast, balanced, best). `words`: the --compiler
    values that pick it. `resolve(loaded, word_or_path)`: the spec for those words (default:
    the plain spec), so that a method with a file can find and check it. `fit(cfg, window)`:
    the settings adjusted to the model's window. `check(loaded, cfg)`: requirements, raised
    as UsageError before any work."""

    name: str
    build: Callable
    presets: dict = field(default_factory=dict)
    words: tuple[str, ...] = ()
    resolve: Callable | None = None
    fit: Callable | None = None
    check: Callable | None = None
    takes_files: bool = False  # --compiler PATH means this method


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, presets: dict | None = None, words: tuple[str, ...] = (), resolve=None, fit=None,
             check=None, takes_files: bool = False):
    """Decorate a method's factory `(spec, loaded) -> SegmentCompiler` to register it."""
    def wrap(factory: Callable) -> Callable:
        _REGISTRY[name] = Method(name, factory, presets or {q: {} for q in QUALITIES}, words or (name,), resolve,
                                 fit, check, takes_files)
        return factory

    return wrap


def _methods() -> dict[str, Method]:
    from . import methods  # noqa: F401  (the listing: importing it registers every method)

    return _REGISTRY


def registered() -> list[Method]:
    return list(_methods().values())


def method(name: str) -> Method:
    methods = _methods()
    if name not in methods:
        raise UsageError(f"unknown compiler {name!r} (known: {', '.join(sorted(methods))})", field="compiler")
    return methods[name]


def method_of(spec: CompilerSpec) -> Method:
    """The spec's method; a plugin module named by the spec is imported first (it registers
    a method defined outside lcc)."""
    if spec.plugin:
        import importlib

        importlib.import_module(spec.plugin)
    return method(spec.name)


def build_compiler(spec: CompilerSpec, loaded) -> SegmentCompiler:
    return method_of(spec).build(spec, loaded)


def refuse_bias(cfg: CompileConfig, who: str) -> None:
    """--bias where the method has no biases to give: refused, so that no manifest records
    biases that were never made."""
    if cfg.bias:
        raise UsageError(f"bias does nothing here: {who} makes no attention biases", field="bias",
                         hint="use --compiler am, or truncate with --steps N")


def slot_count(n_tokens: int, ratio: float) -> int:
    """K = ceil(n / ratio) buffer entries for a context turn of n tokens."""
    if ratio > n_tokens:
        raise UsageError(f"ratio {ratio:g} is larger than the segment ({n_tokens} tokens)",
                         hint="use a smaller ratio or a longer document", field="ratio")
    return math.ceil(n_tokens / ratio)

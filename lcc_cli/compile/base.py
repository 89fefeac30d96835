"""The segment-compiler protocol, its registry, and what a compile of one segment returns.

A segment compiler turns one `TextSegment` into a `Buffer` normalised to positions
0..K-1 (a question read after it starts at K). The compile path (document.py) never knows
which method ran: it asks the registry for a compiler by name, hands it segments, and
assembles what comes back. Adding a method means writing one class and registering it:

    @register("mine")
    def _build(spec, loaded):
        return MyCompiler(loaded)

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


_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def wrap(factory: Callable) -> Callable:
        _REGISTRY[name] = factory
        return factory

    return wrap


def build_compiler(spec: CompilerSpec, loaded) -> SegmentCompiler:
    import importlib

    from . import am, optimise, pretrained, truncate  # noqa: F401  (they register themselves)

    if spec.plugin:
        importlib.import_module(spec.plugin)

    if spec.name not in _REGISTRY:
        raise UsageError(f"unknown compiler {spec.name!r} (known: {', '.join(sorted(_REGISTRY))})", field="compiler")
    return _REGISTRY[spec.name](spec, loaded)


def slot_count(n_tokens: int, ratio: float) -> int:
    """K = ceil(n / ratio) buffer entries for a context turn of n tokens."""
    if ratio > n_tokens:
        raise UsageError(f"ratio {ratio:g} is larger than the segment ({n_tokens} tokens)",
                         hint="use a smaller ratio or a longer document", field="ratio")
    return math.ceil(n_tokens / ratio)

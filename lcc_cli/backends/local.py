"""In-process executor: the driver's own loaded model compiles every unit, one at a time,
with step-by-step progress."""

from __future__ import annotations

from ..compile.base import build_compiler
from ..errors import LccError


class LocalExecutor:
    name = "local"

    def __init__(self, loaded):
        self.loaded = loaded

    def run(self, units, cfg, spec, sink, progress) -> None:
        compiler = build_compiler(spec, self.loaded)
        for unit in units:
            if not sink.wanted(unit):
                continue
            progress.note(f"{unit.name}: segment {unit.segment.index + 1}/{unit.of}")
            try:
                result = compiler.compile(unit.segment, cfg, progress)
            except (LccError, RuntimeError, ValueError, MemoryError) as exc:
                sink.failed(unit, exc)
                continue
            sink.done(unit, result)

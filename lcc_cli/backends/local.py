"""In-process executor: the driver's own loaded model compiles every unit, one at a time,
with step-by-step progress."""

from __future__ import annotations

from ..compile.base import build_compiler


class LocalExecutor:
    name = "local"

    def __init__(self, loaded, compiler=None):
        self.loaded, self.compiler = loaded, compiler

    def run(self, units, cfg, spec, sink, progress) -> None:
        compiler = self.compiler or build_compiler(spec, self.loaded)
        for unit in units:
            if not sink.wanted(unit):
                continue
            progress.note(f"{unit.name}: segment {unit.segment.index + 1}/{unit.of}")
            try:
                result = compiler.compile(unit.segment, cfg, progress)
            except Exception as exc:  # one unit's failure is its document's, not the batch's
                sink.failed(unit, exc)
                continue
            sink.done(unit, result)

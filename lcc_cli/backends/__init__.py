"""Executors: where segment compiles run. Each one takes the same list of units and streams
results back to the driver through a `ResultSink`; the driver alone writes files.

- `local`: in this process, with the model already loaded (the default);
- `processes`: N spawned worker processes, each loading the model once;
- `ray`: Ray actors on a local instance or a cluster (optional extra `lcc-cli[ray]`).

Adding an executor means one module with a class that has `run(units, cfg, spec, sink,
progress)`, and one line in `make_executor`.
"""

from __future__ import annotations

from typing import Protocol

from ..config import BACKENDS


class ResultSink(Protocol):
    def wanted(self, unit) -> bool:
        """False once the unit's document has failed: skip it."""

    def done(self, unit, result) -> None:
        """A unit finished; `result` is its SegmentResult."""

    def failed(self, unit, error: BaseException) -> None:
        """A unit failed for good (may raise to stop the whole run)."""


class Executor(Protocol):
    name: str

    def run(self, units: list, cfg, spec, sink: ResultSink, progress) -> None: ...


def make_executor(backend: str, loaded, *, model: str | None = None, device: str | None = None,
                  dtype: str | None = None, workers: int = 1, threads: int | None = None,
                  ray_address: str | None = None, compiler=None) -> Executor:
    """The executor for --backend (and --workers, --threads, --ray-address). `compiler`, if
    given, is the driver's already-built segment compiler, which the local executor reuses."""
    from ..errors import UsageError

    if backend == "local":
        from .local import LocalExecutor

        return LocalExecutor(loaded, compiler)
    if backend == "processes":
        from .processes import ProcessExecutor

        return ProcessExecutor(model=model, device=device, dtype=dtype, workers=workers, threads=threads)
    if backend == "ray":
        from .ray import RayExecutor

        return RayExecutor(model=model, device=device, dtype=dtype, workers=workers, threads=threads,
                           address=ray_address)
    raise UsageError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})", field="backend")

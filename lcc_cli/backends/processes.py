"""Worker-process executor: N spawned processes, each loading the model once and compiling
the units it is given. Results come back whole (no step-by-step progress).

Each worker pins its math threads (default: the cores divided among the workers), so that
workers do not fight for cores. A worker's floats match an in-process compile's bit for bit
only when both use the same thread count: the order of floating-point sums depends on it.
"""

from __future__ import annotations

from ..compile.base import build_compiler
from ..config import cpu_count
from ..errors import ModelError
from ..progress import NO_PROGRESS

_WORKER: dict = {}


def _init_worker(model, device, dtype, threads, spec) -> None:
    import signal

    from ..runtime.model import load_model, set_threads

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops the pool
    set_threads(threads)
    loaded = load_model(model, device=device, dtype=dtype)
    _WORKER["compiler"] = build_compiler(spec, loaded)


def _compile(unit, cfg):
    return _WORKER["compiler"].compile(unit.segment, cfg, NO_PROGRESS)


class ProcessExecutor:
    name = "processes"

    def __init__(self, model=None, device=None, dtype=None, workers: int = 2, threads: int | None = None):
        self.model, self.device, self.dtype, self.workers = model, device, dtype, max(1, workers)
        self.threads = threads or max(1, cpu_count() // self.workers)

    def run(self, units, cfg, spec, sink, progress) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        if not units:
            return
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(units)), mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.model, self.device, self.dtype, self.threads, spec))
        interrupted = False
        try:
            futures = {pool.submit(_compile, unit, cfg): unit for unit in units}
            for future in as_completed(futures):
                unit = futures[future]
                if not sink.wanted(unit):
                    continue
                try:
                    result = future.result()
                except BrokenProcessPool as exc:
                    raise ModelError("a worker process died (out of memory?)", hint="try fewer --workers") from exc
                except Exception as exc:  # the worker's own error, pickled back
                    sink.failed(unit, exc)
                    continue
                progress.note(f"{unit.name}: segment {unit.segment.index + 1}/{unit.of} done")
                sink.done(unit, result)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:  # on Ctrl-C stop the workers now; on an error, drop the queued segments
            if interrupted:
                for process in list(getattr(pool, "_processes", {}).values()):
                    process.terminate()
            pool.shutdown(wait=not interrupted, cancel_futures=True)

"""What every workflow shares: the model loaded for a run, the thread governor, the executor."""

from __future__ import annotations

from ..config import RunOptions
from ..progress import Progress


def load(run: RunOptions):
    """The base model, on the chosen device, with the chosen thread count."""
    from ..runtime.model import load_run

    return load_run(run)


def governed(run: RunOptions, progress: Progress) -> Progress:
    """Without --threads, the thread count follows the cores other programs leave free
    (runtime/threads.py); the long loops report progress, which is when it is re-checked."""
    if run.threads is not None or run.backend != "local":
        return progress
    from ..runtime.threads import AutoThreads

    return AutoThreads(progress)


def executor(run: RunOptions, loaded, compiler=None):
    """The executor for the run's backend (compiler: the driver's own, reused in-process)."""
    from ..backends import make_executor

    return make_executor(run.backend, loaded, model=run.model, device=run.device, dtype=run.dtype,
                         workers=run.workers, threads=run.threads, ray_address=run.ray_address, compiler=compiler)



"""Ray executor: actors that each load the model once and compile many units; results stream
back to the driver as they finish, and the driver alone writes files.

A local Ray instance by default, or a cluster with --ray-address (or RAY_ADDRESS); the
extra is `pip install 'lcc-cli[ray]'`. Each actor asks for `threads` CPUs (and one GPU
when the cluster has GPUs and the device is not the CPU). Retries are done here, not by
Ray, so that they can be reported: when an actor's process dies mid-unit, the actor is
replaced and the unit sent again (at most MAX_ATTEMPTS times). A unit whose compile raises
an ordinary error fails alone; an actor that cannot even load the model stops the run.
"""

from __future__ import annotations

import logging
import os

from ..config import cpu_count
from ..errors import ModelError, UsageError

MAX_ATTEMPTS = 3
_TEMP_DIR = "/tmp/lcc-ray"  # short: Ray's socket paths must stay under 107 bytes


class _Worker:
    """One actor: a loaded model and a built compiler."""

    def __init__(self, model, device, dtype, threads, spec):
        from ..compile.base import build_compiler
        from ..runtime.model import load_model, set_threads

        set_threads(threads)
        self.compiler = build_compiler(spec, load_model(model, device=device, dtype=dtype))

    def compile(self, unit, cfg):
        from ..progress import NO_PROGRESS

        return self.compiler.compile(unit.segment, cfg, NO_PROGRESS)

    def pid(self) -> int:
        return os.getpid()


def start_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to `address` (or RAY_ADDRESS), or start a private local instance; quietly."""
    try:
        import ray
    except ImportError:
        raise UsageError("the ray backend needs Ray", hint="pip install 'lcc-cli[ray]'", field="backend") from None
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance on this machine only
        ray.init(address="local", num_cpus=num_cpus or cpu_count(), include_dashboard=False,
                 object_store_memory=256 * 1024**2, log_to_driver=False, logging_level=logging.WARNING,
                 _temp_dir=_TEMP_DIR)
    else:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot connect to the Ray cluster at {address}: {exc}".splitlines()[0],
                             field="ray_address") from exc
    return ray


class RayExecutor:
    name = "ray"

    def __init__(self, model=None, device=None, dtype=None, workers: int = 1, threads: int | None = None,
                 address: str | None = None):
        self.model, self.device, self.dtype, self.address = model, device, dtype, address
        self.workers = max(1, workers)
        self.threads = threads or max(1, cpu_count() // self.workers)

    def run(self, units, cfg, spec, sink, progress) -> None:
        if not units:
            return
        started_here = not _ray_running()
        progress.status("starting Ray…" if started_here else "using the running Ray instance")
        ray = start_ray(self.address, num_cpus=self.workers * self.threads if started_here else None)
        try:
            self._run(ray, units, cfg, spec, sink, progress)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, units, cfg, spec, sink, progress) -> None:
        from ray.exceptions import RayActorError, RayTaskError

        cpus = ray.cluster_resources().get("CPU", 0)
        if self.workers * self.threads > cpus:  # actors that do not fit would wait forever
            raise UsageError(f"{self.workers} workers x {self.threads} threads need {self.workers * self.threads} "
                             f"CPUs; the Ray cluster has {cpus:g}", field="workers")
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= self.workers and self.device != "cpu" else 0
        actor_class = ray.remote(_Worker).options(num_cpus=self.threads, num_gpus=gpus)

        def new_actor():
            return actor_class.remote(self.model, self.device, self.dtype, self.threads, spec)

        actors = [new_actor() for _ in range(min(self.workers, len(units)))]
        queue = list(units)
        attempts: dict = {}
        inflight: dict = {}  # ref -> (actor index, unit)

        def submit(slot: int) -> None:
            while queue:
                unit = queue.pop(0)
                if sink.wanted(unit):
                    attempts[id(unit)] = attempts.get(id(unit), 0) + 1
                    inflight[actors[slot].compile.remote(unit, cfg)] = (slot, unit)
                    return

        try:
            for slot in range(len(actors)):
                submit(slot)
            while inflight:
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                slot, unit = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:  # the compile raised; the actor is fine
                    sink.failed(unit, exc.cause if exc.cause is not None else exc)
                    submit(slot)
                    continue
                except RayActorError as exc:
                    if getattr(exc, "actor_init_failed", False):
                        raise ModelError(f"a Ray worker could not load the model: {exc}".splitlines()[0][:200]) from None
                    ray.kill(actors[slot], no_restart=True)
                    actors[slot] = new_actor()
                    if attempts[id(unit)] >= MAX_ATTEMPTS:
                        sink.failed(unit, ModelError(f"segment {unit.segment.index + 1} of {unit.name} killed its "
                                                     f"worker {MAX_ATTEMPTS} times"))
                    else:
                        progress.note(f"retrying {unit.name} segment {unit.segment.index + 1}/{unit.of}: its worker "
                                      f"died (attempt {attempts[id(unit)] + 1})")
                        queue.insert(0, unit)
                    submit(slot)
                    continue
                progress.note(f"{unit.name}: segment {unit.segment.index + 1}/{unit.of} done")
                sink.done(unit, result)
                del result
                submit(slot)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()

"""`lcc train-compiler --backend ray`: data-parallel training on Ray Train.

`ray.train.torch.TorchTrainer` starts `workers` processes with a torch process group (gloo
on CPUs, NCCL on GPUs). Each loads the model and runs the same loop as one process
(training/loop.py), computing its share of every step's documents; DDP (through
`ray.train.torch.prepare_model`) averages the gradients, so a step equals one process's
step with the same global batch up to float summation order. Every rank draws the whole
step's random choices, so the schedule, held-out selection and determinism rules are those
of one process; rank 0 alone scores the held-out documents and writes the checkpoints
(OUTPUT.ckpt/, which a later run `--resume`s with either backend) and the compiler file.
On a multi-node cluster OUTPUT must be on storage every node sees.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..training.loop import Dist


class TorchDist(Dist):
    """A rank of the process group Ray Train set up."""

    def __init__(self):
        import torch.distributed as td

        self.rank, self.world = td.get_rank(), td.get_world_size()

    def wrap(self, module):
        from ray.train.torch import prepare_model

        # The last layer's query and output projections never reach a loss (only the slots'
        # keys and values are kept), so their LoRA gets no gradient: DDP must be told.
        return prepare_model(module, move_to_device=False,
                             parallel_strategy_kwargs={"find_unused_parameters": True})

    def accumulate(self, module, more_to_come: bool):
        import contextlib

        return module.no_sync() if more_to_come and hasattr(module, "no_sync") else contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64)
        td.all_reduce(t)
        return t.tolist()


def _worker(config: dict) -> None:
    from ..config import RunOptions
    from ..runtime.model import load_run as load
    from ..training.loop import train_compiler

    os.environ.update(config["env"])
    run = RunOptions(model=config["model"], device=config["device"], dtype=config["dtype"],
                     threads=config["threads"])
    loaded = load(run)
    train_compiler(loaded, [Path(d) for d in config["data"]], Path(config["output"]), config["cfg"],
                   resume=config["resume"], time_limit=config["time_limit"], overwrite=config["overwrite"],
                   stop_after=config["stop_after"], dist=TorchDist(), batched=config["batched"])


def train_on_ray(data: list[Path], output: Path, cfg, run, resume: bool, time_limit: float | None,
                 overwrite: bool, stop_after: int | None, progress, batched: bool | None = None) -> None:
    """Run the training on `run.workers` Ray Train workers; the compiler file is written by
    rank 0 at OUTPUT."""
    from ..config import cpu_count
    from ..errors import LccError
    from .ray import _ray_running, start_ray

    threads = run.threads or max(1, cpu_count() // run.workers)
    started_here = not _ray_running()
    progress.status("starting Ray…" if started_here else "using the running Ray instance")
    ray = start_ray(run.ray_address, num_cpus=run.workers * threads if started_here else None)
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        gpu = run.device not in (None, "cpu") and ray.cluster_resources().get("GPU", 0) >= run.workers
        config = {"model": run.model, "device": run.device, "dtype": run.dtype, "threads": threads,
                  "data": [str(Path(d).resolve()) for d in data], "output": str(Path(output).resolve()),
                  "cfg": cfg, "resume": resume, "time_limit": time_limit, "overwrite": overwrite,
                  "stop_after": stop_after, "batched": batched,
                  "env": {k: v for k, v in os.environ.items() if k.startswith("LCC_") or k == "OMP_WAIT_POLICY"}}
        with tempfile.TemporaryDirectory(prefix="lcc-ray-train-") as storage:
            trainer = TorchTrainer(
                _worker, train_loop_config=config,
                torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=gpu,
                                             resources_per_worker={"CPU": threads}),
                run_config=RunConfig(storage_path=storage, name="train-compiler"))
            progress.status(f"training on {run.workers} Ray workers ({'GPU' if gpu else f'{threads} CPU threads'} each)")
            try:
                trainer.fit()
            except Exception as exc:  # a worker's error arrives wrapped; show its own message
                cause = exc
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                if isinstance(cause, LccError):
                    raise cause from None
                raise LccError(f"Ray training failed: {str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__}") \
                    from exc
    finally:
        if started_here:
            ray.shutdown()

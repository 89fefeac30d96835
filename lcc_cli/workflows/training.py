"""`lcc train-compiler`: the offline job that trains a compiler (training/), here or on Ray Train."""

from __future__ import annotations

from pathlib import Path

from ..config import RunOptions
from ..errors import Interrupted, UsageError
from ..progress import NO_PROGRESS, Progress
from .common import governed, load

def train_compiler(data: list[Path], output: Path, cfg, run: RunOptions | None = None, force: bool = False,
                   resume: bool = False, time_limit: float | None = None, stop_after: int | None = None,
                   progress: Progress = NO_PROGRESS, batched: bool | None = None):
    """`lcc train-compiler`: train a pretrained compiler for the model and write it."""
    from ..training.loop import train_compiler as train
    from ..format.fsio import check_output

    output = Path(output)
    check_output(output, force or resume, tuple(Path(d) for d in data))
    for d in data:
        if not Path(d).exists():  # a regular file or a pipe (ingest.check_readable), read later
            from ..errors import InputError

            raise InputError(f"no such training data: {d}")
    run = run or RunOptions()
    if run.backend not in ("local", "ray"):
        raise UsageError("train-compiler runs in this process or on Ray Train (--backend ray)", field="backend")
    try:
        if run.backend == "ray":
            return _train_on_ray([Path(d) for d in data], output, cfg, run, force, resume, time_limit, stop_after,
                                 progress, batched)
        from ..training.data import read_training_data

        read = read_training_data([Path(d) for d in data], cfg.segment_tokens)  # bad data fails before the model loads
        progress = governed(run, progress)
        progress.status("loading model…")
        loaded = load(run)
        return train(loaded, [Path(d) for d in data], output, cfg, resume=resume, time_limit=time_limit,
                     progress=progress, overwrite=force, stop_after=stop_after, batched=batched, read=read)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; checkpoints are kept in {output}.ckpt",
                          hint="rerun with --resume to continue") from None


def _train_on_ray(data, output: Path, cfg, run: RunOptions, force, resume, time_limit, stop_after, progress,
                  batched=None):
    """Data-parallel training (backends/ray_train.py); the result is read back from the file
    rank 0 wrote."""
    from ..backends.ray_train import train_on_ray
    from ..training.loop import TrainResult
    from ..format.compiler_file import load_compiler

    train_on_ray(data, output, cfg, run, resume, time_limit, force, stop_after, progress, batched)
    comp = load_compiler(output)
    t = comp.manifest["training"]
    return TrainResult(str(output), comp.sha256, t["steps"], t["seconds"], t["tokens"], t["tokens_per_second"],
                       t["selected_step"], t["heldout_qa_kl"], t["history"])




def train_prefix(data: list[Path], output: Path, cfg, run: RunOptions | None = None, force: bool = False,
                 resume: bool = False, stop_after: int | None = None, progress: Progress = NO_PROGRESS):
    """`lcc train-prefix`: train the reading prefix for the model and write it (training/prefix.py)."""
    from ..errors import InputError
    from ..training.prefix import train_prefix as train

    for d in data:
        if not Path(d).exists():
            raise InputError(f"no such training data: {d}")
    run = run or RunOptions()
    progress = governed(run, progress)
    progress.status("loading model…")
    loaded = load(run)
    try:
        return train(loaded, [Path(d) for d in data], Path(output), cfg, resume=resume, force=force,
                     stop_after=stop_after, progress=progress)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; checkpoints are kept in {output}.ckpt",
                          hint="rerun with --resume to continue") from None

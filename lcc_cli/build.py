"""Compile a whole document: split it into segments, compile each (in worker processes if
asked), checkpoint finished segments to a partial file, and resume from one.

Segments are independent work units (DESIGN.md §2, "Long documents"): each is compiled as
if it were the only text, at positions 0..n-1 with its buffer after it. Their buffers are
concatenated in the cartridge in segment order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from . import __version__
from .cartridge import Cartridge, atomic_write, from_segments, load_cartridge, to_bytes
from .compiler import Segment, compile_segment, slot_count
from .config import CompileConfig, cpu_count
from .errors import CartridgeError, ModelError, UsageError
from .prompts import Prompter

PARTIAL_SUFFIX = ".partial"


def document_segments(loaded, text: str, cfg: CompileConfig) -> list[str]:
    """Split into segments of at most cfg.segment_tokens, and check that each fits the ratio
    before minutes are spent on the first one."""
    from .ingest import split_segments

    if cfg.segment_tokens < 16:
        raise UsageError(f"--segment-tokens must be at least 16 (got {cfg.segment_tokens})")
    limit = loaded.facts["max_positions"]
    # Training places the segment, its slots, then an instruction and the whole segment again.
    need = 2 * cfg.segment_tokens + math.ceil(cfg.segment_tokens / max(cfg.ratio, 1)) + 64
    if limit and need > limit:
        fit = (limit - 64) * 2 // 5
        raise UsageError(f"--segment-tokens {cfg.segment_tokens} does not fit the model's {limit}-position "
                         f"window during training", hint=f"use at most about {fit}")
    tok = loaded.tokenizer
    texts = split_segments(text, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]), cfg.segment_tokens)
    prompter = Prompter(tok)
    for t in texts:
        slot_count(len(prompter.context_ids(t)), cfg.ratio)
    return texts


def compile_document(loaded, doc, cfg: CompileConfig, on_segment: Callable[[int, int, int], None] | None = None,
                     on_step=None, done: dict[int, Segment] | None = None,
                     on_segment_done: Callable[[dict[int, Segment]], None] | None = None,
                     workers: int = 1, model: str | None = None) -> list[Segment]:
    """Compile every segment not in `done` (finished segments of an interrupted run).
    `on_segment_done` gets all finished segments after each one, for checkpointing.
    With workers > 1, segments run in that many processes, each with its own model copy."""
    texts = document_segments(loaded, doc.text, cfg)
    done = dict(done or {})
    todo = [i for i in range(len(texts)) if i not in done]
    if workers > 1 and len(todo) > 1:
        _run_parallel(texts, todo, cfg, done, workers, model, on_segment, on_step, on_segment_done)
    else:
        for index in todo:
            if on_segment:
                on_segment(index, len(texts), _count(loaded, texts[index]))
            seg = compile_segment(loaded, texts[index], cfg, on_step)
            seg.index = index
            done[index] = seg
            if on_segment_done:
                on_segment_done(done)
    return [done[i] for i in range(len(texts))]


def _count(loaded, text: str) -> int:
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


# --- worker processes --------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(model: str | None, threads: int) -> None:
    import torch

    from .models import load_model

    torch.set_num_threads(threads)
    _WORKER["loaded"] = load_model(model)


def _compile_in_worker(index: int, text: str, cfg: CompileConfig) -> Segment:
    seg = compile_segment(_WORKER["loaded"], text, cfg)
    seg.index = index
    return seg


def _run_parallel(texts, todo, cfg, done, workers, model, on_segment, on_step, on_segment_done) -> None:
    """Segments in `workers` spawned processes. Progress advances a whole segment at a time."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, cpu_count() // workers)

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(model, threads))
    try:
        futures = {pool.submit(_compile_in_worker, i, texts[i], cfg): i for i in todo}
        for future in as_completed(futures):
            try:
                seg = future.result()
            except BrokenProcessPool as exc:
                raise ModelError("a worker process died (out of memory?)", hint="try fewer --workers") from exc
            done[seg.index] = seg
            if on_segment:
                on_segment(seg.index, len(texts), seg.token_count)
            if on_step:
                for step in range(cfg.steps):
                    on_step(step + 1, cfg.steps, {k.removeprefix("final_"): v for k, v in seg.metrics.items()
                                                  if k.startswith("final_")})
            if on_segment_done:
                on_segment_done(done)
    finally:  # on Ctrl-C or an error, do not wait for the segments still queued
        pool.shutdown(wait=True, cancel_futures=True)


# --- partial files (interrupt and resume) --------------------------------------------------

def partial_path(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def write_partial(path: Path, loaded, done: dict[int, Segment], doc, cfg: CompileConfig) -> None:
    """Checkpoint finished segments. The manifest says `partial: true`, so `ask` and
    `verify` refuse it: it never looks like a complete cartridge."""
    segments = [done[i] for i in sorted(done)]
    cart = from_segments(loaded, segments, doc, cfg.to_dict(), __version__, partial=True)
    atomic_write(path, to_bytes(cart))


def read_partial(path: Path, loaded, doc, cfg: CompileConfig) -> dict[int, Segment]:
    """Finished segments from a partial file, after checking it belongs to this compile."""
    cart = load_cartridge(path, allow_partial=True)
    m = cart.manifest
    hint = "rerun with --force and without --resume to start over"
    if m["source"]["sha256"] != doc.sha256:
        raise UsageError(f"{path.name} was made from a different source file", hint=hint)
    if m["compile"] != cfg.to_dict():
        raise UsageError(f"{path.name} was made with different settings", hint=hint)
    if m["model"]["fingerprint"] != loaded.fingerprint:
        raise UsageError(f"{path.name} was made with a different model", hint=hint)
    return split_segments_of(cart)


def split_segments_of(cart: Cartridge) -> dict[int, Segment]:
    out, start = {}, 0
    for row, metrics in zip(cart.manifest["buffer"]["segments"], cart.manifest["metrics"]["segments"]):
        stop = start + row["slots"]
        kv = [(k[:, start:stop].clone(), v[:, start:stop].clone()) for k, v in cart.kv]
        out[row["index"]] = Segment(kv=kv, position_start=row["position_start"], token_count=row["token_count"],
                                    metrics=metrics, index=row["index"])
        start = stop
    if not out:
        raise CartridgeError("partial file holds no segments")
    return out

"""`--compiler truncate`: each segment's buffer is the KV of its context turn's first K tokens.

The cartridge form of the `truncate` baseline, and the cheapest start there is for direct KV
refinement (refine.py): one prefill of K tokens. Entry 0 is the context's first token, the
same attention sink the other methods keep.
"""

from __future__ import annotations

import time

import torch

from ..buffer import Buffer
from ..config import CompileConfig
from ..ingest import TextSegment
from ..progress import NO_PROGRESS, Progress
from ..runtime.cache import prefill
from .base import CompilerSpec, SegmentResult, refuse_bias, register
from .refine import refine_buffer
from .slots import entries


class TruncatingCompiler:
    name = "truncate"

    def __init__(self, loaded):
        self.loaded = loaded

    def describe(self) -> dict:
        return {"name": self.name}

    def compile(self, segment: TextSegment, cfg: CompileConfig, progress: Progress = NO_PROGRESS) -> SegmentResult:
        started = time.perf_counter()
        ctx = self.loaded.prompter.context_ids(segment.text)
        k, _ = entries(len(ctx), cfg.ratio, sink=True)
        with torch.inference_mode():
            layers, _ = prefill(self.loaded.model, ctx[:k])
        buffer = Buffer.from_cache_layers([(key.clone(), value.clone()) for key, value in layers], range(k))
        start = SegmentResult(buffer, len(ctx), {"seconds": round(time.perf_counter() - started, 3)}, sink=True)
        return refine_buffer(self.loaded, segment.text, start, cfg, progress)


def _check(loaded, cfg: CompileConfig) -> None:
    if cfg.bias and not cfg.steps:
        refuse_bias(cfg, "truncate without --steps (refinement is what learns biases)")


# The first K tokens of each segment: no steps by default (it is the baseline as a cartridge).
@register("truncate", check=_check, presets={q: {"steps": 0} for q in ("fast", "balanced", "best")})
def _build(spec: CompilerSpec, loaded) -> TruncatingCompiler:
    return TruncatingCompiler(loaded)

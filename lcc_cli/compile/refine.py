"""Direct KV refinement: a closed-form buffer's keys and values optimised as parameters.

The Cartridges recipe (Eyuboglu et al. 2025) trains the KV cache itself, with the reader
frozen and no compiler network at all. Here it starts from a buffer that already points at
the text (`am` compaction or `truncate`), not from random or the first tokens alone, and uses
the same per-document objective as LoRA refinement (objective.py), so that the two can be
compared step for step and prefill for prefill.

A step is one reader forward and backward over the step's items with the buffer in the cache:
no compiler pass, so it costs less than a LoRA step on the same segment. The attention sink
(entry 0, when the start has one) stays frozen, its bias too: its KV does not depend on the
text, and moving it would make every other entry compete for the mass it absorbs. With
`bias` (or a start that has biases) every other entry's attention bias is learned too.
"""

from __future__ import annotations

import time

import torch

from ..buffer import Buffer
from ..config import CompileConfig
from ..progress import NO_PROGRESS, Progress
from ..format.cartridge import BIAS_LIMIT
from ..runtime.bias import check_supported, slot_biases
from ..runtime.cache import prefill
from .base import SegmentResult
from .objective import DocumentObjective


def refine_buffer(loaded, text: str, start: SegmentResult, cfg: CompileConfig,
                  progress: Progress = NO_PROGRESS) -> SegmentResult:
    """cfg.steps steps of the per-document objective on `start`'s buffer entries (float32
    master copies, stored back in the model's dtype). Deterministic for cfg.seed."""
    if not cfg.steps:
        return start
    model, loaded_dtype = loaded.model, loaded.dtype
    if cfg.bias or start.buffer.bias is not None:
        check_supported(model)  # before the teacher's answers are paid for
    started = time.perf_counter()
    with torch.no_grad():
        ctx_kv, _ = prefill(model, loaded.prompter.context_ids(text))
        objective = DocumentObjective.prepare(loaded, text, ctx_kv, cfg)
    del ctx_kv  # the objective keeps what it needs; the reader never sees the text
    buffer, frozen = start.buffer, 1 if start.sink else 0
    fixed = [(k[:, :frozen], v[:, :frozen]) for k, v in zip(buffer.keys, buffer.values)]
    keys = [torch.nn.Parameter(k[:, frozen:].float().clone()) for k in buffer.keys]
    values = [torch.nn.Parameter(v[:, frozen:].float().clone()) for v in buffer.values]
    bias, fixed_bias = None, None
    if cfg.bias or buffer.bias is not None:
        start_bias = buffer.bias or [torch.zeros(k.shape[:2], device=k.device) for k in buffer.keys]
        fixed_bias = [b[:, :frozen].float() for b in start_bias]  # the sink's bias stays, like its KV
        bias = [torch.nn.Parameter(b[:, frozen:].float().clone()) for b in start_bias]
    params = keys + values + (bias or [])
    first_position = buffer.first_query_position

    def full_bias():
        return [torch.cat([f, b], dim=1) for f, b in zip(fixed_bias, bias)] if bias else None

    def view():
        return [(torch.cat([fk, k.to(loaded_dtype)], dim=1).unsqueeze(0),
                 torch.cat([fv, v.to(loaded_dtype)], dim=1).unsqueeze(0))
                for (fk, fv), k, v in zip(fixed, keys, values)]

    def step_loss():
        with slot_biases(model, full_bias()):
            return objective.loss(model, view(), first_position)

    trace = objective.optimise(params, cfg.kv_lr, step_loss, progress)
    with torch.no_grad():
        final = view()
        refined = Buffer([k[0].detach().clone() for k, _ in final], [v[0].detach().clone() for _, v in final],
                         buffer.positions.clone(),
                         [b.detach().clamp(-BIAS_LIMIT, BIAS_LIMIT).clone() for b in full_bias()] if bias else None)
    summary = {**start.metrics, **trace, "steps": cfg.steps, "seconds": round(start.metrics.get("seconds", 0.0)
                                                    + time.perf_counter() - started, 3)}
    return SegmentResult(refined, start.token_count, summary, start.sink)

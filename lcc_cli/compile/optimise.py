"""Per-document latent context compilation: a fresh, disposable LoRA optimised on one segment.

The method (../shared/DESIGN.md §2, after Li, Zhou & Xu 2026), in the order a step runs:

1. The segment's context turn is encoded once by the frozen model (LoRA off). Its KV never
   changes, so it is reused at every step instead of being re-encoded.
2. K = ceil(n / ratio) buffer slots follow it, at positions n..n+K-1. Their input embeddings
   are trainable, and a throwaway LoRA is active only while they are encoded: this is the
   compiler. Its output is the buffer KV.
3. The reader is the frozen model with LoRA off whose cache holds only the buffer KV: the
   question can attend to nothing else (the hard bottleneck).
4. Losses on the reader (objective.py) flow back through the buffer KV into LoRA and the
   embeddings; the base weights are frozen and never change.

After the last step one more pass gives the buffer KV to keep, moved to positions 0..K-1
(every query-key distance is unchanged); LoRA, optimiser and text are discarded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import CompileConfig
from ..errors import CompilerFileError, UsageError
from ..ingest import TextSegment
from ..progress import NO_PROGRESS, Progress
from ..runtime.cache import prefill
from .base import CompilerSpec, SegmentResult, refuse_bias, register
from .objective import DocumentObjective
from .slots import chunk_embeddings, encode_slots, entries, evenly_spaced_embeddings, reader_view, to_buffer


class OptimisingCompiler:
    """Today's per-document LCC: every segment gets its own LoRA, trained from scratch."""

    name = "optimise"

    def __init__(self, loaded):
        self.loaded = loaded

    def describe(self) -> dict:
        return {"name": self.name}

    def compile(self, segment: TextSegment, cfg: CompileConfig, progress: Progress = NO_PROGRESS) -> SegmentResult:
        return optimise_segment(self.loaded, segment.text, cfg, progress)


def _check(loaded, cfg: CompileConfig) -> None:
    refuse_bias(cfg, "per-document optimisation (--compiler none)")
    check_lora_targets(loaded.model, cfg.lora_targets)  # now, not after the first minutes of work


# From scratch: 30 steps collapsed quality; 80 was the v0 default.
@register("optimise", words=("none",), check=_check,
          presets={"fast": {"steps": 30}, "balanced": {"steps": 80}, "best": {"steps": 160}})
def _build(spec: CompilerSpec, loaded) -> OptimisingCompiler:
    return OptimisingCompiler(loaded)


@dataclass
class Start:
    """Where a per-document optimisation begins when it refines a pretrained compiler: a
    copy of its LoRA, its slot initialisation, and its reader layout (with a sink)."""

    lora: dict[str, torch.Tensor]  # peft state dict of the buffer-only LoRA
    rank: int
    alpha: int
    targets: tuple[str, ...]
    slot_bias: torch.Tensor
    sink: bool


def optimise_segment(loaded, text: str, cfg: CompileConfig, progress: Progress = NO_PROGRESS,
                     start: Start | None = None) -> SegmentResult:
    """Compile one segment of text into a buffer: cfg.steps steps of the self-aligned
    objective, from a fresh LoRA (`start=None`) or from a pretrained compiler's. Leaves the
    base model exactly as it was."""
    model, prompter, rope = loaded.model, loaded.prompter, loaded.rope
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ctx_ids = prompter.context_ids(text)
    n = len(ctx_ids)
    sink = bool(start and start.sink)
    _, slots = entries(n, cfg.ratio, sink)
    with torch.no_grad():
        ctx_kv, _ = prefill(model, ctx_ids)
        objective = DocumentObjective.prepare(loaded, text, ctx_kv, cfg)

    if start is None:
        peft_model = attach_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    else:
        peft_model = attach_lora(model, start.rank, start.alpha, start.targets, start.lora)
    try:
        if start is None:
            embeds = torch.nn.Parameter(evenly_spaced_embeddings(model, ctx_ids, slots).float())
        else:
            embeds = torch.nn.Parameter(chunk_embeddings(model, ctx_ids, slots) + start.slot_bias.to(model.device))
        params = [p for p in peft_model.parameters() if p.requires_grad] + [embeds]

        def step_loss():
            buf_kv, at = reader_view(ctx_kv, encode_slots(model, ctx_kv, embeds, n), n, sink, rope)
            with peft_model.disable_adapter():
                return objective.loss(model, buf_kv, at)

        trace = objective.optimise(params, cfg.lr, step_loss, progress)
        with torch.no_grad():
            view, at = reader_view(ctx_kv, encode_slots(model, ctx_kv, embeds, n), n, sink, rope)
            buffer = to_buffer(view, at, sink, rope)
    finally:
        peft_model.unload()  # removes every LoRA layer, restoring the original modules
    summary = {**trace, "steps": cfg.steps, "seconds": round(time.perf_counter() - started, 3)}
    return SegmentResult(buffer, n, summary, sink)


def check_lora_targets(model, targets, from_file: bool = False) -> None:
    """Every LoRA target must name a linear module of the model (before any work is done)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        message = (f"lora_targets {', '.join(repr(t[:40]) for t in missing[:3])} name no module of the model "
                   f"(it has {', '.join(sorted(names)[:8])})")
        if from_file:
            raise CompilerFileError(f"the compiler's {message}")
        raise UsageError(message, field="lora_targets")


def attach_lora(model, rank: int, alpha: int, targets, state: dict | None = None):
    """Wrap the frozen model with a LoRA (the disposable compiler): fresh, or a copy of
    `state` (a pretrained compiler's weights)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    check_lora_targets(model, targets, from_file=state is not None)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, lora)
    if state is not None:
        device = next(model.parameters()).device
        try:
            result = set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in state.items()})
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"unexpected weights {result.unexpected_keys[:2]}")
        except (RuntimeError, ValueError, KeyError) as exc:
            peft_model.unload()  # never leave a half-loaded LoRA on the shared model
            raise CompilerFileError(f"the compiler's LoRA does not fit this model: {exc}".splitlines()[0][:200]) \
                from exc
    return peft_model

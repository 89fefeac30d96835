"""Per-document latent context compilation: a fresh, disposable LoRA optimised on one segment.

The method (DESIGN.md §2, after Li, Zhou & Xu 2026), in the order a step runs:

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

import math
import random
import time

import torch

from ..buffer import Buffer
from ..config import CompileConfig
from ..ingest import TextSegment
from ..progress import NO_PROGRESS, Progress
from ..runtime.cache import Layers, cache_layers, forward, make_cache, prefill
from ..runtime.prompts import RECONSTRUCT_INSTRUCTION
from .base import CompilerSpec, SegmentResult, register, slot_count
from .objective import ce_loss, cloze_items, kl_loss, make_teacher_targets


class OptimisingCompiler:
    """Today's per-document LCC: every segment gets its own LoRA, trained from scratch."""

    name = "optimise"

    def __init__(self, loaded):
        self.loaded = loaded

    def describe(self) -> dict:
        return {"name": self.name}

    def compile(self, segment: TextSegment, cfg: CompileConfig, progress: Progress = NO_PROGRESS) -> SegmentResult:
        return optimise_segment(self.loaded, segment.text, cfg, progress)


@register("optimise")
def _build(spec: CompilerSpec, loaded) -> OptimisingCompiler:
    return OptimisingCompiler(loaded)


def optimise_segment(loaded, text: str, cfg: CompileConfig, progress: Progress = NO_PROGRESS) -> SegmentResult:
    """Compile one segment of text into a buffer. Leaves the base model exactly as it was."""
    model, prompter = loaded.model, loaded.prompter
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ctx_ids = prompter.context_ids(text)
    n = len(ctx_ids)
    k = slot_count(n, cfg.ratio)
    with torch.no_grad():
        ctx_kv, _ = prefill(model, ctx_ids)
        teacher = make_teacher_targets(loaded, ctx_kv, cfg)
    recon_prompt = prompter.query_ids(RECONSTRUCT_INSTRUCTION)
    recon_target = prompter.document_ids(text)
    clozes = cloze_items(prompter, text, cfg.seed) if cfg.cloze_weight > 0 else []

    peft_model = attach_lora(model, cfg)
    first: dict = {}
    metrics: dict = {}
    try:
        embeds = initial_embeddings(model, ctx_ids, k)
        params = [p for p in peft_model.parameters() if p.requires_grad] + [embeds]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps))
        rng = random.Random(cfg.seed)
        progress.start("steps", cfg.steps)
        for step in range(cfg.steps):
            buf_kv = encode_buffer(model, ctx_kv, embeds, n)
            with peft_model.disable_adapter():
                recon = ce_loss(model, buf_kv, n + k, [(recon_prompt, recon_target)])
                batch = rng.sample(range(len(teacher.prompts)), min(cfg.kl_per_step, len(teacher.prompts)))
                kl = kl_loss(model, buf_kv, n + k, teacher, batch) if batch else torch.zeros(())
                cloze = (ce_loss(model, buf_kv, n + k, rng.sample(clozes, min(cfg.cloze_per_step, len(clozes))))
                         if clozes else torch.zeros(()))
            loss = cfg.recon_weight * recon + cfg.kl_weight * kl + cfg.cloze_weight * cloze
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            metrics = {"loss": loss.item(), "recon": recon.item(), "kl": kl.item(), "cloze": cloze.item()}
            if step == 0:
                first = {f"first_{key}": v for key, v in metrics.items()}
            progress.advance("steps", **metrics)
        with torch.no_grad():
            final_kv = encode_buffer(model, ctx_kv, embeds, n)
    finally:
        peft_model.unload()  # removes every LoRA layer, restoring the original modules
    buffer = Buffer.from_cache_layers([(k_.detach().clone(), v_.detach().clone()) for k_, v_ in final_kv],
                                      range(n, n + k))
    summary = {**first, **{f"final_{key}": v for key, v in metrics.items()},
               "steps": cfg.steps, "seconds": round(time.perf_counter() - started, 3)}
    return SegmentResult(buffer.moved(loaded.rope, -n), n, summary)


def lr_factor(step: int, total: int) -> float:
    """Short linear warm-up, then cosine decay to 10%: large early moves, a calm finish."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def attach_lora(model, cfg: CompileConfig, rank: int | None = None, alpha: int | None = None):
    """Wrap the frozen model with a fresh LoRA (the disposable compiler)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank or cfg.lora_rank, lora_alpha=alpha or cfg.lora_alpha,
                      target_modules=list(cfg.lora_targets), lora_dropout=0.0, bias="none")
    return get_peft_model(model, lora)


def initial_embeddings(model, ctx_ids: list[int], k: int) -> torch.nn.Parameter:
    """Start each slot from the embedding of an evenly spaced context token: a start that
    already points at the segment's content."""
    idx = torch.linspace(0, len(ctx_ids) - 1, k).round().long()
    table = model.get_input_embeddings().weight
    return torch.nn.Parameter(table[torch.tensor(ctx_ids, device=table.device)[idx]].detach().clone())


def encode_buffer(model, ctx_kv: Layers, embeds: torch.Tensor, n: int) -> Layers:
    """Compiler pass (LoRA attached and enabled): the buffer slots after the frozen context.
    Returns the buffer's own KV ([1, kv_heads, K, head_dim] per layer), gradients attached."""
    cache = make_cache(ctx_kv)
    forward(model, cache, n, inputs_embeds=embeds.unsqueeze(0), logits_to_keep=1)
    return [(key[:, :, n:], value[:, :, n:]) for key, value in cache_layers(cache)]

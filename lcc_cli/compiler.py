"""Latent context compilation: distil a document segment into K buffer positions of KV cache.

The method (DESIGN.md §2, after Li, Zhou & Xu 2026), in the order a step runs:

1. The segment's context turn is encoded once by the frozen model (LoRA off). Its KV never
   changes, so it is reused at every step instead of being re-encoded.
2. K = ceil(n / ratio) buffer slots follow it, at positions n..n+K-1. Their input embeddings
   are trainable, and a throwaway LoRA is active only while they are encoded: this is the
   compiler. Its output is the buffer KV.
3. The reader is the frozen model with LoRA off whose cache holds only the buffer KV: the
   question can attend to nothing else (the hard bottleneck).
4. Losses on the reader flow back through the buffer KV into LoRA and the embeddings;
   the base weights are frozen and never change.
5. Objective: reconstruct the whole segment (cross-entropy, teacher-forced) plus KL to a
   teacher on generic instructions. Teacher responses and their distributions are made
   once per segment in one batched generation, not per step.

After the last step one more pass gives the buffer KV to keep; LoRA, optimiser and text are
discarded. This module only produces tensors; `cartridge.py` writes them.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .config import CompileConfig
from .errors import UsageError
from .kvcache import KV, cache_kv, forward, make_cache, prefill
from .prompts import RECONSTRUCT_INSTRUCTION, Prompter, generic_instructions

ProgressFn = Callable[[int, int, dict], None]


@dataclass
class Segment:
    """One compiled buffer: KV per layer ([kv_heads, slots, head_dim]) and where it sits."""

    kv: KV
    position_start: int  # RoPE position of the first buffer slot (= context-turn length)
    token_count: int  # tokens of the context turn the buffer replaces
    metrics: dict = field(default_factory=dict)
    index: int = 0  # segment number within its document

    @property
    def slots(self) -> int:
        return self.kv[0][0].shape[-2]


@dataclass
class TeacherTargets:
    """Prompts and responses for the KL term, with the teacher's log-probabilities."""

    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[torch.Tensor]  # [len(response), vocab] per item


def slot_count(n_tokens: int, ratio: float) -> int:
    if ratio < 1:
        raise UsageError(f"--ratio must be at least 1 (got {ratio:g})")
    if ratio > n_tokens:
        raise UsageError(f"--ratio {ratio:g} is larger than the segment ({n_tokens} tokens)",
                         hint="use a smaller ratio or a longer document")
    return math.ceil(n_tokens / ratio)


def compile_segment(loaded, text: str, cfg: CompileConfig, on_step: ProgressFn | None = None) -> Segment:
    """Compile one segment of text into a buffer. Leaves the base model exactly as it was."""
    model, prompter = loaded.model, Prompter(loaded.tokenizer)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ctx_ids = prompter.context_ids(text)
    n = len(ctx_ids)
    k = slot_count(n, cfg.ratio)
    with torch.no_grad():
        ctx_kv, _ = prefill(model, ctx_ids)
        teacher = make_teacher_targets(loaded, text, ctx_kv, cfg)
    recon_prompt = prompter.query_ids(RECONSTRUCT_INSTRUCTION)
    recon_target = prompter.document_ids(text)
    clozes = cloze_items(prompter, text, cfg.seed) if cfg.cloze_weight > 0 else []

    peft_model = attach_lora(model, cfg)
    try:
        embeds = initial_embeddings(model, ctx_ids, k)
        params = [p for p in peft_model.parameters() if p.requires_grad] + [embeds]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps))
        rng = random.Random(cfg.seed)
        metrics: dict = {}
        for step in range(cfg.steps):
            buf_kv = encode_buffer(model, ctx_kv, embeds, n)
            with peft_model.disable_adapter():
                recon = reconstruction_loss(model, buf_kv, n + k, recon_prompt, recon_target)
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
            if on_step:
                on_step(step + 1, cfg.steps, metrics)
        with torch.no_grad():
            final_kv = encode_buffer(model, ctx_kv, embeds, n)
    finally:
        detach_lora(peft_model)
    kv = [(key[0].detach().clone(), value[0].detach().clone()) for key, value in final_kv]
    summary = {**(first if cfg.steps else {}), **{f"final_{key}": v for key, v in metrics.items()},
               "steps": cfg.steps, "seconds": round(time.perf_counter() - started, 3)}
    return Segment(kv=kv, position_start=n, token_count=n, metrics=summary)


def _lr_factor(step: int, total: int) -> float:
    """Short linear warm-up, then cosine decay to 10%: large early moves, a calm finish."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def attach_lora(model, cfg: CompileConfig):
    """Wrap the frozen model with a fresh LoRA (the disposable compiler)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                      lora_dropout=0.0, bias="none")
    return get_peft_model(model, lora)


def detach_lora(peft_model) -> None:
    """Remove every LoRA layer, restoring the original modules (weights untouched)."""
    peft_model.unload()


def initial_embeddings(model, ctx_ids: list[int], k: int) -> torch.nn.Parameter:
    """Start each slot from the embedding of an evenly spaced context token: a start that
    already points at the segment's content."""
    idx = torch.linspace(0, len(ctx_ids) - 1, k).round().long()
    table = model.get_input_embeddings().weight
    return torch.nn.Parameter(table[torch.tensor(ctx_ids, device=table.device)[idx]].detach().clone())


def encode_buffer(model, ctx_kv: KV, embeds: torch.Tensor, n: int) -> KV:
    """Compiler pass (call with LoRA attached and enabled): the buffer slots after the
    frozen context. Returns the
    buffer's own KV ([1, kv_heads, K, head_dim] per layer), with gradients attached."""
    cache = make_cache(ctx_kv)
    forward(model, cache, n, inputs_embeds=embeds.unsqueeze(0), logits_to_keep=1)
    return [(key[:, :, n:], value[:, :, n:]) for key, value in cache_kv(cache)]


def _reader_logits(model, buf_kv: KV, first_position: int, rows: list[list[int]]) -> torch.Tensor:
    """Reader pass over right-padded rows. Causal attention means real tokens never see the
    padding after them, so no attention mask is needed."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=model.device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    cache = make_cache(buf_kv, batch=len(rows))
    return forward(model, cache, first_position, input_ids=ids)


def ce_loss(model, buf_kv: KV, first_position: int, items: list[tuple[list[int], list[int]]]):
    """Mean cross-entropy of each item's target tokens after its prompt, read through the
    buffer only. Used for reconstruction (one long item) and span cloze (several short)."""
    logits = _reader_logits(model, buf_kv, first_position, [p + t for p, t in items])
    preds = [logits[i, len(p) - 1: len(p) + len(t) - 1] for i, (p, t) in enumerate(items)]
    targets = torch.tensor([tok for _, t in items for tok in t], device=logits.device)
    return F.cross_entropy(torch.cat(preds).float(), targets)


def reconstruction_loss(model, buf_kv: KV, first_position: int, prompt: list[int], target: list[int]):
    """Cross-entropy of the segment's tokens, read back through the buffer only."""
    return ce_loss(model, buf_kv, first_position, [(prompt, target)])


def cloze_items(prompter: Prompter, text: str, seed: int, limit: int = 96) -> list[tuple[list[int], list[int]]]:
    """Span-cloze tasks (an extension beyond the paper): the start of a sentence of the
    segment as the cue, the rest of it as the target. Fact retrieval from a partial cue is
    closer to question answering than reciting the whole segment in order."""
    import re

    rng = random.Random(seed)
    items = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        words = sentence.split()
        if len(words) < 5:
            continue
        for _ in range(2):
            cut = rng.randint(2, len(words) - 2)
            prompt = prompter.query_ids(f"Continue this sentence from the document: \"{' '.join(words[:cut])}\"")
            # Targets are capped: the fact right after the cue is what matters, not the tail.
            items.append((prompt, prompter.encode(" ".join(words[cut:cut + 12])) + prompter.end_ids))
    rng.shuffle(items)
    return items[:limit]


def kl_loss(model, buf_kv: KV, first_position: int, teacher: TeacherTargets, batch: list[int]):
    """Mean per-token KL(teacher || student) over the chosen generic responses."""
    rows = [teacher.prompts[i] + teacher.responses[i] for i in batch]
    logits = _reader_logits(model, buf_kv, first_position, rows)
    total, count = 0.0, 0
    for row, i in enumerate(batch):
        p, r = len(teacher.prompts[i]), len(teacher.responses[i])
        student = F.log_softmax(logits[row, p - 1: p + r - 1].float(), dim=-1)
        target = teacher.logprobs[i]
        total = total + F.kl_div(student, target, log_target=True, reduction="sum")
        count += r
    return total / max(count, 1)


def make_teacher_targets(loaded, text: str, ctx_kv: KV, cfg: CompileConfig) -> TeacherTargets:
    """Generate the teacher's responses to a seeded sample of generic instructions, in one
    batched greedy decode, keeping its log-probabilities at every response position."""
    if cfg.kl_pool <= 0 or cfg.kl_weight == 0:
        return TeacherTargets([], [], [])
    prompter = Prompter(loaded.tokenizer)
    agnostic, about_document = generic_instructions()
    if cfg.teacher == "context":
        kv = ctx_kv
    elif cfg.teacher == "plain":
        kv, _ = prefill(loaded.model, prompter.context_ids(None))
        about_document = []  # without the document these have no meaningful answer
    else:
        raise UsageError(f"unknown teacher '{cfg.teacher}' (use context or plain)")
    n = kv[0][0].shape[-2]  # the teacher's questions follow its context turn
    rng = random.Random(cfg.seed)
    n_about = min(len(about_document), round(cfg.kl_pool * cfg.kl_about_share))
    chosen = rng.sample(about_document, n_about) + rng.sample(agnostic, min(len(agnostic), cfg.kl_pool - n_about))
    prompts = [prompter.query_ids(q) for q in chosen]
    responses, logprobs = batched_greedy(loaded.model, kv, n, prompts, cfg.response_tokens, prompter.stop_ids)
    return TeacherTargets(prompts, responses, logprobs)



def batched_greedy(model, kv: KV, n: int, prompts: list[list[int]], max_tokens: int, stop_ids: set[int]):
    """Greedy decoding of several prompts after a shared cache. Prompts are left-padded so
    that every row's last prompt token is aligned; padding is masked out and each row's
    RoPE positions start right after the shared cache at position n."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    device = model.device
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask = torch.zeros(batch, kv[0][0].shape[-2] + width, dtype=torch.long, device=device)
    mask[:, : kv[0][0].shape[-2]] = 1
    positions = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        pad = width - len(p)
        ids[i, pad:] = torch.tensor(p)
        mask[i, kv[0][0].shape[-2] + pad:] = 1
        positions[i] = torch.arange(n - pad, n - pad + width)  # consecutive: no packed-sequence guess
    cache = make_cache(kv, batch=batch)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    logits = out.logits[:, -1]
    next_pos = positions[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in prompts]
    steps: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = [False] * batch
    for _ in range(max_tokens):
        logp = F.log_softmax(logits.float(), dim=-1)
        pick = logp.argmax(-1)
        for i in range(batch):
            if not done[i]:
                tokens[i].append(int(pick[i]))
                steps[i].append(logp[i])
                done[i] = int(pick[i]) in stop_ids
        if all(done):
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device=device)], dim=1)
        out = model(input_ids=pick[:, None], attention_mask=mask, position_ids=next_pos[:, None], cache=cache,
                    use_cache=True)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens, [torch.stack(s) for s in steps]


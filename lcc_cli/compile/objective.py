"""The self-aligned objective, read through the frozen reader (LoRA off, buffer-only cache).

- reconstruction: the reader, asked to repeat the document, must predict its tokens;
- KL to a teacher on instructions: the teacher is the frozen model with the document in
  its context (or without, `teacher="plain"`); its responses are generated once per segment
  and its log-probabilities kept, so each step is one batched forward of the reader;
- span cloze (an extension beyond the paper): the start of a sentence as the cue, its
  continuation as the target.

Per-document optimisation (optimise.py) and compiler pre-training (train.py) share these.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import CompileConfig
from ..runtime.cache import Layers, forward, make_cache, prefill
from ..runtime.decode import decode
from ..runtime.prompts import RECONSTRUCT_INSTRUCTION, Prompter, generic_instructions


@dataclass
class TeacherTargets:
    """Prompts and responses for the KL term, with the teacher's log-probabilities."""

    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[torch.Tensor]  # [len(response), vocab] per item


def make_teacher_targets(loaded, ctx_kv: Layers, cfg: CompileConfig) -> TeacherTargets:
    """Generate the teacher's responses to a seeded sample of generic instructions, in one
    batched greedy decode, keeping its log-probabilities at every response position."""
    if cfg.kl_pool <= 0 or cfg.kl_weight == 0:
        return TeacherTargets([], [], [])
    prompter = loaded.prompter
    agnostic, about_document = generic_instructions()
    if cfg.teacher == "context":
        kv = ctx_kv
    else:
        kv, _ = prefill(loaded.model, prompter.context_ids(None))
        about_document = []  # without the document these have no meaningful answer
    n = kv[0][0].shape[-2]  # the teacher's questions follow its context turn
    rng = random.Random(cfg.seed)
    n_about = min(len(about_document), round(cfg.kl_pool * cfg.kl_about_share))
    chosen = rng.sample(about_document, n_about) + rng.sample(agnostic, min(len(agnostic), cfg.kl_pool - n_about))
    prompts = [prompter.query_ids(q) for q in chosen]
    out = decode(loaded.model, kv, n, prompts, cfg.response_tokens, prompter.stop_ids, keep_logprobs=True)
    return TeacherTargets(prompts, [d.tokens for d in out], [d.logprobs for d in out])


def reader_logits(model, buf_kv: Layers, first_position: int, rows: list[list[int]], keep_from: int = 0) -> torch.Tensor:
    """Reader pass over right-padded rows. Causal attention means real tokens never see the
    padding after them, so no attention mask is needed. Logits are computed from position
    `keep_from` on (index 0 of the result is that position): the vocabulary projection of
    prompt positions whose predictions no loss reads is a quarter of a small model's work."""
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    cache = make_cache(buf_kv, batch=len(rows))
    return forward(model, cache, first_position, input_ids=ids, logits_to_keep=width - keep_from if keep_from else 0)


def ce_loss(model, buf_kv: Layers, first_position: int, items: list[tuple[list[int], list[int]]]):
    """Mean cross-entropy of each item's target tokens after its prompt, read through the
    buffer only. Used for reconstruction (one long item) and span cloze (several short)."""
    keep = min(len(p) for p, _ in items) - 1
    logits = reader_logits(model, buf_kv, first_position, [p + t for p, t in items], keep_from=keep)
    preds = [logits[i, len(p) - 1 - keep: len(p) + len(t) - 1 - keep] for i, (p, t) in enumerate(items)]
    targets = torch.tensor([tok for _, t in items for tok in t], device=logits.device)
    return F.cross_entropy(torch.cat(preds).float(), targets)


def kl_loss(model, buf_kv: Layers, first_position: int, teacher: TeacherTargets, batch: list[int]):
    """Mean per-token KL(teacher || student) over the chosen generic responses."""
    rows = [teacher.prompts[i] + teacher.responses[i] for i in batch]
    keep = min(len(teacher.prompts[i]) for i in batch) - 1
    logits = reader_logits(model, buf_kv, first_position, rows, keep_from=keep)
    total, count = 0.0, 0
    for row, i in enumerate(batch):
        p, r = len(teacher.prompts[i]) - keep, len(teacher.responses[i])
        student = F.log_softmax(logits[row, p - 1: p + r - 1].float(), dim=-1)
        total = total + F.kl_div(student, teacher.logprobs[i], log_target=True, reduction="sum")
        count += r
    return total / max(count, 1)


def cloze_items(prompter: Prompter, text: str, seed: int, limit: int = 96) -> list[tuple[list[int], list[int]]]:
    """Span-cloze tasks: the start of a sentence of the segment as the cue, the rest of it as
    the target. Fact retrieval from a partial cue is closer to question answering than
    reciting the whole segment in order."""
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


@dataclass
class DocumentObjective:
    """The per-document objective of one segment, prepared once: its reconstruction item,
    teacher targets and cloze items. `loss` draws a step's sample of them and reads it through
    the reader (whatever produced `buf_kv`: a LoRA compiler or the buffer itself)."""

    recon: tuple[list[int], list[int]]
    teacher: TeacherTargets
    clozes: list[tuple[list[int], list[int]]]
    cfg: CompileConfig
    rng: random.Random

    @classmethod
    def prepare(cls, loaded, text: str, ctx_kv: Layers, cfg: CompileConfig) -> DocumentObjective:
        p = loaded.prompter
        teacher = make_teacher_targets(loaded, ctx_kv, cfg) if cfg.steps else TeacherTargets([], [], [])
        clozes = cloze_items(p, text, cfg.seed) if cfg.cloze_weight > 0 and cfg.steps else []
        return cls((p.query_ids(RECONSTRUCT_INSTRUCTION), p.document_ids(text)), teacher, clozes, cfg,
                   random.Random(cfg.seed))

    def loss(self, model, buf_kv: Layers, first_position: int) -> tuple[torch.Tensor, dict]:
        cfg, rng, teacher = self.cfg, self.rng, self.teacher
        zero = torch.zeros((), device=next(model.parameters()).device)
        recon = ce_loss(model, buf_kv, first_position, [self.recon]) if cfg.recon_weight else zero
        batch = rng.sample(range(len(teacher.prompts)), min(cfg.kl_per_step, len(teacher.prompts)))
        kl = kl_loss(model, buf_kv, first_position, teacher, batch) if batch else zero
        cloze = (ce_loss(model, buf_kv, first_position, rng.sample(self.clozes, min(cfg.cloze_per_step,
                                                                                    len(self.clozes))))
                 if self.clozes else zero)
        loss = cfg.recon_weight * recon + cfg.kl_weight * kl + cfg.cloze_weight * cloze
        metrics = {"loss": loss.item(), "recon": recon.item(), "cloze": cloze.item()}
        if batch:  # no KL term (kl_weight 0 leaves the teacher pool empty): no KL to report
            metrics["kl"] = kl.item()
        return loss, metrics

    def optimise(self, params: list[torch.Tensor], lr: float, loss_fn, progress) -> dict:
        """cfg.steps AdamW steps on `params` (warm-up, then cosine), `loss_fn()` giving each
        step's (loss, metrics). Returns the first and the last step's metrics as `first_*` and
        `final_*` entries, for the segment's summary."""
        steps = self.cfg.steps
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
        first: dict = {}
        metrics: dict = {}
        progress.start("steps", steps)
        for step in range(steps):
            loss, metrics = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)
            opt.step()
            sched.step()
            if step == 0:
                first = dict(metrics)
            progress.advance("steps", **metrics)
        return {**{f"first_{key}": v for key, v in first.items()}, **{f"final_{key}": v for key, v in metrics.items()}}


def lr_factor(step: int, total: int) -> float:
    """Short linear warm-up, then cosine decay to 10%: large early moves, a calm finish."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

"""One document compiled with the compiler being trained, and the loss terms the reader scores
(the teacher's targets come from the same prefill: no teacher pass over the dataset first)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..buffer import Buffer
from ..config import TrainConfig
from ..errors import LccError
from ..format.fsio import atomic_write
from ..progress import NO_PROGRESS, Progress
from ..runtime.cache import prefill
from ..runtime.decode import decode
from ..runtime.prompts import RECONSTRUCT_INSTRUCTION, generic_instructions
from ..compile.objective import ce_loss, reader_logits
from ..compile.slots import chunk_embeddings, encode_slots, entries, reader_view, view_buffer

from .data import Doc, Question


@dataclass
class Target:
    """One teacher response to a prompt: tokens and the top-k of its log-distribution."""

    prompt: list[int]
    response: list[int]
    top_ids: torch.Tensor  # [len(response), k] int64
    top_logprobs: torch.Tensor  # [len(response), k] float32


def instruction_targets(loaded, cfg: TrainConfig, progress: Progress = NO_PROGRESS) -> list[Target]:
    """The model without a document answers every context-free instruction, greedily (once
    per model and settings; cached in $LCC_HOME/teacher/)."""
    from safetensors.torch import load_file, save

    from ..config import lcc_home

    agnostic, _ = generic_instructions()
    p = loaded.prompter
    keep = {k: cfg.to_dict()[k] for k in ("response_tokens", "top_k")}
    key = hashlib.sha256(json.dumps([loaded.fingerprint, agnostic, keep], sort_keys=True).encode()).hexdigest()[:16]
    path = lcc_home() / "teacher" / f"instructions-{key}.safetensors"
    if path.is_file():
        try:
            tensors, index = load_file(str(path)), json.loads(path.with_suffix(".json").read_text())
            return [Target(pr, rs, tensors[f"{i}.ids"].long(), tensors[f"{i}.lp"].float())
                    for i, (pr, rs) in enumerate(index)]
        except Exception:  # a damaged cache only costs a regeneration
            progress.status(f"teacher targets in {path.name} are damaged; generating them again")
    progress.status(f"teacher answers to {len(agnostic)} instructions…")
    kv, _ = prefill(loaded.model, p.context_ids(None))
    prompts = [p.query_ids(q) for q in agnostic]
    with torch.no_grad():
        out = decode(loaded.model, kv, kv[0][0].shape[-2], prompts, cfg.response_tokens, p.stop_ids, top_k=cfg.top_k)
    # float16, as cached: a run that generates the targets and one that reads them back must
    # train on the same numbers.
    targets = [Target(pr, d.tokens, d.top[0].cpu(), d.top[1].to(torch.float16).float().cpu())
               for pr, d in zip(prompts, out)]
    tensors = {}
    for i, t in enumerate(targets):
        tensors[f"{i}.ids"] = t.top_ids.to(torch.int32).contiguous()
        tensors[f"{i}.lp"] = t.top_logprobs.to(torch.float16).contiguous()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path.with_suffix(".json"), json.dumps([[t.prompt, t.response] for t in targets]).encode(),
                     overwrite=True)
        atomic_write(path, save(tensors), overwrite=True)
    except (OSError, LccError) as e:  # a cache that cannot be written only costs the next run these seconds
        progress.status(f"teacher targets not cached in {path.parent} ({str(e)[:120]}); training goes on")
    return targets


# --- one document's losses ----------------------------------------------------------------------


def topk_kl(logits: torch.Tensor, row: int, target: Target, offset: int = 0) -> torch.Tensor:
    """Sum over response tokens of KL(teacher || student), the teacher restricted to its top k
    (renormalised) and the student's log-probabilities read at the same token ids. `logits`
    start at position `offset` of the row."""
    p, r = len(target.prompt) - offset, len(target.response)
    student = F.log_softmax(logits[row, p - 1: p + r - 1].float(), dim=-1)
    ids = target.top_ids.to(student.device)
    teacher = F.log_softmax(target.top_logprobs.to(student.device), dim=-1)
    return (teacher.exp() * (teacher - student.gather(-1, ids))).sum()


def _answer_logits(model, kv, at: int, p_len: list[int], rows: list[list[int]]) -> list[torch.Tensor]:
    """Each row's log-distributions at the positions that predict its response tokens (the
    logits of the prompt positions before them are never computed)."""
    keep = min(p_len) - 1
    logits = reader_logits(model, kv, at, rows, keep_from=keep)
    return [F.log_softmax(logits[i, p - 1 - keep: len(r) - 1 - keep].float(), dim=-1)
            for i, (p, r) in enumerate(zip(p_len, rows))]


def compile_document(loaded, peft_model, bias: torch.Tensor, doc: Doc, ratio: float, cfg: TrainConfig):
    """Compile every segment with the compiler being trained (LoRA on at the slots) and lay
    the buffers out one after another, as a cartridge does. Returns the reader's view, where
    its question starts, each segment's frozen context KV (for the teacher) and the tokens
    processed."""
    rope = loaded.rope
    views, ctx_kvs, tokens = [], [], 0
    for ctx_ids in doc.segments:
        n = len(ctx_ids)
        _, slots = entries(n, min(ratio, n), cfg.sink)  # a context shorter than the ratio keeps one slot
        with torch.no_grad(), peft_model.disable_adapter():
            ctx_kv, _ = prefill(loaded.model, ctx_ids)
        embeds = chunk_embeddings(loaded.model, ctx_ids, slots) + bias
        view, at = reader_view(ctx_kv, encode_slots(loaded.model, ctx_kv, embeds, n), n, cfg.sink, rope)
        views.append(view_buffer(view, at))
        ctx_kvs.append(ctx_kv)
        tokens += n + slots
    laid = Buffer.laid_out(views, rope)  # segment j's buffer follows the earlier ones, as a cartridge lays them
    return list(zip(laid.keys, laid.values)), laid.first_query_position, ctx_kvs, tokens


def teacher_answers(loaded, ctx_kvs, questions: list[Question], cfg: TrainConfig):
    """Responses (gold answers, or the teacher's own where there is none) and the teacher's
    log-distributions over them, each question read with its own segment in the context."""
    p = loaded.prompter
    rows, dists = [None] * len(questions), [None] * len(questions)
    with torch.no_grad():
        for segment in sorted({q.segment for q in questions}):
            kv = ctx_kvs[segment]
            n = kv[0][0].shape[-2]
            mine = [i for i, q in enumerate(questions) if q.segment == segment]
            for i in mine:
                if questions[i].answer is None:
                    out = decode(loaded.model, kv, n, [questions[i].prompt], cfg.response_tokens, p.stop_ids)
                    questions[i] = Question(questions[i].prompt, out[0].tokens, segment)
            seqs = [questions[i].prompt + questions[i].answer for i in mine]
            for i, lp in zip(mine, _answer_logits(loaded.model, kv, n, [len(questions[i].prompt) for i in mine], seqs)):
                rows[i], dists[i] = questions[i].prompt + questions[i].answer, lp
    return rows, dists


def document_losses(loaded, peft_model, bias: torch.Tensor, doc: Doc, ratio: float, questions: list[Question],
                    instructions: list[Target], cfg: TrainConfig, recon: bool = True) -> tuple[dict, int]:
    """Compile `doc` at `ratio` with the compiler being trained (the LoRA attached to
    loaded.model) and score the reader on the chosen questions, instructions and (for a
    one-segment document) reconstruction. Returns the loss terms (per token) and the number
    of tokens processed."""
    model, p = loaded.model, loaded.prompter
    view, at, ctx_kvs, tokens = compile_document(loaded, peft_model, bias, doc, ratio, cfg)
    zero = torch.zeros((), device=loaded.device)
    terms = {"recon": zero, "qa": zero, "kl": zero}
    with peft_model.disable_adapter():
        if questions:
            rows, teacher = teacher_answers(loaded, ctx_kvs, list(questions), cfg)
            student = _answer_logits(model, view, at, [len(q.prompt) for q in questions], rows)
            total = sum(F.kl_div(s, t, log_target=True, reduction="sum") for s, t in zip(student, teacher))
            terms["qa_tokens"] = sum(len(t) for t in teacher)
            terms["qa"] = total / terms["qa_tokens"]
            tokens += 2 * sum(len(r) for r in rows)
        if recon and cfg.recon_weight and doc.recon is not None:
            prompt = p.query_ids(RECONSTRUCT_INSTRUCTION)
            terms["recon"] = ce_loss(model, view, at, [(prompt, doc.recon)])
            tokens += len(prompt) + len(doc.recon)
        if instructions:
            keep = min(len(t.prompt) for t in instructions) - 1
            logits = reader_logits(model, view, at, [t.prompt + t.response for t in instructions], keep_from=keep)
            terms["kl"] = sum(topk_kl(logits, i, t, keep) for i, t in enumerate(instructions)) / sum(
                len(t.response) for t in instructions)
            tokens += sum(len(t.prompt) + len(t.response) for t in instructions)
    return terms, tokens


def sample_step(doc: Doc, targets: list[Target], rng: random.Random, cfg: TrainConfig):
    """This step's questions and instructions for one document."""
    per_doc = cfg.questions_per_long if len(doc.segments) > 1 else cfg.questions_per_step
    return (rng.sample(doc.questions, min(per_doc, len(doc.questions))),
            rng.sample(targets, min(cfg.instructions_per_step, len(targets))))

"""`lcc train-compiler`: learn once, for one base model, how to compile any document.

What is learned is the pretrained compiler (pretrained.py): a buffer-only LoRA and a bias
added to every slot's starting embedding. Each training document is compiled exactly as
`lcc compile --steps 0` compiles it: split into segments of `segment_tokens` (the compile
default), each segment's context turn frozen, its slots after it with the LoRA on, and the
segments' buffers laid out one after another as a cartridge lays them out. The reader (LoRA
off) reads [sink + slots] of every segment, and its losses train the LoRA:

- KL to a teacher on the data's own questions, teacher-forced on the gold answer (or, for a
  question without one, on the teacher's own greedy answer). The teacher is the frozen model
  with the question's own *segment* in its context: for a long document that is a stronger
  target than the whole document (the 135M model answers worse from 3k tokens than from the
  right 1k), and it is what a composed cartridge should reproduce;
- reconstruction of a one-segment document (cross-entropy, teacher-forced);
- KL on context-free instructions to the model without any document (the manifold
  regulariser: the buffer must not change how the reader answers unrelated requests).

The teacher's targets are computed inside the step from the context KV the compile has just
prefilled (one extra forward of short rows, no generation), so no teacher pass over the whole
dataset precedes training and every one of the data's questions can be used. Only the
instruction responses are generated, once per model, and cached.

Checkpoints hold everything needed to resume exactly; the step's randomness is derived from
(seed, step). Whole articles (`title`) are held out; the compiler saved is the checkpoint that
did best on them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .._version import __version__
from ..config import TrainConfig
from ..errors import InputError, LccError, UsageError
from ..format import manifest as mf
from ..format.compiler_file import save_compiler
from ..format.fsio import atomic_write
from ..ingest import split_text, token_spans_of
from ..progress import NO_PROGRESS, Progress
from ..runtime.cache import prefill
from ..runtime.decode import decode
from ..runtime.prompts import RECONSTRUCT_INSTRUCTION, generic_instructions
from .objective import ce_loss, reader_logits
from .optimise import attach_lora
from ..buffer import Buffer
from .slots import chunk_embeddings, encode_slots, entries, reader_view, view_buffer

# A row of more words than this share of segment_tokens is a long document (likely several
# segments; at the default 1,024 that is 600 words): long documents are drawn on their own,
# `long_batch` per step, so that every step has some.
LONG_WORDS_PER_SEGMENT_TOKEN = 0.6
# A context this long (characters) is cut at load: training reads at most max_doc_tokens.
MAX_CONTEXT_CHARS = 200_000

# --- data -------------------------------------------------------------------------------------


@dataclass
class Row:
    text: str
    questions: list[dict]  # {"q", "answer" (str or None), "para" (int or None)}
    group: str  # what is held out together: the article title, or the row itself

    long: bool = False


def read_training_data(paths: list[Path], segment_tokens: int = 1024) -> tuple[list[Row], list[dict]]:
    """Rows of {"context" (or "text"), "title" (optional), "questions": [{"q", "answers"
    (optional), "para" (optional)}]} from JSONL files, and a record of each file (name,
    sha256, rows) for the compiler's manifest."""
    from ..ingest import read_input, read_jsonl

    rows, files = [], []
    for path in map(Path, paths):
        count = 0
        raw = read_input(path, "training data")  # read once: the data may be a pipe
        for number, _, row in read_jsonl(path, "training data", raw):
            text = row.get("context", row.get("text")) if isinstance(row, dict) else None
            questions = row.get("questions", []) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip() or not isinstance(questions, list) or not all(
                    isinstance(q, dict) and isinstance(q.get("q"), str) for q in questions):
                raise InputError(f"{path.name} line {number}: need \"context\" text and optional \"questions\" "
                                 f"[{{\"q\": ...}}]")
            qs = []
            for q in questions:
                answers = [a for a in q.get("answers") or [] if isinstance(a, str) and a.strip()]
                para = q.get("para")
                qs.append({"q": q["q"][:2000], "answer": answers[0].strip() if answers else None,
                           "para": para if isinstance(para, int) and not isinstance(para, bool) else None})
            title = row.get("title")
            group = title if isinstance(title, str) and title else f"{path.name}:{number}"
            text = text.strip()[:MAX_CONTEXT_CHARS]
            rows.append(Row(text, qs, group, len(text.split()) > LONG_WORDS_PER_SEGMENT_TOKEN * segment_tokens))
            count += 1
        files.append({"name": path.name, "sha256": hashlib.sha256(raw).hexdigest(), "rows": count})
    if not rows:
        raise InputError("the training data holds no documents")
    return rows, files


@dataclass
class Question:
    prompt: list[int]
    answer: list[int] | None  # gold answer + end of turn; None: the teacher answers greedily
    segment: int


@dataclass
class Doc:
    """A training document tokenised as `lcc compile` would see it."""

    segments: list[list[int]]  # each segment's context turn
    recon: list[int] | None  # reconstruction target (one-segment documents only)
    questions: list[Question]


def prepare(loaded, row: Row, cfg: TrainConfig) -> Doc:
    """Split and tokenise one row. A question belongs to the segment that holds its answer
    inside its paragraph (the paragraph's start when the answer is not found)."""
    p = loaded.prompter
    texts = split_text(row.text, token_spans_of(loaded.tokenizer), cfg.segment_tokens)
    starts, pos = [], 0
    for t in texts:
        at = row.text.find(t[:200], pos)
        starts.append(at if at >= 0 else pos)
        pos = starts[-1] + len(t)
    paras, offset = [], 0
    for para in row.text.split("\n\n"):
        paras.append((offset, para))
        offset += len(para) + 2
    texts = texts[: cfg.max_segments]
    questions = []
    for q in row.questions:
        if len(starts) > 1:
            if q["para"] is None or not 0 <= q["para"] < len(paras):
                continue  # a question of a long document without its paragraph: no segment to ask
            start, para = paras[q["para"]]
            found = para.find(q["answer"]) if q["answer"] else -1
            segment = max(i for i, s in enumerate(starts) if s <= start + max(found, 0))
            if segment >= len(texts):
                continue  # its segment is past max_segments
        else:
            segment = 0
        # The assistant turn starts on a fresh line: the answer is encoded without a leading space.
        answer = p.encode(q["answer"])[: cfg.response_tokens] + p.end_ids if q["answer"] else None
        questions.append(Question(p.query_ids(q["q"]), answer, segment))
    segments = [p.context_ids(t)[: cfg.max_doc_tokens] for t in texts]
    recon = p.document_ids(texts[0])[: cfg.recon_tokens] if len(texts) == 1 else None
    return Doc(segments, recon, questions)


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


class StepLoss(torch.nn.Module):
    """Documents' weighted losses as a module holding the trained parameters (the LoRA inside
    the model, the slot bias), so that data-parallel training can wrap it in DDP. `batched`:
    all the documents in a few padded passes (batched.py) instead of one pass per document."""

    def __init__(self, loaded, peft_model, bias: torch.nn.Parameter, cfg: TrainConfig, batched: bool = False):
        super().__init__()
        self.peft_model, self.bias = peft_model, bias
        self.loaded, self.cfg, self.batched = loaded, cfg, batched

    def forward(self, items: list[tuple]) -> list[tuple[torch.Tensor, dict, int]]:
        cfg = self.cfg
        if self.batched:
            from .batched import step_losses

            results = step_losses(self.loaded, self.peft_model, self.bias, items, cfg)
        else:
            results = [document_losses(self.loaded, self.peft_model, self.bias, *item, cfg) for item in items]
        return [(cfg.recon_weight * t["recon"] + cfg.qa_weight * t["qa"] + cfg.kl_weight * t["kl"], t, n)
                for t, n in results]


class Dist:
    """One process (the default). Data-parallel training (backends/ray_train.py) replaces it:
    each rank computes its share of a step's documents, and DDP averages the gradients."""

    rank, world = 0, 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def accumulate(self, module: torch.nn.Module, more_to_come: bool):
        """The context for one document's backward (DDP syncs only after a rank's last)."""
        import contextlib

        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        return values


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    path: str
    sha256: str
    steps: int
    seconds: float
    tokens: int
    tokens_per_second: float
    selected_step: int
    heldout_qa_kl: float | None
    history: list[dict]


def _ratio(rng: random.Random, cfg: TrainConfig) -> float:
    return math.exp(rng.uniform(math.log(cfg.min_ratio), math.log(cfg.max_ratio)))


def _order(count: int, index: int, seed: str) -> int:
    """The `index`-th document drawn: a fresh seeded permutation every epoch."""
    epoch, pos = divmod(index, count)
    perm = list(range(count))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(perm)
    return perm[pos]


@dataclass
class Split:
    """Which rows train and which are held out (whole groups, e.g. articles, at a time)."""

    short: list[int]
    long: list[int]
    heldout: list[int]


def split_rows(rows: list[Row], cfg: TrainConfig) -> Split:
    """Hold out whole groups (articles) until there are `heldout` paragraphs and
    `heldout_long` long documents with questions among them (at most a fifth of the groups);
    the held-out documents are then taken from those groups in turn, for variety."""
    groups = sorted({r.group for r in rows})
    random.Random(f"{cfg.seed}:heldout").shuffle(groups)
    want = {False: min(cfg.heldout, len(rows) // 5), True: cfg.heldout_long}
    members: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        members.setdefault(r.group, []).append(i)
    held: list[str] = []
    for g in groups:
        counts = {kind: sum(rows[i].long == kind and bool(rows[i].questions) for h in held for i in members[h])
                  for kind in (False, True)}
        if (all(counts[k] >= want[k] for k in want) and len(held) >= min(6, len(groups) // 5)) \
                or len(held) >= max(1, len(groups) // 5):
            break
        held.append(g)
    heldout = []
    for kind in (False, True):
        heldout += _in_turn([[i for i in members[g] if rows[i].long == kind and rows[i].questions] for g in held],
                            want[kind])
    held_set = set(held)
    train = [i for i, r in enumerate(rows) if r.group not in held_set]
    return Split([i for i in train if not rows[i].long], [i for i in train if rows[i].long], sorted(heldout))


def train_compiler(loaded, data: list[Path], output: Path, cfg: TrainConfig, resume: bool = False,
                   time_limit: float | None = None, progress: Progress = NO_PROGRESS,
                   overwrite: bool = False, stop_after: int | None = None, dist: Dist | None = None,
                   batched: bool | None = None, read: tuple | None = None) -> TrainResult | None:
    """Train and write the compiler file. Checkpoints go to OUTPUT.ckpt/ (resume with
    `resume=True`). `stop_after` ends the run after that many steps of the cfg.steps
    schedule (deterministic); `time_limit` (seconds) at a step boundary. The file records
    the steps actually done. With a data-parallel `dist`, only rank 0 scores, checkpoints and
    writes (the others return None). `read`: read_training_data's result, when the caller
    has checked the data before loading the model."""
    dist = dist or Dist()
    if cfg.batch + cfg.long_batch < dist.world:
        raise UsageError(f"{dist.world} workers need at least as many documents per step "
                         f"(batch {cfg.batch} + long_batch {cfg.long_batch})", field="workers")
    started = time.perf_counter()
    rows, files = read or read_training_data(data, cfg.segment_tokens)  # `read`: already read and checked
    data_digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    ckpt = Path(str(output) + ".ckpt")
    torch.manual_seed(cfg.seed)
    split = split_rows(rows, cfg)
    if not split.short and not split.long:
        raise InputError("every training document is held out; give more documents")
    progress.status(f"{len(split.short)} paragraphs and {len(split.long)} long documents train, "
                    f"{len(split.heldout)} held out")
    heldout = [prepare(loaded, rows[i], cfg) for i in split.heldout]
    targets = instruction_targets(loaded, cfg, progress) if cfg.kl_weight and cfg.instructions_per_step else []
    peft_model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    try:
        bias = torch.nn.Parameter(torch.zeros(loaded.facts.hidden_size, device=loaded.device))
        lora_params = [p for p in peft_model.parameters() if p.requires_grad]
        for param in lora_params:  # adapters train in float32 even over a bf16 model
            param.data = param.data.float()
        params = lora_params + [bias]
        if batched is None:  # measured: docs/compiler.md
            batched = loaded.device.type == "cuda"
        step_loss = StepLoss(loaded, peft_model, bias, cfg, batched)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg))
        state = {"step": 0, "tokens": 0, "seconds": 0.0, "best": None, "history": []}
        if resume and (ckpt / "state.json").is_file():
            state = _load_checkpoint(ckpt, peft_model, bias, opt, sched, cfg, data_digest)
            progress.status(f"resuming at step {state['step']}")
        if isinstance(state.get("best"), dict) and state["best"].get("heldout_metric", 1) != HELDOUT_METRIC:
            # chosen by an earlier held-out metric: not comparable with this one's scores; the
            # next checkpoint is the best until a later one beats it (the history keeps both)
            progress.status(f"held-out metric changed since step {state['best']['step']}: "
                            "choosing the best checkpoint again from here")
            state["best"] = None
        best_tensors = _load_best(ckpt) if state.get("best") else None
        # After a resume: every rank has read the same checkpoint, so DDP's first broadcast
        # changes nothing.
        step_loss = dist.wrap(step_loss)
        progress.start("train", cfg.steps, "training")
        progress.advance("train", state["step"])
        step_started, spent_before = time.perf_counter(), state["seconds"]
        last = min(cfg.steps, stop_after or cfg.steps)
        # the history's training losses: since the last checkpoint, each term over the documents
        # that have it (a long document has no reconstruction)
        window, last_checkpoint = {key: [0.0, 0] for key in ("recon", "qa", "kl")}, state["step"]
        while state["step"] < last:
            over = time_limit is not None and time.perf_counter() - started > time_limit
            if dist.world > 1:  # every rank stops at the same step, or the others wait forever
                over = dist.sum([float(over)])[0] > 0
            if over:
                progress.status(f"time limit reached after {state['step']} steps")
                break
            step = state["step"]
            rng = random.Random(f"{cfg.seed}:step:{step}")
            picks = ([split.short[_order(len(split.short), step * cfg.batch + b, f"{cfg.seed}")]
                      for b in range(cfg.batch)] if split.short else [])
            picks += ([split.long[_order(len(split.long), step * cfg.long_batch + b, f"{cfg.seed}:long")]
                       for b in range(cfg.long_batch)] if split.long else [])
            opt.zero_grad(set_to_none=True)
            drawn = []  # every rank draws every document's settings, in order: one random stream
            for index in picks:
                doc = prepare(loaded, rows[index], cfg)
                ratio = _ratio(rng, cfg)
                drawn.append((doc, ratio, *sample_step(doc, targets, rng, cfg)))
            mine = drawn[dist.rank:: dist.world]
            local = [0.0, 0.0, 0.0, 0.0]  # recon, qa, kl (means over the step's documents), tokens
            # batched: one forward and backward for this rank's documents; else one per document
            # (less memory at once)
            chunks = [mine] if batched else [[item] for item in mine]
            for j, chunk in enumerate(chunks):
                with dist.accumulate(step_loss, more_to_come=j < len(chunks) - 1):
                    results = step_loss(chunk)
                    # DDP averages over ranks; each rank's share is scaled so that the result is
                    # the mean over all the step's documents, as in one process.
                    (sum(loss for loss, _, _ in results) * dist.world / len(drawn)).backward()
                for item, (_, terms, tokens) in zip(chunk, results):
                    for k, key in enumerate(("recon", "qa", "kl")):
                        local[k] += float(terms[key].detach()) / len(drawn)
                    local[3] += tokens
                    for key, has in (("recon", item[0].recon is not None), ("qa", bool(item[2])),
                                     ("kl", bool(item[3]))):
                        if has:
                            window[key][0] += float(terms[key].detach())
                            window[key][1] += 1
            recon, qa, kl, tokens = dist.sum(local)
            sums = {"recon": recon, "qa": qa, "kl": kl}
            state["tokens"] += int(tokens)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            state["step"] += 1
            state["seconds"] = spent_before + time.perf_counter() - step_started
            progress.advance("train", **sums, tok_s=round(state["tokens"] / max(state["seconds"], 1e-9)))
            checkpoint = state["step"] % cfg.checkpoint_every == 0 or state["step"] == last
            if checkpoint:
                totals = dist.sum([x for key in ("recon", "qa", "kl") for x in window[key]])
                means = {key: round(totals[2 * k] / totals[2 * k + 1], 4) if totals[2 * k + 1] else None
                         for k, key in enumerate(("recon", "qa", "kl"))}
                window = {key: [0.0, 0] for key in ("recon", "qa", "kl")}
            if dist.main and checkpoint:
                scores = heldout_scores(loaded, peft_model, bias, heldout, cfg)
                state["history"].append({"step": state["step"], "tokens": state["tokens"],
                                         "seconds": round(state["seconds"], 1), "means_since": last_checkpoint,
                                         **means, **scores, "heldout_metric": HELDOUT_METRIC})
                last_checkpoint = state["step"]
                score = scores["heldout_qa_kl"]
                if score is None or state["best"] is None or score <= state["best"]["heldout_qa_kl"]:
                    state["best"] = {"step": state["step"], "heldout_qa_kl": score, "heldout_metric": HELDOUT_METRIC}
                    best_tensors = _compiler_tensors(peft_model, bias)
                _save_checkpoint(ckpt, peft_model, bias, opt, sched, state, cfg, data_digest, best_tensors)
                progress.status(f"step {state['step']}: held-out " + ", ".join(f"{k} {v}" for k, v in scores.items()))
        if best_tensors is None or state["best"] is None:  # stopped before the first checkpoint
            best_tensors = _compiler_tensors(peft_model, bias)
            state["best"] = {"step": state["step"], "heldout_qa_kl": None, "heldout_metric": HELDOUT_METRIC}
    finally:
        peft_model.unload()
    if not dist.main:
        return None
    manifest = {
        "model": loaded.facts.to_manifest(loaded.model_id, loaded.fingerprint),
        "compiler": {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_targets": list(cfg.lora_targets),
                     "sink": cfg.sink, "slot_init": "chunk-mean+bias"},
        "training": {"ratios": [cfg.min_ratio, cfg.max_ratio], "config": cfg.to_dict(), "steps": state["step"],
                     "selected_step": state["best"]["step"], "heldout_qa_kl": state["best"]["heldout_qa_kl"],
                     "seed": cfg.seed, "data": files, "tokens": state["tokens"], "seconds": round(state["seconds"], 1),
                     "device": str(loaded.device), "tokens_per_second": round(state["tokens"] / max(state["seconds"], 1e-9)),
                     "history": state["history"],
                     "objective": {"recon": cfg.recon_weight, "qa_kl": cfg.qa_weight, "instruction_kl": cfg.kl_weight}},
        "lcc_version": __version__, "created": mf.now(),
    }
    sha = save_compiler(output, manifest, {k: v.to(torch.bfloat16) if k.startswith("lora.") else v
                                           for k, v in best_tensors.items()}, overwrite=overwrite)
    return TrainResult(str(output), sha, state["step"], round(state["seconds"], 1), state["tokens"],
                       manifest["training"]["tokens_per_second"], state["best"]["step"],
                       state["best"]["heldout_qa_kl"], state["history"])


def _schedule(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the rate."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# 2: a long document's held-out questions are spread over its segments (spread()). Metric 1
# took its first questions, which all fell in segment 0, where they were the held-out
# paragraphs' own questions: it never asked about a later segment's buffer.
HELDOUT_METRIC = 2


def spread(questions: list[Question], count: int) -> list[Question]:
    """`count` questions taken in turn from each segment (in data order within a segment), so
    that every segment's buffer is asked about. Deterministic."""
    by_segment: dict[int, list[Question]] = {}
    for q in questions:
        by_segment.setdefault(q.segment, []).append(q)
    return _in_turn([by_segment[s] for s in sorted(by_segment)], count)


def _in_turn(queues: list[list], count: int) -> list:
    """Up to `count` items, one from each queue in turn (each queue in its own order)."""
    queues = [list(q) for q in queues]
    out: list = []
    while len(out) < count and any(queues):
        for queue in queues:
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out


def heldout_scores(loaded, peft_model, bias, docs: list[Doc], cfg: TrainConfig) -> dict:
    """Mean per-token QA KL on the held-out documents at `heldout_ratio` (deterministic): over
    all of them (what selects the checkpoint), and over paragraphs and long documents apart."""
    sums = {"short": [0.0, 0], "long": [0.0, 0]}
    with torch.no_grad():
        for doc in docs:
            if not doc.questions:
                continue
            questions = spread(doc.questions, cfg.questions_per_long if len(doc.segments) > 1 else 8)
            terms, _ = document_losses(loaded, peft_model, bias, doc, cfg.heldout_ratio, questions, [], cfg,
                                       recon=False)
            weight = terms["qa_tokens"]
            kind = sums["long" if len(doc.segments) > 1 else "short"]
            kind[0] += float(terms["qa"]) * weight
            kind[1] += weight
    total, count = sums["short"][0] + sums["long"][0], sums["short"][1] + sums["long"][1]
    return {"heldout_qa_kl": round(total / count, 5) if count else None,
            "heldout_short": round(sums["short"][0] / sums["short"][1], 5) if sums["short"][1] else None,
            "heldout_long": round(sums["long"][0] / sums["long"][1], 5) if sums["long"][1] else None}


def _compiler_tensors(peft_model, bias) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    out = {f"lora.{k}": v.detach().float().cpu().clone() for k, v in state.items()}
    out["slot_bias"] = bias.detach().float().cpu().clone()
    return out


# --- checkpoints (safetensors + JSON: no pickle) ------------------------------------------------


def _save_checkpoint(ckpt: Path, peft_model, bias, opt, sched, state, cfg, data_digest, best) -> None:
    from safetensors.torch import save

    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in _compiler_tensors(peft_model, bias).items()}
    opt_state = opt.state_dict()
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            tensors[f"adam.{idx}.{name}"] = value.detach().cpu().contiguous().float()
    # Three files, each written atomically; each tensor file names the step it belongs to, and
    # state.json (written last) is what a resume reads first: a crash between the writes
    # leaves a set that `_load_checkpoint` recognises as mixed and refuses.
    step = {"step": str(state["step"])}
    atomic_write(ckpt / "state.safetensors", save(tensors, metadata=step))
    atomic_write(ckpt / "best.safetensors", save({k: v.contiguous() for k, v in best.items()}, metadata=step))
    meta = {**state, "config": cfg.to_dict(), "data": data_digest, "param_groups": opt_state["param_groups"],
            "scheduler": sched.state_dict().get("last_epoch")}
    atomic_write(ckpt / "state.json", json.dumps(meta, default=str).encode())


def _load_checkpoint(ckpt: Path, peft_model, bias, opt, sched, cfg, data_digest) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from safetensors import SafetensorError, safe_open

    hint = "rerun without --resume (and with --force) to start over"
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        with safe_open(str(ckpt / "state.safetensors"), "pt") as f:
            written_at = (f.metadata() or {}).get("step")
        tensors = load_file(str(ckpt / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UsageError(f"the checkpoint in {ckpt} cannot be read ({exc})".splitlines()[0], hint=hint) from exc
    # Checkpoints written before the step was stamped into the tensors file carry no stamp;
    # their two files were written back to back, so they are taken as they are.
    if written_at is not None and written_at != str(meta.get("step")):
        raise UsageError(f"the checkpoint in {ckpt} is a mix of two steps (interrupted while saving)", hint=hint)
    if meta.get("config") != cfg.to_dict() or meta.get("data") != data_digest:
        raise UsageError(f"{ckpt} was made with other settings or data", hint=hint)
    device = bias.device
    try:
        set_peft_model_state_dict(peft_model, {k.removeprefix("lora."): v.to(device) for k, v in tensors.items()
                                               if k.startswith("lora.")})
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        with torch.no_grad():
            bias.copy_(tensors["slot_bias"].to(device))
        state = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, idx, name = key.split(".", 2)
                state["state"].setdefault(int(idx), {})[name] = value.to(device) if name != "step" else value
        for idx, entry in state["state"].items():  # torch would accept a wrong shape and fail mid-step
            param = opt.param_groups[0]["params"][idx]
            if any(name != "step" and value.shape != param.shape for name, value in entry.items()):
                raise ValueError(f"optimiser state {idx} has the wrong shape")
        opt.load_state_dict(state)  # param groups carry the current and initial rates
        if not isinstance(meta["scheduler"], int) or not isinstance(meta["step"], int):
            raise ValueError("schedule position is not a step number")
        sched.last_epoch = meta["scheduler"]
        return {k: meta[k] for k in ("step", "tokens", "seconds", "best", "history")}
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise UsageError(f"the checkpoint in {ckpt} is damaged ({str(exc).splitlines()[0][:120]})", hint=hint) \
            from None


def _load_best(ckpt: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = ckpt / "best.safetensors"
    return load_file(str(path)) if path.is_file() else None

"""`lcc train-compiler`: learn once, for one base model, how to compile any document.

What is learned is the pretrained compiler (pretrained.py): a buffer-only LoRA and a bias
added to every slot's starting embedding. Each training document is compiled exactly as
`lcc compile --steps 0` compiles (context turn frozen, slots after it with the LoRA on,
reader with the LoRA off over [sink + slots]) at a ratio drawn per document, and the
reader's losses train the LoRA:

- reconstruction of the document (cross-entropy, teacher-forced);
- KL to the full-context teacher on the data's own questions: the teacher reads the
  document, the student only the buffer (where the data has questions);
- KL to the same teacher on document-referring instructions (as in per-document compiles).

Teacher responses and their top-k log-probabilities are generated once, before training,
and cached. Checkpoints hold everything needed to resume exactly; the step's randomness is
derived from (seed, step), so a resumed run draws what the uninterrupted one would have.
A few documents are held out; the compiler saved is the checkpoint that did best on them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .._version import __version__
from ..config import TrainConfig
from ..errors import InputError, UsageError
from ..format import manifest as mf
from ..format.compiler_file import save_compiler
from ..format.fsio import atomic_write
from ..progress import NO_PROGRESS, Progress
from ..runtime.cache import prefill
from ..runtime.decode import decode
from ..runtime.prompts import RECONSTRUCT_INSTRUCTION, generic_instructions
from .objective import ce_loss, reader_logits
from .optimise import attach_lora
from .slots import chunk_embeddings, encode_slots, entries, reader_view

# --- data -------------------------------------------------------------------------------------


def read_training_data(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """Rows of {"context" (or "text"), "questions": [{"q": ...}] (optional)} from JSONL files,
    and a record of each file (name, sha256, rows) for the compiler's manifest."""
    from ..ingest import read_jsonl

    rows, files = [], []
    for path in map(Path, paths):
        count = 0
        for number, _, row in read_jsonl(path, "training data"):
            text = row.get("context", row.get("text")) if isinstance(row, dict) else None
            questions = row.get("questions", []) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip() or not isinstance(questions, list) or not all(
                    isinstance(q, dict) and isinstance(q.get("q"), str) for q in questions):
                raise InputError(f"{path.name} line {number}: need \"context\" text and optional \"questions\" "
                                 f"[{{\"q\": ...}}]")
            rows.append({"text": text.strip(), "questions": [q["q"] for q in questions]})
            count += 1
        files.append({"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "rows": count})
    if not rows:
        raise InputError("the training data holds no documents")
    return rows, files


@dataclass
class Target:
    """One teacher response to a prompt: tokens and the top-k of its log-distribution."""

    prompt: list[int]
    response: list[int]
    top_ids: torch.Tensor  # [len(response), k] int64
    top_logprobs: torch.Tensor  # [len(response), k] float32


@dataclass
class Item:
    ctx_ids: list[int]
    recon: list[int]
    questions: list[Target] = field(default_factory=list)
    instructions: list[Target] = field(default_factory=list)


def teacher_targets(loaded, rows: list[dict], cfg: TrainConfig, progress: Progress = NO_PROGRESS) -> list[Item]:
    """The teacher (the frozen model with the document in its context) answers every
    question and a seeded sample of document-referring instructions, greedily."""
    p = loaded.prompter
    _, about = generic_instructions()
    items, jobs = [], []  # jobs: (item index, kind, prompt)
    for i, row in enumerate(rows):
        ctx = p.context_ids(row["text"])[: cfg.max_doc_tokens]
        items.append(Item(ctx, p.document_ids(row["text"])[: cfg.recon_tokens]))
        rng = random.Random(f"{cfg.seed}:instructions:{i}")
        for q in row["questions"]:
            jobs.append((i, "q", p.query_ids(q)))
        for q in rng.sample(about, min(cfg.instructions_per_doc, len(about))):
            jobs.append((i, "i", p.query_ids(q)))
    progress.start("teacher", len(jobs), "teacher answers")
    cuda = loaded.device.type == "cuda"
    # On a GPU, rows of many documents decode together (each with its own context); on a
    # CPU, each document's rows share one prefill of its context.
    groups = ([jobs[s: s + 128] for s in range(0, len(jobs), 128)] if cuda else
              [[j for j in jobs if j[0] == i] for i in range(len(items))])
    with torch.no_grad():  # not inference_mode: these tensors later take part in autograd
        for group in groups:
            if not group:
                continue
            if cuda:
                prompts = [items[i].ctx_ids + prompt for i, _, prompt in group]
                out = decode(loaded.model, None, 0, prompts, cfg.response_tokens, p.stop_ids, top_k=cfg.top_k)
            else:
                ctx = items[group[0][0]].ctx_ids
                kv, _ = prefill(loaded.model, ctx)
                out = decode(loaded.model, kv, len(ctx), [prompt for _, _, prompt in group], cfg.response_tokens,
                             p.stop_ids, top_k=cfg.top_k)
            for (i, kind, prompt), d in zip(group, out):
                # float16, as cached: a run that generates its targets and one that reads them
                # back must train on the same numbers.
                target = Target(prompt, d.tokens, d.top[0].cpu(), d.top[1].to(torch.float16).float().cpu())
                (items[i].questions if kind == "q" else items[i].instructions).append(target)
            progress.advance("teacher", len(group))
    return items


# --- one document's losses ----------------------------------------------------------------------


def topk_kl(logits: torch.Tensor, row: int, target: Target) -> torch.Tensor:
    """Sum over response tokens of KL(teacher || student), the teacher restricted to its top k
    (renormalised) and the student's log-probabilities read at the same token ids."""
    p, r = len(target.prompt), len(target.response)
    student = F.log_softmax(logits[row, p - 1: p + r - 1].float(), dim=-1)
    ids = target.top_ids.to(student.device)
    teacher = F.log_softmax(target.top_logprobs.to(student.device), dim=-1)
    return (teacher.exp() * (teacher - student.gather(-1, ids))).sum()


def sample_targets(item: Item, rng: random.Random, cfg: TrainConfig) -> list[tuple[str, Target]]:
    """This step's teacher targets for one document: some questions, some instructions."""
    return ([("qa", t) for t in rng.sample(item.questions, min(cfg.questions_per_step, len(item.questions)))]
            + [("kl", t) for t in rng.sample(item.instructions, min(cfg.instructions_per_step, len(item.instructions)))])


def document_losses(loaded, peft_model, bias: torch.Tensor, item: Item, ratio: float,
                    chosen: list[tuple[str, Target]], cfg: TrainConfig, recon: bool = True) -> tuple[dict, int]:
    """Compile `item` at `ratio` with the compiler being trained and score the reader on
    reconstruction and the `chosen` teacher targets. Returns the loss terms (per token) and
    the number of tokens processed."""
    model, rope, p = loaded.model, loaded.rope, loaded.prompter
    n = len(item.ctx_ids)
    _, slots = entries(n, ratio, cfg.sink)
    with torch.no_grad(), peft_model.disable_adapter():
        ctx_kv, _ = prefill(model, item.ctx_ids)
    embeds = chunk_embeddings(model, item.ctx_ids, slots) + bias
    view, at = reader_view(ctx_kv, encode_slots(model, ctx_kv, embeds, n), n, cfg.sink, rope)
    zero = torch.zeros((), device=loaded.device)
    terms = {"recon": zero, "qa": zero, "kl": zero}
    tokens = n + slots
    with peft_model.disable_adapter():
        if recon and cfg.recon_weight:
            prompt = p.query_ids(RECONSTRUCT_INSTRUCTION)
            terms["recon"] = ce_loss(model, view, at, [(prompt, item.recon)])
            tokens += len(prompt) + len(item.recon)
        if chosen:
            logits = reader_logits(model, view, at, [t.prompt + t.response for _, t in chosen])
            for kind in ("qa", "kl"):
                rows = [(i, t) for i, (k, t) in enumerate(chosen) if k == kind]
                if rows:
                    terms[kind] = sum(topk_kl(logits, i, t) for i, t in rows) / sum(len(t.response) for _, t in rows)
            tokens += sum(len(t.prompt) + len(t.response) for _, t in chosen)
    return terms, tokens


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


def _order(count: int, index: int, seed: int) -> int:
    """The `index`-th document drawn: a fresh seeded permutation every epoch."""
    epoch, pos = divmod(index, count)
    perm = list(range(count))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(perm)
    return perm[pos]


def train_compiler(loaded, data: list[Path], output: Path, cfg: TrainConfig, resume: bool = False,
                   time_limit: float | None = None, progress: Progress = NO_PROGRESS,
                   overwrite: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train and write the compiler file. Checkpoints go to OUTPUT.ckpt/ (resume with
    `resume=True`). `stop_after` ends the run after that many steps of the cfg.steps
    schedule (deterministic); `time_limit` (seconds) at a step boundary. The file records
    the steps actually done."""
    started = time.perf_counter()
    rows, files = read_training_data(data)
    data_digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    ckpt = Path(str(output) + ".ckpt")
    torch.manual_seed(cfg.seed)
    order = list(range(len(rows)))
    random.Random(f"{cfg.seed}:heldout").shuffle(order)
    heldout_rows = sorted(order[: min(cfg.heldout, len(rows) // 5)])
    train_rows = sorted(set(order) - set(heldout_rows))
    progress.status(f"{len(train_rows)} training documents, {len(heldout_rows)} held out")

    items = _cached_targets(loaded, rows, cfg, data_digest, progress)
    peft_model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    try:
        bias = torch.nn.Parameter(torch.zeros(loaded.facts.hidden_size, device=loaded.device))
        lora_params = [p for p in peft_model.parameters() if p.requires_grad]
        for param in lora_params:  # adapters train in float32 even over a bf16 model
            param.data = param.data.float()
        params = lora_params + [bias]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg))
        state = {"step": 0, "tokens": 0, "seconds": 0.0, "best": None, "history": []}
        if resume and (ckpt / "state.json").is_file():
            state = _load_checkpoint(ckpt, peft_model, bias, opt, sched, cfg, data_digest)
            progress.status(f"resuming at step {state['step']}")
        best_tensors = _load_best(ckpt) if state.get("best") else None
        progress.start("train", cfg.steps, "training")
        progress.advance("train", state["step"])
        step_started, spent_before = time.perf_counter(), state["seconds"]
        last = min(cfg.steps, stop_after or cfg.steps)
        while state["step"] < last:
            if time_limit is not None and time.perf_counter() - started > time_limit:
                progress.status(f"time limit reached after {state['step']} steps")
                break
            step = state["step"]
            rng = random.Random(f"{cfg.seed}:step:{step}")
            opt.zero_grad(set_to_none=True)
            sums = {"recon": 0.0, "qa": 0.0, "kl": 0.0}
            for b in range(cfg.batch):
                item = items[train_rows[_order(len(train_rows), step * cfg.batch + b, cfg.seed)]]
                ratio = _ratio(rng, cfg)
                terms, tokens = document_losses(loaded, peft_model, bias, item, ratio, sample_targets(item, rng, cfg), cfg)
                loss = cfg.recon_weight * terms["recon"] + cfg.qa_weight * terms["qa"] + cfg.kl_weight * terms["kl"]
                (loss / cfg.batch).backward()
                state["tokens"] += tokens
                for k in sums:
                    sums[k] += float(terms[k].detach()) / cfg.batch
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            state["step"] += 1
            state["seconds"] = spent_before + time.perf_counter() - step_started
            progress.advance("train", **sums, tok_s=round(state["tokens"] / max(state["seconds"], 1e-9)))
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == last:
                score = heldout_score(loaded, peft_model, bias, [items[i] for i in heldout_rows], cfg)
                state["history"].append({"step": state["step"], **{k: round(v, 4) for k, v in sums.items()},
                                         "heldout_qa_kl": score})
                if score is None or state["best"] is None or score <= state["best"]["heldout_qa_kl"]:
                    state["best"] = {"step": state["step"], "heldout_qa_kl": score}
                    best_tensors = _compiler_tensors(peft_model, bias)
                _save_checkpoint(ckpt, peft_model, bias, opt, sched, state, cfg, data_digest, best_tensors)
        if best_tensors is None or state["best"] is None:  # stopped before the first checkpoint
            best_tensors = _compiler_tensors(peft_model, bias)
            state["best"] = {"step": state["step"], "heldout_qa_kl": None}
    finally:
        peft_model.unload()
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


def heldout_score(loaded, peft_model, bias, items: list[Item], cfg: TrainConfig) -> float | None:
    """Mean per-token QA KL on held-out documents at the hardest ratio (deterministic)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            if not item.questions:
                continue
            chosen = [("qa", t) for t in item.questions[:8]]
            terms, _ = document_losses(loaded, peft_model, bias, item, cfg.max_ratio, chosen, cfg, recon=False)
            weight = sum(len(t.response) for _, t in chosen)
            total, count = total + float(terms["qa"]) * weight, count + weight
    return round(total / count, 5) if count else None


def _compiler_tensors(peft_model, bias) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    out = {f"lora.{k}": v.detach().float().cpu().clone() for k, v in state.items()}
    out["slot_bias"] = bias.detach().float().cpu().clone()
    return out


# --- teacher cache and checkpoints (safetensors + JSON: no pickle) -------------------------------


def _targets_key(loaded, cfg: TrainConfig, data_digest: str) -> str:
    keep = {k: v for k, v in cfg.to_dict().items() if k in ("instructions_per_doc", "response_tokens", "top_k",
                                                               "max_doc_tokens", "recon_tokens", "seed")}
    return hashlib.sha256(json.dumps([loaded.fingerprint, data_digest, keep], sort_keys=True).encode()).hexdigest()[:16]


def _cached_targets(loaded, rows, cfg, data_digest: str, progress) -> list[Item]:
    """Teacher targets, generated once per (model, data, settings) and kept in
    $LCC_HOME/teacher/ so that a resumed or repeated run skips the generation."""
    from safetensors.torch import save

    from ..config import lcc_home

    cache = lcc_home() / "teacher"
    path = cache / f"{_targets_key(loaded, cfg, data_digest)}.safetensors"
    if path.is_file():
        try:
            return _read_targets(path, progress)
        except Exception:  # a damaged cache only costs a regeneration
            progress.status(f"teacher targets in {path.name} are damaged; generating them again")
    items = teacher_targets(loaded, rows, cfg, progress)
    cache.mkdir(parents=True, exist_ok=True)
    tensors, index = {}, []
    for i, item in enumerate(items):
        entry = {"ctx": item.ctx_ids, "recon": item.recon, "questions": [], "instructions": []}
        for kind in ("questions", "instructions"):
            for j, t in enumerate(getattr(item, kind)):
                entry[kind].append([t.prompt, t.response])
                tensors[f"{i}.{kind}.{j}.ids"] = t.top_ids.to(torch.int32).contiguous()
                tensors[f"{i}.{kind}.{j}.lp"] = t.top_logprobs.to(torch.float16).contiguous()
        index.append(entry)
    atomic_write(path.with_suffix(".json"), json.dumps(index).encode())
    atomic_write(path, save(tensors))
    return items


def _read_targets(path: Path, progress) -> list[Item]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    index = json.loads((path.with_suffix(".json")).read_text())
    items = []
    for i, entry in enumerate(index):
        item = Item(entry["ctx"], entry["recon"])
        for kind in ("questions", "instructions"):
            for j, (prompt, response) in enumerate(entry[kind]):
                getattr(item, kind).append(Target(prompt, response, tensors[f"{i}.{kind}.{j}.ids"].long(),
                                                  tensors[f"{i}.{kind}.{j}.lp"].float()))
        items.append(item)
    progress.status(f"teacher targets read from {path.name}")
    return items


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
    opt.load_state_dict(state)  # param groups carry the current and initial rates
    sched.last_epoch = meta["scheduler"]
    return {k: meta[k] for k in ("step", "tokens", "seconds", "best", "history")}


def _load_best(ckpt: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = ckpt / "best.safetensors"
    return load_file(str(path)) if path.is_file() else None

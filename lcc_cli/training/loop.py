"""The training loop: steps, the held-out score that picks the kept checkpoint, checkpoints
(safetensors + JSON, no pickle) and the compiler file."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._version import __version__
from ..config import TrainConfig
from ..errors import InputError, UsageError
from ..format import manifest as mf
from ..format.compiler_file import save_compiler
from ..format.fsio import atomic_write
from ..progress import NO_PROGRESS, Progress
from ..compile.optimise import attach_lora
from .data import Doc, _order, _ratio, prepare, read_training_data, split_rows, spread
from .losses import document_losses, instruction_targets, sample_step


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


# One function on purpose: setup, the step loop and the final file share the run's state (the
# LoRA attached to the model, the optimiser, the best tensors, DDP's wrapper), and the `finally`
# that unloads the LoRA must cover all of it; split, each piece would take a dozen of them.
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

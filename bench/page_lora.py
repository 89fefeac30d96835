"""Issue 38's second form, measured against the reading prefix: a LoRA that encodes the *pages*.

The reader stays frozen. A rank-r LoRA on every linear layer of the model is applied to the
context turn's tokens only (the header, the chosen pages, the end of turn, as a paragraph's
default read re-encodes them in the question's pass); the question and the answer are encoded
by the plain model (gradient isolation as in the seed). What it learns is therefore carried by
the pages' KV alone, as a compile-time LoRA's would be. Measured on paragraphs at 8x, where the
default re-encodes the chosen pages, so one forward pass holds pages, question and answer;
long documents (stored pages) would need the LoRA at compile time and are left out here.

Same data, draws and regulariser as `lcc train-prefix` (training/prefix.py): SQuAD train
paragraphs with gold answers, KL to the plain model on generic instructions reading a document
(with no document the LoRA touches nothing, so those answers are the plain model's by
construction). Validated on held-out articles' paragraphs that did not choose the shipped
prefix's step, against no prefix and the shipped prefix, each question read alone, greedy.

    python bench/page_lora.py --steps 150 --out bench/results/page-lora.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
SQUAD = ROOT / "build" / "squad" / "squad_train.jsonl"

import torch  # noqa: E402

import lcc  # noqa: E402
from lcc_cli.config import AskConfig, PrefixConfig  # noqa: E402
from lcc_cli.runtime.prefix import reading_prefix  # noqa: E402
from lcc_cli.runtime.reading import Row, answer_rows  # noqa: E402
from lcc_cli.scoring import score  # noqa: E402
from lcc_cli.training import prefix as tp  # noqa: E402
from prefix_general import _agree, bootstrap  # noqa: E402


class PageLora:
    """LoRA deltas on every nn.Linear of the decoder layers, added where `mask` ([batch, seq],
    set before each forward) is 1: the context turn's tokens. Decode steps (one token) and rows
    with no mask read the plain model."""

    def __init__(self, model, rank: int, alpha: float):
        self.mask: torch.Tensor | None = None
        self.scale = alpha / rank
        self.params: list[torch.nn.Parameter] = []
        self.handles = []
        gen = torch.Generator().manual_seed(0)
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    a = torch.nn.Parameter(torch.randn(rank, module.in_features, generator=gen) / math.sqrt(module.in_features))
                    b = torch.nn.Parameter(torch.zeros(module.out_features, rank))
                    self.params += [a, b]
                    self.handles.append(module.register_forward_hook(self._hook(a, b)))

    def _hook(self, a, b):
        def hook(module, inputs, output):
            mask = self.mask
            if mask is None or output.shape[1] != mask.shape[1]:
                return output
            delta = (inputs[0] @ a.T) @ b.T
            return output + self.scale * delta * mask[..., None].to(output.dtype)
        return hook


def train_masks(views, tokens) -> torch.Tensor:
    """[rows, width] as row_logits lays its rows out (left-padded, the view's fresh tokens first)."""
    rows = [v.fresh + t for v, t in zip(views, tokens)]
    width = max(len(r) for r in rows)
    mask = torch.zeros(len(rows), width)
    for i, (v, r) in enumerate(zip(views, rows)):
        if v.document and v.fresh:
            pad = width - len(r)
            mask[i, pad:pad + len(v.fresh)] = 1
    return mask


def step_loss(loaded, lora: PageLora, views, rows) -> dict:
    """training/prefix.step_loss with the LoRA on the context turn instead of a prefix."""
    keep = max(len(t) for _, t, _ in rows) + 1
    tokens = [p + t for p, t, _ in rows]
    lora.mask = train_masks(views, tokens)
    try:
        logits = tp.row_logits(loaded, None, views, tokens, keep)
    finally:
        lora.mask = None
    kl_rows = [i for i, (_, _, is_kl) in enumerate(rows) if is_kl]
    teacher = None
    if kl_rows:
        with torch.no_grad():
            teacher = tp.row_logits(loaded, None, [views[i] for i in kl_rows], [tokens[i] for i in kl_rows], keep)
    return tp.loss_terms(logits, teacher, rows, keep)


def answer(loaded, view, question: str, lora: PageLora | None, prefix=None, max_new: int = 32) -> str:
    """One question read alone through the reading engine; the LoRA on its context turn."""
    p = loaded.prompter
    if lora is not None:
        n = len(view.fresh) if view.document else 0
        width = n + len(p.query_ids(question))
        lora.mask = torch.zeros(1, width)
        lora.mask[0, :n] = 1
    try:
        return answer_rows(loaded, [Row(view, p.query_ids(question), question)], AskConfig(max_new_tokens=max_new),
                           prefix, batch=False)[0].text
    finally:
        if lora is not None:
            lora.mask = None


def evaluate(loaded, reads, qa, general, plain_general, lora=None, prefix=None) -> dict:
    with torch.no_grad():
        got = [answer(loaded, reads.view(ex), ex.question, lora, prefix) for ex in qa]
        mine = [answer(loaded, reads.view(ex), ex.question, lora, prefix) for ex in general]
    scores = [score(a, [ex.answer]) for a, ex in zip(got, qa)]
    agree = [_agree(m, g) for m, g in zip(mine, plain_general)]
    mean = lambda xs: round(sum(xs) / max(len(xs), 1), 4)  # noqa: E731
    return {"em": mean([s["em"] for s in scores]), "f1": mean([s["f1"] for s in scores]),
            "contains": mean([s["contains"] for s in scores]), "general_f1_document": mean(agree),
            "per_question": [{"q": ex.question, "gold": ex.answer, "got": a, **s} for ex, a, s in zip(qa, got, scores)],
            "general": [{"q": ex.question, "got": m} for ex, m in zip(general, mine)]}


def paired(out: dict) -> dict:
    pairs = {}
    for a, b in (("page lora", "no prefix"), ("page lora", "shipped prefix"), ("shipped prefix", "no prefix")):
        for metric in ("f1", "contains", "em"):
            diffs = [x[metric] - y[metric] for x, y in zip(out[a]["per_question"], out[b]["per_question"])]
            pairs[f"{a} - {b} {metric}"] = [round(sum(diffs) / len(diffs), 3), *bootstrap(diffs)]
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--kl-weight", type=float, default=16.0)
    ap.add_argument("--questions", type=int, default=120)
    ap.add_argument("--work", default=str(ROOT / "build" / "page-lora"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "page-lora.json"))
    args = ap.parse_args()
    model = lcc.load_model()
    loaded = model.loaded
    cfg = PrefixConfig(steps=args.steps, lr=args.lr, long_share=0.0, kl_rows=6, kl_weight=args.kl_weight,
                       kl_document_share=1.0, validate_questions=400, warmup=10)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    trainer = tp.Trainer(loaded, [SQUAD], work / "unused.safetensors", cfg)
    pools = trainer.pools
    pools.doc_kl = [ex for ex in pools.doc_kl if not pools.docs[ex.doc].long]  # re-encoded reads only
    # the held-out paragraphs' questions that did not choose the shipped prefix's step (the
    # trainer's validation took the first 32 of this same shuffled list)
    val_para = [ex for ex in pools.val_qa if not pools.docs[ex.doc].long]
    qa = val_para[32:32 + args.questions]
    general = [ex for ex in pools.val_general if ex.doc is not None]
    reads = trainer.reads
    with torch.no_grad():
        plain_general = [answer(loaded, reads.view(ex), ex.question, None) for ex in general]
    out: dict = {"questions": len(qa), "articles": len({pools.docs[ex.doc].group for ex in qa}),
                 "general_instructions": len(general), "config": vars(args)}
    shipped = reading_prefix(loaded, True)
    started = time.perf_counter()
    out["no prefix"] = evaluate(loaded, reads, qa, general, plain_general)
    out["shipped prefix"] = evaluate(loaded, reads, qa, general, plain_general, prefix=shipped)
    out["eval_seconds"] = round(time.perf_counter() - started, 1)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    lora = PageLora(loaded.model, args.rank, 2.0 * args.rank)
    opt = torch.optim.Adam(lora.params, lr=args.lr)
    history, started = [], time.perf_counter()
    for step in range(args.steps):
        views, rows = trainer.rows(trainer.draw(step))
        for group in opt.param_groups:
            group["lr"] = trainer.lr_at(step)
        with torch.enable_grad():
            terms = step_loss(loaded, lora, views, rows)
            loss = terms["qa"] + args.kl_weight * terms["kl"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora.params, 1.0)
            opt.step()
        history.append({"step": step + 1, "qa": round(float(terms["qa"]), 4), "kl": round(float(terms["kl"]), 4)})
        print(json.dumps(history[-1]), f"{time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    out["train_seconds"] = round(time.perf_counter() - started, 1)
    out["page lora"] = evaluate(loaded, reads, qa, general, plain_general, lora=lora)
    out["history"] = history
    out["paired (mean, 95% CI over questions)"] = pairs = paired(out)
    Path(args.out).write_text(json.dumps(out, indent=1))
    summary = {k: {m: out[k][m] for m in ("em", "f1", "contains", "general_f1_document")}
               for k in ("no prefix", "shipped prefix", "page lora")}
    print(json.dumps({"summary": summary, "paired": pairs}, indent=1))


if __name__ == "__main__":
    main()

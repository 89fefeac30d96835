"""One training step's documents in a few padded passes instead of one pass per document.

`losses.document_losses` scores a document with about eight model calls (prefill, slot encode,
teacher, reader on questions, reconstruction, instructions, per segment); a step of nine
documents is then ~70 calls, each a few thousand small kernels, which leaves a GPU idle
(docs/compiler.md: 0.28 s of kernels in a 4.4 s step). Here every stage runs once for the
whole step, its rows padded to the longest:

1. all segments of all documents: one prefill (right-padded; causal attention keeps real
   tokens from seeing the padding after them), then one slot-encoding pass with the LoRA on,
   each row's slots at its own positions after its own context (padding masked out);
2. per document, its segments' [sink + slots] laid out one after another, as a cartridge;
3. one teacher pass for every question (each over its own segment's context), then one
   reader pass per kind of row (questions, reconstructions, instructions), each row reading
   its own document's buffer at its own positions, padding masked.

The losses are those of `document_losses`, document by document, up to float rounding
(tests/test_pretrained.py compares them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..buffer import Buffer
from ..compile.slots import chunk_embeddings, entries, view_buffer
from ..runtime.cache import Layers, cache_layers, forward_rows, make_cache
from ..runtime.prompts import RECONSTRUCT_INSTRUCTION
from .losses import topk_kl


def _pad_ids(rows: list[list[int]], device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, device=device)
    return ids


def _stack_prefixes(prefixes: list[Layers]) -> tuple[Layers, list[int]]:
    """Per-row caches of different lengths as one right-padded cache, and each row's length."""
    lengths = [p[0][0].shape[-2] for p in prefixes]
    width = max(lengths)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, width - t.shape[-2])) if t.shape[-2] < width else t

    layers = [(torch.cat([pad(p[i][0]) for p in prefixes]), torch.cat([pad(p[i][1]) for p in prefixes]))
              for i in range(len(prefixes[0]))]
    return layers, lengths


def read_rows(model, prefixes: list[Layers], starts: list[int], rows: list[list[int]], keep_from: int):
    """Rows, each after its own prefix (KV [1, heads, len, dim] per layer) at its own first
    position, in one pass. Logits from position `keep_from` of each row on."""
    device = next(model.parameters()).device
    layers, lengths = _stack_prefixes(prefixes)
    ids = _pad_ids(rows, device)
    width, cached = ids.shape[1], max(lengths)
    mask = torch.zeros(len(rows), cached + width, dtype=torch.long, device=device)
    for i, (n, r) in enumerate(zip(lengths, rows)):
        mask[i, :n] = 1
        mask[i, cached: cached + len(r)] = 1
    positions = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(width, device=device)
    return forward_rows(model, make_cache(layers, batch=len(rows)), positions, mask, input_ids=ids,
                        logits_to_keep=width - keep_from if keep_from else 0)


def compile_documents(loaded, peft_model, bias, docs: list, ratios: list[float], cfg):
    """Every segment of every document compiled in two passes. Returns, per document, the
    reader's buffer (KV [1, ...] per layer), where its questions start, its segments' frozen
    context KV (for the teacher) and the tokens processed."""
    model, rope = loaded.model, loaded.rope
    device = loaded.device
    segs = [(d, ctx) for d, doc in enumerate(docs) for ctx in doc.segments]
    lengths = [len(ctx) for _, ctx in segs]
    slots = [entries(n, min(ratios[d], n), cfg.sink)[1] for (d, _), n in zip(segs, lengths)]
    ids = _pad_ids([ctx for _, ctx in segs], device)
    width = ids.shape[1]
    with torch.no_grad(), peft_model.disable_adapter():
        cache = make_cache(None)
        positions = torch.arange(width, device=device).expand(len(segs), -1)
        forward_rows(model, cache, positions, torch.ones_like(ids), input_ids=ids, logits_to_keep=1)
        ctx_kv = [(k.detach(), v.detach()) for k, v in cache_layers(cache)]
    s_max = max(slots)
    embeds = torch.zeros(len(segs), s_max, loaded.facts.hidden_size, device=device)
    for i, ((_, ctx), s) in enumerate(zip(segs, slots)):
        embeds[i, :s] = chunk_embeddings(model, ctx, s)
    embeds = embeds + bias  # padding rows get the bias too; they are masked and never read
    mask = torch.zeros(len(segs), width + s_max, dtype=torch.long, device=device)
    for i, (n, s) in enumerate(zip(lengths, slots)):
        mask[i, :n] = 1
        mask[i, width: width + s] = 1
    positions = torch.tensor(lengths, device=device).unsqueeze(1) + torch.arange(s_max, device=device)
    cache = make_cache(ctx_kv, batch=len(segs))
    dtype = next(model.parameters()).dtype
    forward_rows(model, cache, positions, mask, inputs_embeds=embeds.to(dtype), logits_to_keep=1)
    slot_kv = [(k[:, :, width:], v[:, :, width:]) for k, v in cache_layers(cache)]
    out = []
    for d, doc in enumerate(docs):
        views, ctxs, tokens = [], [], 0
        for i in (i for i, (dd, _) in enumerate(segs) if dd == d):
            n, s = lengths[i], slots[i]
            # as slots.reader_view, then moved after the document's earlier segments
            sink_k, sink_v = [k[i: i + 1, :, :1] for k, _ in ctx_kv], [v[i: i + 1, :, :1] for _, v in ctx_kv]
            view = [(torch.cat([sk, rope.shift(k[i: i + 1, :, :s], -(n - 1))], dim=2), torch.cat([sv, v[i: i + 1, :, :s]], dim=2))
                    for sk, sv, (k, v) in zip(sink_k, sink_v, slot_kv)] if cfg.sink else \
                [(k[i: i + 1, :, :s], v[i: i + 1, :, :s]) for k, v in slot_kv]
            at = s + 1 if cfg.sink else n + s
            views.append(view_buffer(view, at))
            ctxs.append([(k[i: i + 1, :, :n], v[i: i + 1, :, :n]) for k, v in ctx_kv])
            tokens += n + s
        laid = Buffer.laid_out(views, rope)
        out.append((list(zip(laid.keys, laid.values)), laid.first_query_position, ctxs, tokens))
    return out


def step_losses(loaded, peft_model, bias, items: list[tuple], cfg) -> list[tuple[dict, int]]:
    """(terms, tokens) for each (doc, ratio, questions, instructions), as `document_losses`
    computes them one document at a time."""

    model, p = loaded.model, loaded.prompter
    docs = [it[0] for it in items]
    compiled = compile_documents(loaded, peft_model, bias, docs, [it[1] for it in items], cfg)
    zero = torch.zeros((), device=loaded.device)
    terms = [{"recon": zero, "qa": zero, "kl": zero} for _ in items]
    tokens = [c[3] for c in compiled]
    with peft_model.disable_adapter():
        # questions: the teacher over each question's own segment, then the reader over the buffer
        qrows = [(d, q) for d, it in enumerate(items) for q in it[2]]
        if qrows:
            with torch.no_grad():
                need = [(d, q) for d, q in qrows if q.answer is None]
                if need:  # questions without a gold answer: the teacher's own, one at a time
                    from ..runtime.decode import decode

                    for d, q in need:
                        kv = compiled[d][2][q.segment]
                        q.answer = decode(model, kv, kv[0][0].shape[-2], [q.prompt], cfg.response_tokens,
                                          p.stop_ids)[0].tokens
                seqs = [q.prompt + q.answer for _, q in qrows]
                keep = min(len(q.prompt) for _, q in qrows) - 1
                ctx = [compiled[d][2][q.segment] for d, q in qrows]
                logits = read_rows(model, ctx, [c[0][0].shape[-2] for c in ctx], seqs, keep)
                teacher = [F.log_softmax(logits[i, len(q.prompt) - 1 - keep: len(seqs[i]) - 1 - keep].float(), dim=-1)
                           for i, (_, q) in enumerate(qrows)]
            logits = read_rows(model, [compiled[d][0] for d, _ in qrows], [compiled[d][1] for d, _ in qrows], seqs,
                               keep)
            sums: dict[int, list] = {}
            for i, (d, q) in enumerate(qrows):
                student = F.log_softmax(logits[i, len(q.prompt) - 1 - keep: len(seqs[i]) - 1 - keep].float(), dim=-1)
                kl = F.kl_div(student, teacher[i], log_target=True, reduction="sum")
                total, count = sums.get(d, (0.0, 0))
                sums[d] = (total + kl, count + len(teacher[i]))
                tokens[d] += 2 * len(seqs[i])
            for d, (total, count) in sums.items():
                terms[d]["qa"], terms[d]["qa_tokens"] = total / count, count
        if cfg.recon_weight:
            prompt = p.query_ids(RECONSTRUCT_INSTRUCTION)
            rrows = [d for d, it in enumerate(items) if it[0].recon is not None]
            if rrows:
                seqs = [prompt + items[d][0].recon for d in rrows]
                keep = len(prompt) - 1
                logits = read_rows(model, [compiled[d][0] for d in rrows], [compiled[d][1] for d in rrows], seqs, keep)
                for i, d in enumerate(rrows):
                    target = torch.tensor(items[d][0].recon, device=logits.device)
                    terms[d]["recon"] = F.cross_entropy(logits[i, : len(target)].float(), target)
                    tokens[d] += len(seqs[i])
        irows = [(d, t) for d, it in enumerate(items) for t in it[3]]
        if irows:
            keep = min(len(t.prompt) for _, t in irows) - 1
            logits = read_rows(model, [compiled[d][0] for d, _ in irows], [compiled[d][1] for d, _ in irows],
                               [t.prompt + t.response for _, t in irows], keep)
            sums = {}
            for i, (d, t) in enumerate(irows):
                total, count = sums.get(d, (0.0, 0))
                sums[d] = (total + topk_kl(logits, i, t, keep), count + len(t.response))
                tokens[d] += len(t.prompt) + len(t.response)
            for d, (total, count) in sums.items():
                terms[d]["kl"] = total / count
    return list(zip(terms, tokens))

"""`--compiler am`: Attention-Matching compaction in closed form, for any Llama-style model.

After Zweiger et al., "Fast KV Compaction via Attention Matching" (arXiv 2602.16284), in its
simplest form, which the prototype measured best on the embedded model (issue 18): no training,
no gradient, one forward pass.

1. Reference queries: the model reads the segment's context turn, then is asked to repeat it
   and is fed the segment again ("repeat-prefill"); the queries of that request and second
   copy, at every layer and head, are what later questions about the text look like to the
   keys (taken after the model's query norm where it has one, and rotated as it rotates them).
2. Per layer and KV head, each context position is scored by the attention mass those queries
   give it (softmax over the context, averaged over the queries and the query heads that share
   the KV head), and the K - 1 best positions are kept, in document order, after the first
   token, which stays as the attention sink.
3. Keys and values are copied. Each kept key is re-rotated from its position in the text to
   its entry index (RoPE rotations compose), so the buffer is an ordinary one at positions
   0..K-1 and composes, exports and reads like any cartridge. Values are not refitted: on the
   prototype a least-squares refit halved the error on the reference queries and *lowered* the
   answers' quality (queries that do not look like questions overfit).
4. With `bias`, each kept key also gets an attention bias log(w), w from non-negative least
   squares so that the kept keys' mass matches all keys' mass on the reference queries.

With `--steps N` the compacted buffer is then refined directly (refine.py).

Deterministic, and a few prefills of compute. The whole document is compacted at once when it
fits the model's window (the reference pass reads it twice), in segments beyond that.
"""

from __future__ import annotations

import math
import time

import torch

from ..buffer import Buffer
from ..config import CompileConfig
from ..errors import ModelMismatchError, UsageError
from ..format.cartridge import BIAS_LIMIT
from ..ingest import TextSegment
from ..progress import NO_PROGRESS, Progress
from ..runtime.bias import check_supported
from ..runtime.cache import cache_layers, forward, make_cache
from ..runtime.prompts import RECONSTRUCT_INSTRUCTION
from .base import CompilerSpec, SegmentResult, register
from .refine import refine_buffer
from .slots import entries


MAX_QUERIES = 512
# A kept key whose NNLS weight is 0 would be silenced: it keeps 1e-3 of its own mass instead.
MIN_WEIGHT = 1e-3


def _nnls(a: torch.Tensor, b: torch.Tensor, iterations: int = 300) -> torch.Tensor:
    """argmin ||a w - b|| subject to w >= 0, by accelerated projected gradient (FISTA) from
    w = 1 (no bias); a few hundred iterations of a [R, k] problem, per layer and head."""
    step = 1.0 / max(float(torch.linalg.matrix_norm(a, ord=2)) ** 2, 1e-12)
    w = y = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
    t = 1.0
    for _ in range(iterations):
        w_next = (y - step * (a.T @ (a @ y - b))).clamp(min=0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = w_next + (t - 1) / t_next * (w_next - w)
        w, t = w_next, t_next
    return w


class AttentionMatchingCompiler:
    name = "am"

    def __init__(self, loaded):
        self.loaded = loaded
        config = loaded.model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = loaded.facts.head_dim
        # the attention's own softmax scale (Llama: head_dim ** -0.5; some models set another)
        try:  # before any work: this model's queries must be readable
            for layer in loaded.family.layers(loaded.model):
                loaded.family.query_module(layer)
        except ModelMismatchError as exc:
            raise UsageError(f"--compiler am: {exc.message}", field="compiler") from None
        self.scale = float(loaded.family.attention_scale(loaded.model) or self.head_dim ** -0.5)

    def describe(self) -> dict:
        return {"name": self.name, "queries": "repeat-prefill", "values": "copied"}

    def _biases(self, q: torch.Tensor, key: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """[kv_heads, k] log-weights w >= 0 such that, for every reference query, the kept
        keys' attention mass times w matches the mass of all n keys (non-negative least
        squares): a kept key then also speaks for the dropped keys its queries favoured."""
        group = self.heads // self.kv_heads
        out = []
        for g in range(self.kv_heads):
            logits = (q[g * group: (g + 1) * group] @ key[g].T * self.scale).flatten(0, 1)  # [Rg, n]
            scaled = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
            target, kept = scaled.sum(-1), scaled[:, chosen[g]]  # [Rg], [Rg, k]
            w = _nnls(kept.double(), target.double())
            out.append(torch.log(w.clamp(min=MIN_WEIGHT)).float().clamp(-BIAS_LIMIT, BIAS_LIMIT))
        return torch.stack(out)

    def reference(self, text: str) -> tuple[int, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """(n, queries, kv) for a segment: its context turn's length, and per layer the reference
        queries [heads, R, head_dim] as the attention sees them (after the model's query norm,
        where it has one: families/), and after RoPE at their positions, with the
        context's keys (float32) and values [kv_heads, n, head_dim]."""
        loaded, p = self.loaded, self.loaded.prompter
        ctx = p.context_ids(text)
        n = len(ctx)
        repeat = p.query_ids(RECONSTRUCT_INSTRUCTION) + p.document_ids(text)[: n]
        with loaded.family.capture_queries(loaded.model) as captured:
            with torch.inference_mode():
                cache = make_cache(None)
                forward(loaded.model, cache, 0, input_ids=torch.tensor([ctx + repeat], device=loaded.device),
                        logits_to_keep=1)
                kv = [(key[0, :, :n].float(), value[0, :, :n]) for key, value in cache_layers(cache)]
                del cache
                # At most MAX_QUERIES reference queries, evenly spaced over the repeat: scoring is
                # queries x positions per head and layer, and a 3k-token document repeated gives
                # 3k queries (minutes of softmax) where a few hundred rank the keys the same way.
                pick = torch.linspace(0, len(repeat) - 1, min(len(repeat), MAX_QUERIES)).round().long()
                positions = (n + pick).to(loaded.device)
                queries = []
                for out in captured:
                    q_flat = out[0, n:].flatten(1)  # [positions, heads * head_dim]
                    q = q_flat[pick.to(q_flat.device)].float().reshape(len(pick), self.heads, self.head_dim)
                    queries.append(loaded.rope.shift(q.transpose(0, 1), positions))  # as the model rotates them
        return n, queries, kv

    def compile(self, segment: TextSegment, cfg: CompileConfig, progress: Progress = NO_PROGRESS) -> SegmentResult:
        # the start is built (and the reference pass's memory freed) before any refinement
        return refine_buffer(self.loaded, segment.text, self._compact(segment, cfg), cfg, progress)

    def _compact(self, segment: TextSegment, cfg: CompileConfig) -> SegmentResult:
        if cfg.bias:
            check_supported(self.loaded.model)  # a biased buffer this model could not read
        started = time.perf_counter()
        n, queries, kv = self.reference(segment.text)
        k, _ = entries(n, cfg.ratio, sink=True)
        rope = self.loaded.rope
        keys, values, biases = [], [], []
        with torch.inference_mode():
            for q, (key, value) in zip(queries, kv):
                chosen = self._choose(q, key, k)
                if cfg.bias:
                    biases.append(self._biases(q, key, chosen))
                gathered_k = key.gather(1, chosen[..., None].expand(-1, -1, self.head_dim))
                gathered_v = value.gather(1, chosen[..., None].expand(-1, -1, self.head_dim))
                # each kept key moves from its text position to its entry index
                deltas = torch.arange(k, device=key.device)[None, :] - chosen
                moved = torch.stack([rope.shift(gathered_k[h], deltas[h]) for h in range(self.kv_heads)])
                keys.append(moved.to(value.dtype))
                values.append(gathered_v.clone())
        buffer = Buffer(keys, values, torch.arange(k), biases or None)
        seconds = time.perf_counter() - started
        metrics = {"seconds": round(seconds, 3), "reference_queries": queries[0].shape[1]}
        if biases:  # how far the fit pushed: a bias at the limit stands for e^30 copies of its entry
            flat = torch.cat([b.flatten() for b in biases])
            metrics.update(bias_max=round(float(flat.max()), 3), bias_mean=round(float(flat.mean()), 3),
                           bias_at_floor=round(float((flat <= math.log(MIN_WEIGHT) + 1e-6).float().mean()), 4))
        return SegmentResult(buffer, n, metrics, sink=True)

    def _choose(self, q: torch.Tensor, key: torch.Tensor, k: int) -> torch.Tensor:
        """[kv_heads, k] context positions to keep: 0 (the sink), then the k - 1 positions
        the reference queries attend to most, in document order."""
        group = self.heads // self.kv_heads
        n = key.shape[1]
        chosen = []
        for g in range(self.kv_heads):
            qs = q[g * group: (g + 1) * group]  # [group, R, D]
            weights = torch.softmax(qs @ key[g].T * self.scale, dim=-1)  # [group, R, n]
            mass = weights.mean(dim=(0, 1))
            mass[0] = float("inf")  # the sink always stays
            top = torch.topk(mass, min(k, n)).indices.sort().values
            chosen.append(top)
        return torch.stack(chosen)


def _fit(cfg: CompileConfig, window: int | None) -> CompileConfig:
    """The reference pass reads the segment twice, plus its slots: shrink segments to fit."""
    if window and 2 * cfg.segment_tokens + cfg.segment_tokens / cfg.ratio + 64 > window:
        from dataclasses import replace

        return replace(cfg, segment_tokens=max(16, int((window - 64) / (2 + 1 / cfg.ratio))))
    return cfg


# Closed form, no steps; the whole document at once where its reference pass (the text twice)
# fits the window (`_fit` shrinks this to fit).
@register("am", fit=_fit, presets={q: {"steps": 0, "segment_tokens": 3500} for q in ("fast", "balanced", "best")})
def _build(spec: CompilerSpec, loaded) -> AttentionMatchingCompiler:
    return AttentionMatchingCompiler(loaded)

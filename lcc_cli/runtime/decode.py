"""The one decoding loop: several prompts after a shared cache prefix, decoded together.

The compiler's teacher uses it (greedy, keeping log-probabilities for the KL target) and so
does the reader (answers to questions, greedy or sampled, streamed when there is one row).
Prompts are left-padded so that every row's last prompt token is aligned; padding is masked
out, and each row's RoPE positions run on from `first_position` without gaps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import Layers, cache_kwargs, make_cache


@dataclass
class Decoded:
    tokens: list[int]
    logprobs: torch.Tensor | None  # [len(tokens), vocab] with keep_logprobs
    seconds_to_first_token: float
    seconds: float
    top: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, logprobs) [len(tokens), k] with top_k


def decode(model, prefix: Layers | list[Layers] | None, first_position: int | list[int], prompts: list[list[int]],
           max_new_tokens: int,
           stop_ids: set[int], temperature: float = 0.0, generator: torch.Generator | None = None,
           keep_logprobs: bool = False, on_token: Callable[[list[int]], None] | None = None,
           top_k: int = 0, on_step: Callable[[list[list[int]], list[bool]], bool] | None = None,
           placed: list[Placed | None] | None = None, stop_repeats: int = 0) -> list[Decoded]:
    """Decode every prompt after `prefix` (KV that every row shares, e.g. a buffer; or a list
    of one prefix per row, with a first position per row: rows that read different entries).
    A stop token ends its row and is kept in `tokens`. `keep_logprobs` keeps each step's
    full log-distribution, `top_k` only its k largest entries (a teacher target for
    thousands of rows). `on_token(tokens of row 0)` is called after each new token;
    `on_step(tokens of every row, done flags)` after each step, and a false return ends the
    decode there (a server whose clients all left).

    `placed` (per row, or None): the row's prompt tokens at explicit positions, some of them
    *between* prefix entries (pages re-encoded at read time, in the question's own pass). The
    first pass then masks by position (`Placed`); `first_position` is not used for such a row.
    `stop_repeats`: a row ends once it loops (`looping`: a cycle of 2-4 tokens repeated that
    many times in a row, such as "P.P.P.P.", or a longer one a few times); 0 never ends one."""
    start = time.perf_counter()
    batch = len(prompts)
    device = next(model.parameters()).device
    ids, mask, first_mask, positions, cache = first_pass(prefix, first_position, prompts, placed, device)
    logits = model(input_ids=ids, attention_mask=first_mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **cache_kwargs(model, cache)).logits[:, -1]
    next_pos = positions[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in prompts]
    steps: list[list[torch.Tensor]] = [[] for _ in prompts]
    tops: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in prompts]
    done = [False] * batch
    first_token = None
    for _ in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1)
        pick = logp.argmax(-1) if temperature <= 0 else _sample(logits, temperature, generator)
        best = logp.topk(top_k, dim=-1) if top_k else None
        if first_token is None:
            first_token = time.perf_counter() - start
        for i in range(batch):
            if not done[i]:
                tokens[i].append(int(pick[i]))
                if keep_logprobs:
                    steps[i].append(logp[i])
                if best is not None:
                    tops[i].append((best.indices[i], best.values[i]))
                done[i] = int(pick[i]) in stop_ids or bool(stop_repeats and looping(tokens[i], stop_repeats))
        if on_token is not None and not done[0]:
            on_token(tokens[0])
        if on_step is not None and on_step(tokens, done) is False:
            break
        if all(done):
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device=device)], dim=1)
        logits = model(input_ids=pick[:, None], attention_mask=mask, position_ids=next_pos[:, None], use_cache=True,
                       **cache_kwargs(model, cache)).logits[:, -1]
        next_pos = next_pos + 1
    total = time.perf_counter() - start
    return [Decoded(t, torch.stack(s) if keep_logprobs and s else None, first_token or total, total,
                    (torch.stack([a for a, _ in tp]), torch.stack([b for _, b in tp])) if tp else None)
            for t, s, tp in zip(tokens, steps, tops)]


def looping(tokens: list[int], repeats: int) -> bool:
    """True when the tokens end in a loop: a cycle of 2-4 tokens repeated `repeats` times, or
    of 5-8 tokens repeated (at least 3) times ("that the document says that the document
    says..."). A run of one token is not a cycle: "....." or "----" can be text."""
    for period in range(2, 9):
        times = repeats if period <= 4 else max(3, repeats - 1)
        span = period * times
        if len(tokens) >= span:
            cycle = tokens[-period:]
            if len(set(cycle)) > 1 and tokens[-span:] == cycle * times:
                return True
    return False


def first_pass(prefix, first_position, prompts: list[list[int]], placed, device):
    """(ids, padding mask, the first pass's mask, positions, cache) for the prompts, left-padded
    so that every row's last prompt token is aligned: `decode`'s first pass, and the trainer's
    (training/prefix.py) with a trained prefix in each row's cache."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    firsts = first_position if isinstance(first_position, list) else [first_position] * batch
    ragged = bool(prefix) and isinstance(prefix[0], list)  # a prefix per row (rows read different entries)
    if ragged:
        prefix, lengths = _stack_left_padded(prefix)
    else:
        lengths = [prefix[0][0].shape[-2] if prefix else 0] * batch
    cached = prefix[0][0].shape[-2] if prefix else 0
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask = torch.zeros(batch, cached + width, dtype=torch.long, device=device)
    mask[:, :cached] = 1
    if ragged:
        for i, n in enumerate(lengths):
            mask[i, :cached - n] = 0  # a shorter row's padding entries are never attended to
    positions = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        pad = width - len(p)
        ids[i, pad:] = torch.tensor(p)
        mask[i, cached + pad:] = 1
        if placed and placed[i] is not None:
            positions[i, pad:] = torch.as_tensor(placed[i].positions)
        else:
            positions[i] = torch.arange(firsts[i] - pad, firsts[i] - pad + width)
    first_mask = mask
    if placed and any(p is not None for p in placed):
        first_mask = _placed_mask(mask, positions, placed, lengths, cached, device)
    return ids, mask, first_mask, positions, make_cache(prefix, batch=batch)


@dataclass
class Placed:
    """A row whose prompt tokens sit at explicit positions, some of them before entries already
    in its cache (the end of a context turn laid after pages that are encoded now).
    `positions`: one per prompt token; `cached`: the positions of the row's cache entries."""

    positions: list[int]
    cached: torch.Tensor  # int64 [entries]


def _placed_mask(mask: torch.Tensor, positions: torch.Tensor, placed: list[Placed | None], lengths: list[int],
                 cached: int, device) -> torch.Tensor:
    """The first pass's mask by position, [batch, 1, tokens, cache + tokens] (True = attend): a
    token sees the cache entries at earlier positions and the new tokens at its own position or
    before; padding is seen by nothing. For a row whose cache lies wholly before its prompt
    this is the ordinary causal mask with padding."""
    batch, width = positions.shape
    stored_pos = torch.full((batch, cached), -1, dtype=torch.long, device=device)
    for i, p in enumerate(placed):
        n = lengths[i]
        if n:
            stored_pos[i, cached - n:] = p.cached.to(device) if p is not None else -1  # -1: before every token
    valid = mask.bool()
    sees_cache = (stored_pos[:, None, :] < positions[:, :, None]) & valid[:, None, :cached]
    sees_new = (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, cached:]
    out = torch.cat([sees_cache, sees_new], dim=-1)
    pad = ~valid[:, cached:]  # a padding token sees itself only (a row of nothing would be NaN)
    out[:, :, cached:] |= torch.diag_embed(pad)
    return out[:, None]


def _stack_left_padded(prefixes: list[Layers]) -> tuple[Layers, list[int]]:
    """Per-row prefixes ([1, kv_heads, n_i, D] per layer) as one batch, each row left-padded
    with zeros to the longest (the caller masks the padding out). RoPE is baked into stored
    keys, so a row's entries keep their positions wherever they sit in the cache."""
    lengths = [p[0][0].shape[-2] for p in prefixes]
    width = max(lengths)
    out = []
    for layer in range(len(prefixes[0])):
        ks, vs = [], []
        for p, n in zip(prefixes, lengths):
            k, v = p[layer]
            pad = (0, 0, width - n, 0)
            ks.append(torch.nn.functional.pad(k, pad))
            vs.append(torch.nn.functional.pad(v, pad))
        out.append((torch.cat(ks), torch.cat(vs)))
    return out, lengths


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)

"""The reading engine: every answer lcc gives is built, decoded and timed here.

`lcc ask`, `chat`, `ask --questions`, libraries, the server (whose engine only schedules and
batches), every condition of `lcc eval` (the baselines too) and the compile-time self-check
call `answer_rows`; nothing else calls `decode` for an answer.

A `Row` is one question and what it reads: a `View` (stored KV entries in the cache, and
tokens encoded at read time: a document in the prompt, or an indexed cartridge's pages
re-encoded) and the prompt's turns after the context turn. The engine lays the reading prefix
(runtime/prefix.py) first and the view after it, checks every row against the model's
window before any decodes, sets attention biases, and decodes: the tokens read now and the
question's prompt go through one forward pass, so a re-encoded read costs what retrieval's
prefill of the same text costs.

Rows that read the same view decode together after it; rows that read different views decode
in one batch, each reading only its own entries (left-padded and masked), unless a view
carries attention biases (one biased buffer at a time: runtime/bias.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Hashable

import torch

from ..buffer import Buffer
from ..config import AskConfig
from .bias import slot_biases
from . import decode as decoding
from .decode import Placed
from .text import TextStream, answer_text, check_window


@dataclass(frozen=True)
class Page:
    """One page a read chose: what `--show-pages` prints, the server's `lcc.pages` lists and
    the Python API returns. Its text is the token ids of the entries read, decoded (taken from
    the cartridge, never from an index)."""

    cartridge: str  # the cartridge's name (its file name, or "cartridge N")
    source: str | None  # the document it was compiled from
    page: int  # the page's number in its cartridge
    start: int  # its first entry in the cartridge
    entries: int  # entries read: fewer than page_entries when it was cut past the floor
    page_entries: int
    reencoded: int  # of those, tokens re-encoded at read time
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class View:
    """What one question reads, before the prompt: `buffer`, KV entries already encoded
    (laid out at their positions), and `fresh`, token ids encoded now at `fresh_positions`
    (the whole context turn for a document in the prompt; an indexed cartridge's chosen pages
    when they are re-encoded, between its stored header and end of turn). `pages`: what an
    indexed read chose (`--show-pages`), `key`: equal for views that read the same, `seconds`:
    the time spent choosing and reading it (part of the time to first token)."""

    buffer: Buffer | None = None
    fresh: list[int] = field(default_factory=list)
    fresh_positions: list[int] = field(default_factory=list)
    pages: list[Page] | None = None
    key: Hashable = ()
    seconds: float = 0.0
    # False for the plain model's own system turn, with no document: the reading prefix is a
    # reading skill, so the engine reads such a view without it (its answers stay the model's)
    document: bool = True

    @classmethod
    def text(cls, ids: list[int], key: Hashable = None, document: bool = True) -> View:
        """Token ids read as text from position 0 (a context turn in the prompt)."""
        return cls(None, list(ids), list(range(len(ids))), key=("text", tuple(ids)) if key is None else key,
                   document=document)

    @property
    def stored(self) -> int:
        return self.buffer.slots if self.buffer is not None else 0

    @property
    def end(self) -> int:
        """Where the prompt's first token goes: one past the largest position read."""
        stored = self.buffer.first_query_position if self.stored else 0
        return max(stored, max(self.fresh_positions) + 1 if self.fresh else 0)

    @property
    def bias(self):
        return self.buffer.bias if self.buffer is not None else None

    def after(self, prefix: Buffer | None, rope) -> View:
        """The view read after `prefix` (the reading prefix, at positions 0..P-1): every entry
        and fresh token moved P positions on (keys re-rotated), so distances are kept."""
        if prefix is None or not prefix.slots:
            return self
        shift = prefix.first_query_position
        buffer = prefix if not self.stored else Buffer.concat([prefix, self.buffer.moved(rope, shift)])
        return replace(self, buffer=buffer, fresh_positions=[p + shift for p in self.fresh_positions])

    def settled(self, loaded) -> View:
        """The same view with its fresh tokens encoded into the buffer (once, for rows that
        share it), every entry in position order. The time it took is added to `seconds`."""
        if not self.fresh:
            return self
        from .cache import cache_layers, forward_rows, make_cache, prefill

        started = time.perf_counter()
        device = loaded.device
        positions = torch.tensor(self.fresh_positions)
        with torch.inference_mode(), slot_biases(loaded.model, self.bias):
            if not self.stored and self.fresh_positions == list(range(positions[0], positions[0] + len(self.fresh))):
                layers, _ = prefill(loaded.model, self.fresh, int(positions[0]))  # plain text: the ordinary pass
            else:
                # a fresh token sees stored entries before it and fresh tokens at or before it
                cached = self.buffer.positions if self.stored else torch.zeros(0, dtype=torch.long)
                mask = torch.cat([cached[None, :] < positions[:, None], positions[None, :] <= positions[:, None]], 1)
                cache = make_cache(self.buffer.cache_layers() if self.stored else None)
                forward_rows(loaded.model, cache, positions[None].to(device), mask[None, None].to(device),
                             input_ids=torch.tensor([self.fresh], device=device), logits_to_keep=1)
                layers = cache_layers(cache)
        new = Buffer.from_cache_layers([(k[:, :, -len(self.fresh):], v[:, :, -len(self.fresh):])
                                        for k, v in layers], positions)
        buffer = new if not self.stored else Buffer.concat([self.buffer, new.to(dtype=self.buffer.dtype)])
        order = torch.argsort(buffer.positions, stable=True)  # each encoded token where its stored copy was
        if not torch.equal(order, torch.arange(buffer.slots)):
            buffer = buffer.take(order)
        return replace(self, buffer=buffer, fresh=[], fresh_positions=[],
                       seconds=self.seconds + time.perf_counter() - started)


@dataclass
class Row:
    """One question to answer: what it reads, and its prompt (the turns after the context
    turn, as token ids)."""

    view: View
    prompt: list[int]
    question: str = ""


@dataclass
class Answer:
    question: str
    text: str
    token_ids: list[int]
    seconds_to_first_token: float
    seconds_total: float
    kv_positions: int  # stored KV entries the question attended to (the reading prefix's included)
    prompt_tokens: int  # tokens encoded at question time: the prompt, and any text or page re-encoded
    pages: list[Page] | None = None  # an indexed read's pages (runtime/memory/paged.py); None: not a paged read
    prefix: str | None = None  # the reading prefix read before the context turn (its name), if any

    def to_dict(self, mode: str | None = None) -> dict:
        """What `lcc ask --json` prints."""
        out = {"answer": self.text, "mode": mode, "question": self.question,
               "seconds_to_first_token": round(self.seconds_to_first_token, 4),
               "seconds_total": round(self.seconds_total, 4), "kv_positions": self.kv_positions,
               "prompt_tokens": self.prompt_tokens, "new_tokens": len(self.token_ids), "prefix": self.prefix}
        if self.pages is not None:
            out["pages"] = [p.to_dict() for p in self.pages]
            if not self.pages:
                out["note"] = NO_PAGES
        return out


NO_PAGES = "no page of the library matches the question: answered without it"


def row_end(view: View, prompt: list[int], prefix: Buffer | None) -> int:
    """The position after a row's prompt (where its answer starts)."""
    return (prefix.slots if prefix is not None and view.document else 0) + view.end + len(prompt)


def check_rows(loaded, rows: list[Row], max_new_tokens: int, prefix: Buffer | None = None,
               what: str = "the question") -> None:
    """WindowError for the first row whose prompt and answer would run past the model's window."""
    for row in rows:
        check_window(loaded, row_end(row.view, row.prompt, prefix), max_new_tokens, what)


def answer_rows(loaded, rows: list[Row], cfg: AskConfig | None = None, prefix=None, batch: bool = True,
                on_text: Callable[[str], None] | None = None,
                on_step: Callable[[list[list[int]], list[bool]], bool] | None = None,
                max_new_tokens: int | None = None) -> list[Answer]:
    """Answer every row (runtime.reading.Answer, in order). `prefix`: a ReadingPrefix read
    before every row's context turn, or None. `batch=False` answers each row alone, so that an
    answer never depends on which others were asked with it; `on_text(piece)` streams a lone
    row's answer; `on_step(tokens per row, done flags)` sees every step (the server's streams
    and cancellation; a false return stops). Every row is checked against the window first."""
    cfg = cfg or AskConfig()
    max_new = max_new_tokens or cfg.max_new_tokens
    kv = prefix.buffer if prefix is not None else None
    check_rows(loaded, rows, max_new, kv)
    rope = loaded.rope if kv is not None else None
    views: dict[Hashable, View] = {}  # rows with one key read one view, moved and encoded once
    for r in rows:
        if r.view.key not in views:
            views[r.view.key] = _on_device(r.view, loaded).after(kv if r.view.document else None, rope)
    rows = [replace(r, view=views[r.view.key]) for r in rows]
    groups = _groups(rows, batch)
    if on_step is not None and len(groups) > 1:
        raise ValueError("on_step needs rows that decode as one batch")
    generator = torch.Generator().manual_seed(cfg.seed)
    out: list[Answer | None] = [None] * len(rows)
    for group in groups:
        stream = on_text if len(group) == 1 else None
        for i, a in zip(group, _decode_group(loaded, [rows[i] for i in group], cfg, max_new, generator, stream,
                                             on_step)):
            out[i] = replace(a, prefix=prefix.name if prefix is not None and rows[i].view.document else None)
    return out


def _on_device(view: View, loaded) -> View:
    b = view.buffer
    if b is None or (b.device, b.dtype) == (loaded.device, loaded.dtype):
        return view
    return replace(view, buffer=b.to(loaded.device, loaded.dtype))


def _groups(rows: list[Row], batch: bool) -> list[list[int]]:
    """Which rows decode together: alone without `batch`; else rows that read one view
    together, and those groups in one batch when no view carries biases."""
    if not batch:
        return [[i] for i in range(len(rows))]
    by_view: dict[Hashable, list[int]] = {}
    for i, r in enumerate(rows):
        by_view.setdefault(r.view.key, []).append(i)
    groups = list(by_view.values())
    if len(groups) > 1 and all(rows[g[0]].view.bias is None for g in groups):
        return [[i for g in groups for i in g]]
    return groups


def _decode_group(loaded, rows: list[Row], cfg: AskConfig, max_new: int, generator, on_text, on_step) -> list[Answer]:
    p = loaded.prompter
    views: dict[int, View] = {}
    for r in rows:  # a view read by several rows is encoded once, before all of them
        if id(r.view) not in views:
            shared = sum(1 for s in rows if s.view is r.view) > 1
            views[id(r.view)] = r.view.settled(loaded) if shared and r.view.fresh else r.view
    settled = [views[id(r.view)] for r in rows]
    prompts, placed = [], []
    for v, r in zip(settled, rows):
        prompts.append(v.fresh + r.prompt)
        if v.fresh:
            start = v.end
            placed.append(Placed(v.fresh_positions + list(range(start, start + len(r.prompt))),
                                 v.buffer.positions if v.stored else torch.zeros(0, dtype=torch.long)))
        else:
            placed.append(None)
    firsts = [v.end for v in settled]
    one = all(v is settled[0] for v in settled)
    if one:
        prefix = settled[0].buffer.cache_layers() if settled[0].stored else None
        first: int | list[int] = firsts[0]
    elif all(not v.stored for v in settled):
        prefix, first = None, firsts
    else:  # rows that read different entries: one cache each, left-padded and masked
        empty = _empty_like(next(v.buffer for v in settled if v.stored))
        prefix = [(v.buffer if v.stored else empty).cache_layers() for v in settled]
        first = firsts
    # tokens only at the positions they would take anyway: the ordinary (2-D) mask is exact
    if all(pl is None or _contiguous(pl, v) for pl, v in zip(placed, settled)):
        placed_arg = None
        first = [pl.positions[0] if pl is not None else f for pl, f in zip(placed, firsts)] if any(placed) else first
    else:
        placed_arg = placed
    stream = TextStream(loaded.tokenizer, p.stop_ids, on_text).push if on_text else None
    with torch.inference_mode(), slot_biases(loaded.model, settled[0].bias if one else None):
        results = decoding.decode(loaded.model, prefix, first, prompts, max_new, p.stop_ids, cfg.temperature,
                                  generator, on_token=stream, on_step=on_step, placed=placed_arg,
                                  stop_repeats=cfg.stop_repeats)
    out = []
    for r, v, d in zip(rows, settled, results):
        tokens, text = answer_text(loaded.tokenizer, d.tokens, p.stop_ids)
        out.append(Answer(r.question, text.strip(), tokens, d.seconds_to_first_token + v.seconds,
                          d.seconds + v.seconds, r.view.stored, len(r.view.fresh) + len(r.prompt), r.view.pages))
    return out


def _contiguous(placed: Placed, view: View) -> bool:
    """True when a row's fresh tokens all come after its stored entries, in order: plain text
    after a cache, which the ordinary mask reads exactly."""
    pos = placed.positions
    after = not view.stored or pos[0] > int(view.buffer.positions.max())
    return after and pos == list(range(pos[0], pos[0] + len(pos)))


def _empty_like(buffer: Buffer) -> Buffer:
    return Buffer([k[:, :0] for k in buffer.keys], [v[:, :0] for v in buffer.values],
                  buffer.positions[:0])

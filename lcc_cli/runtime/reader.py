"""The reader: the frozen base model answering from a buffer, from the document in the
prompt, or from nothing, through one decoding loop so that the conditions compare fairly.

With a buffer the model's cache holds only the buffer KV (the hard bottleneck: the question
can attend to nothing else), and the question starts at the buffer's first query position.
No LoRA exists anywhere on this path. Questions longer than the model's window are refused
with the numbers, instead of decoding nonsense for minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..buffer import Buffer
from ..config import AskConfig
from .bias import slot_biases
from .decode import decode
from .text import TextStream, answer_text, check_window


@dataclass
class Answer:
    question: str
    text: str
    token_ids: list[int]
    seconds_to_first_token: float
    seconds_total: float
    kv_positions: int  # buffer entries the question attended to (0 with the document in the prompt)
    prompt_tokens: int  # tokens prefilled at question time
    pages: list[dict] | None = None  # an indexed cartridge's pages the question read (memory.Paged)


def answer(loaded, questions: list[str], buffer: Buffer | None = None, document: str | None = None,
           cfg: AskConfig | None = None, on_text=None, batch: bool = False) -> list[Answer]:
    """Answer each question from `buffer` (cartridges), or with `document` in the prompt, or
    from nothing. One row at a time by default, so that an answer does not depend on which
    other questions were asked with it; `batch=True` decodes them together (eval: faster,
    and every condition is batched alike). `on_text(piece)` streams a single answer."""
    cfg = cfg or AskConfig()
    p = loaded.prompter
    if buffer is not None:
        if buffer.device != loaded.device or buffer.dtype != loaded.dtype:
            buffer = buffer.to(loaded.device, loaded.dtype)
        prefix, first = buffer.cache_layers(), buffer.first_query_position
        prompts = [p.query_ids(q) for q in questions]
        shared_s = 0.0
    elif batch and len(questions) > 1:
        # the context turn is the same for every row: prefill it once and decode every question
        # after it (the same KV and positions as each row reading it in its own prompt)
        from .cache import prefill

        context = p.context_ids(document)
        started = time.perf_counter()
        with torch.inference_mode():
            prefix, _ = prefill(loaded.model, context)
        shared_s = time.perf_counter() - started  # every row waited for it: part of its time to first token
        first = len(context)
        prompts = [p.query_ids(q) for q in questions]
    else:
        prefix, first = None, 0
        context = p.context_ids(document)
        prompts = [context + p.query_ids(q) for q in questions]
        shared_s = 0.0
    for q, prompt in zip(questions, prompts):
        check_window(loaded, first + len(prompt), cfg.max_new_tokens)
    generator = torch.Generator().manual_seed(cfg.seed)
    groups = [list(range(len(prompts)))] if batch else [[i] for i in range(len(prompts))]
    out: list[Answer | None] = [None] * len(prompts)
    with torch.inference_mode(), slot_biases(loaded.model, buffer.bias if buffer is not None else None):
        for group in groups:
            stream = TextStream(loaded.tokenizer, p.stop_ids, on_text).push if on_text and len(group) == 1 else None
            results = decode(loaded.model, prefix, first, [prompts[i] for i in group], cfg.max_new_tokens,
                             p.stop_ids, cfg.temperature, generator, on_token=stream)
            for i, r in zip(group, results):
                tokens, text = answer_text(loaded.tokenizer, r.tokens, p.stop_ids)
                out[i] = Answer(questions[i], text.strip(), tokens, r.seconds_to_first_token + shared_s, r.seconds + shared_s,
                                buffer.slots if buffer is not None else 0,
                                len(prompts[i]) + (first if buffer is None else 0))
    return out


def answer_each(loaded, questions: list[str], buffers: list[Buffer], cfg: AskConfig | None = None) -> list[Answer]:
    """Each question from its own buffer (an indexed cartridge's pages, chosen per question),
    all decoded in one batch: each row reads only its own entries (shorter ones are padded and
    masked). Buffers with attention biases are answered one at a time."""
    cfg = cfg or AskConfig()
    if len(questions) == 1 or any(b.bias is not None for b in buffers):
        return [answer(loaded, [q], buffer=b, cfg=cfg)[0] for q, b in zip(questions, buffers)]
    p = loaded.prompter
    buffers = [b if (b.device, b.dtype) == (loaded.device, loaded.dtype) else b.to(loaded.device, loaded.dtype)
               for b in buffers]
    prompts = [p.query_ids(q) for q in questions]
    for b, prompt in zip(buffers, prompts):
        check_window(loaded, b.first_query_position + len(prompt), cfg.max_new_tokens)
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.inference_mode():
        results = decode(loaded.model, [b.cache_layers() for b in buffers], [b.first_query_position for b in buffers],
                         prompts, cfg.max_new_tokens, p.stop_ids, cfg.temperature, generator)
    out = []
    for q, b, prompt, r in zip(questions, buffers, prompts, results):
        tokens, text = answer_text(loaded.tokenizer, r.tokens, p.stop_ids)
        out.append(Answer(q, text.strip(), tokens, r.seconds_to_first_token, r.seconds, b.slots, len(prompt)))
    return out


def check_fits(loaded, question: str, buffer: Buffer | None = None, document: str | None = None,
               cfg: AskConfig | None = None) -> None:
    """UsageError if `question` would not fit the model's window (as `answer` would say)."""
    cfg = cfg or AskConfig()
    p = loaded.prompter
    if buffer is not None:
        end = buffer.first_query_position + len(p.query_ids(question))
    else:
        end = len(p.context_ids(document)) + len(p.query_ids(question))
    check_window(loaded, end, cfg.max_new_tokens)

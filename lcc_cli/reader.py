"""The reader: the frozen base model answering from a cartridge, from the full document,
or from nothing, with one decoding loop for all three so that they compare fairly.

With a cartridge the model's cache holds only the buffer KV (the hard bottleneck: the
question can attend to nothing else), and the question starts at the position the
cartridge records. No LoRA exists anywhere on this path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import AskConfig
from .kvcache import KV, forward, make_cache
from .prompts import Prompter


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    seconds_to_first_token: float
    seconds_total: float
    kv_positions: int  # cache length the question attended to: the KV memory held
    prompt_tokens: int  # tokens prefilled at question time
    stats: dict = field(default_factory=dict)


def generate(model, tokenizer, kv: KV | None, first_position: int, prompt_ids: list[int], cfg: AskConfig,
             stop_ids: set[int], on_text: Callable[[str], None] | None = None) -> Answer:
    """Prefill `prompt_ids` after `kv` (at RoPE positions first_position..) and decode."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    cache = make_cache(kv)
    cached = cache.get_seq_length()
    position = first_position
    out: list[int] = []
    shown = ""
    ttft = None
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], device=model.device)
        logits = forward(model, cache, position, input_ids=ids, logits_to_keep=1)[0, -1]
        position += len(prompt_ids)
        for _ in range(cfg.max_new_tokens):
            token = _pick(logits, cfg.temperature, generator)
            if ttft is None:
                ttft = time.perf_counter() - start
            if token in stop_ids:
                break
            out.append(token)
            if on_text is not None:
                text = tokenizer.decode(out, skip_special_tokens=True)
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    on_text(text[len(shown):])
                    shown = text
            logits = forward(model, cache, position, input_ids=torch.tensor([[token]], device=model.device),
                             logits_to_keep=1)[0, -1]
            position += 1
    text = tokenizer.decode(out, skip_special_tokens=True).strip()
    total = time.perf_counter() - start
    return Answer(text, out, ttft if ttft is not None else total, total, cached, len(prompt_ids))


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def answer_from_kv(loaded, kv: KV, first_position: int, question: str, cfg: AskConfig | None = None,
                   on_text=None) -> Answer:
    """Answer with a cache that holds only buffer KV (a cartridge or several)."""
    p = Prompter(loaded.tokenizer)
    return generate(loaded.model, loaded.tokenizer, kv, first_position, p.query_ids(question),
                    cfg or AskConfig(), p.stop_ids, on_text)


def answer_from_text(loaded, question: str, document: str | None, cfg: AskConfig | None = None,
                     on_text=None) -> Answer:
    """Answer with the document in the prompt (`full`), or with no document (`none`)."""
    p = Prompter(loaded.tokenizer)
    ids = p.context_ids(document) + p.query_ids(question)
    return generate(loaded.model, loaded.tokenizer, None, 0, ids, cfg or AskConfig(), p.stop_ids, on_text)

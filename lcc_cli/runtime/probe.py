"""The reconstruction-fidelity probe behind `lcc verify --probe`: how much of its source a
cartridge reproduces, read the way the compiler trained it to (teacher-forced)."""

from __future__ import annotations

from ..errors import CartridgeError


def probe_fidelity(cart, loaded, source_text: str) -> dict:
    """Reconstruction fidelity: the fraction of the source's tokens that the cartridge
    reproduces, teacher-forced (the reader, given each segment's buffer and the "repeat the
    document" instruction, predicts every next source token; we count exact hits)."""
    import torch

    from ..config import CompileConfig
    from ..ingest import split_text, token_spans_of
    from .bias import slot_biases
    from .cache import forward, make_cache
    from .prompts import RECONSTRUCT_INSTRUCTION

    cfg = CompileConfig.from_dict(cart.manifest["compile"], strict=False)
    texts = split_text(source_text, token_spans_of(loaded.tokenizer), cfg.segment_tokens)
    buffers = cart.segment_buffers()
    if len(texts) != len(buffers):
        raise CartridgeError(f"source splits into {len(texts)} segments, cartridge has {len(buffers)}")
    p = loaded.prompter
    prompt = p.query_ids(RECONSTRUCT_INSTRUCTION)
    hits = total = 0
    with torch.inference_mode():
        for text, buffer in zip(texts, buffers):
            target = p.document_ids(text)
            buffer = buffer.to(loaded.device, loaded.dtype)
            cache = make_cache(buffer.cache_layers())
            with slot_biases(loaded.model, buffer.bias):
                logits = forward(loaded.model, cache, buffer.first_query_position,
                                 input_ids=torch.tensor([prompt + target], device=loaded.device))[0]
            pred = logits[len(prompt) - 1: len(prompt) + len(target) - 1].argmax(-1)
            hits += int((pred == torch.tensor(target, device=loaded.device)).sum())
            total += len(target)
    return {"fidelity": hits / total, "tokens": total, "segments": len(texts)}

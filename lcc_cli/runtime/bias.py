"""Per-entry attention biases of a buffer, added through transformers' AttentionInterface.

A buffer may carry, per layer, a bias [kv_heads, T] for its T entries: a number added to the
attention logit of every query head that shares the KV head, for that entry. A compacted
buffer keeps K of n keys; a bias of log(w) lets one kept key stand for the attention mass of
w keys it replaced (Attention Matching, arXiv 2602.16284), and direct KV refinement may learn
it like the keys and values.

The model's attention implementation is swapped at load for `lcc_sdpa`: transformers' own
SDPA function, plus the bias of the buffer being read when there is one (as SDPA's additive
`position_bias`, which it merges with the causal and padding mask). The bias reaches the
attention function as an attribute of each attention module, set for the duration of a read
by `slot_biases`; without one the function is exactly SDPA. Buffer entries are always the
first cache entries, so the bias covers the first T keys and the rest get 0.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import ModelMismatchError

NAME = "lcc_sdpa"
_ATTR = "lcc_slot_bias"
_registered = False


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bias = getattr(module, _ATTR, None)
    if bias is not None:
        heads, t = query.shape[1], bias.shape[-1]
        per_head = bias.to(query.dtype).repeat_interleave(heads // bias.shape[0], dim=0)  # [heads, T]
        rest = per_head.new_zeros(heads, key.shape[2] - t)
        kwargs["position_bias"] = torch.cat([per_head, rest], dim=-1)[None, :, None, :]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install(model) -> None:
    """Route the model's attention through `lcc_sdpa` (registered once per process), when it
    uses SDPA; other implementations are left alone and cannot read biased buffers."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA gets
        _registered = True
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]


def check_supported(model) -> None:
    """ModelMismatchError unless this model reads attention biases (its attention is `lcc_sdpa`):
    called before work that would produce or need biases, not after it."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        raise ModelMismatchError("attention biases are added through SDPA attention; this model uses "
                                 f"{getattr(model.config, '_attn_implementation', None)!r}")


@contextmanager
def slot_biases(model, bias: list[torch.Tensor] | None):
    """Read with `bias` (per layer [kv_heads, T]) on the first T cache entries; None: plain.
    The biases live on the model's attention modules for the duration, so one model reads one
    biased buffer at a time (the server decodes on a single engine thread); a nested call
    restores the outer call's biases when it ends."""
    if bias is None:
        yield
        return
    check_supported(model)
    modules = _attention_modules(model)
    if len(modules) != len(bias):
        raise ModelMismatchError(f"the buffer has biases for {len(bias)} layers, the model has {len(modules)}")
    outer = [getattr(module, _ATTR, None) for module in modules]
    for module in modules:
        setattr(module, _ATTR, bias[module.layer_idx])
    try:
        yield
    finally:
        for module, previous in zip(modules, outer):
            if previous is None:
                if hasattr(module, _ATTR):
                    delattr(module, _ATTR)
            else:
                setattr(module, _ATTR, previous)

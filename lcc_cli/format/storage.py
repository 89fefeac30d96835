"""How a cartridge's keys and values are stored (format v3): float, or quantised to 8 or 4 bits.

Every tensor is entry-major (its first axis is the cache entry), so that a range of entries is
one contiguous byte range of each tensor and can be read without the others:

| tensor     | shape                          | what                                        |
|------------|--------------------------------|---------------------------------------------|
| `k`, `v`   | [T, layers, kv_heads, D or D/2] | keys (RoPE applied) and values              |
| `b`        | [T, layers, kv_heads] float32   | attention biases, when the cartridge has them |
| `k.scale`  | [blocks, layers, kv_heads, D]   | int8/int4: a scale per key channel per block |
| `k.min`    | [blocks, layers, kv_heads, D]   | int4: the channel's minimum per block        |
| `v.scale`  | [T, layers, kv_heads]           | int8/int4: a scale per entry and head        |
| `v.min`    | [T, layers, kv_heads]           | int4: the entry's minimum                    |

Quantisation follows KIVI and KVQuant: keys per channel (a few channels of a key carry
outliers across all tokens, so a channel shares one range), over a block of entries; values per
token. int8 is symmetric (absmax: x = q * scale, q in -127..127); int4 is asymmetric (x = min +
q * scale, q in 0..15, two to a byte, the even channel in the low nibble). Scales and minima are
float16. At the embedded model's 11,520 values a token: float32 46,080 bytes, bfloat16 23,040,
int8 11,880, int4 6,480 (blocks of 64 entries).

Nothing here needs a model: this is bytes.
"""

from __future__ import annotations

import torch

FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTISED = ("int8", "int4")
STORAGE = (*FLOAT, *QUANTISED)
# Per-block tensors have a row per block; every other stored tensor a row per entry.
BLOCK_TENSORS = ("k.scale", "k.min")


def bytes_per_entry(storage: str, layers: int, kv_heads: int, head_dim: int, block: int) -> float:
    """Stored bytes per cache entry (keys and values, with their scales; no biases)."""
    values = layers * kv_heads * head_dim
    if storage in FLOAT:
        return 2 * values * FLOAT[storage].itemsize
    heads = layers * kv_heads
    if storage == "int8":
        return 2 * values + 2 * values / block + 2 * heads
    return values + 4 * values / block + 4 * heads  # int4: half a byte a value, scale and min


def encode(keys: list[torch.Tensor], values: list[torch.Tensor], storage: str, block: int,
           bias: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-layer keys and values [kv_heads, T, D] to the stored tensors."""
    k = torch.stack([t.detach().float().cpu() for t in keys], dim=1).transpose(0, 2).contiguous()  # [T, L, H, D]
    v = torch.stack([t.detach().float().cpu() for t in values], dim=1).transpose(0, 2).contiguous()
    t = k.shape[0]
    out: dict[str, torch.Tensor] = {}
    if storage in FLOAT:
        out["k"], out["v"] = k.to(FLOAT[storage]), v.to(FLOAT[storage])
    elif storage == "int8":
        out["k.scale"] = _scale(_block_stat(k.abs(), block, torch.amax) / 127)
        out["k"] = _q8(k / _rows(out["k.scale"], t, block))
        scale = _scale(v.abs().amax(-1, keepdim=True) / 127)
        out["v"], out["v.scale"] = _q8(v / scale.float()), scale[..., 0]
    elif storage == "int4":
        low, high = _block_stat(k, block, torch.amin), _block_stat(k, block, torch.amax)
        out["k.scale"], out["k.min"] = _scale((high - low) / 15), low.to(torch.float16)
        out["k"] = _q4((k - _rows(out["k.min"], t, block)) / _rows(out["k.scale"], t, block))
        low, high = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
        scale, low = _scale((high - low) / 15), low.to(torch.float16)
        out["v"], out["v.scale"], out["v.min"] = _q4((v - low.float()) / scale.float()), scale[..., 0], low[..., 0]
    else:
        raise ValueError(f"unknown storage {storage!r}")
    if bias is not None:
        out["b"] = torch.stack([b.detach().float().cpu() for b in bias]).permute(2, 0, 1).contiguous()  # [T, L, H]
    return out


def decode(rows: dict[str, torch.Tensor], storage: str, block: int, first_entry: int
           ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """Stored rows back to per-layer float32 keys and values [kv_heads, n, D] (and biases).
    `rows` holds entry rows first_entry.. and the block rows that cover them."""
    k, v = rows["k"], rows["v"]
    n = k.shape[0]
    if storage in FLOAT:
        k, v = k.float(), v.float()
    else:
        owner = (torch.arange(first_entry, first_entry + n) // block) - first_entry // block  # each entry's block row
        k_scale = rows["k.scale"].float()[owner]
        if storage == "int8":
            k = k.view(torch.int8).float() * k_scale
            v = v.view(torch.int8).float() * rows["v.scale"].float().unsqueeze(-1)
        else:
            k = _unpack4(k).float() * k_scale + rows["k.min"].float()[owner]
            v = _unpack4(v).float() * rows["v.scale"].float().unsqueeze(-1) + rows["v.min"].float().unsqueeze(-1)
    keys = list(k.permute(1, 2, 0, 3).contiguous().unbind(0))  # L x [H, n, D]
    values = list(v.permute(1, 2, 0, 3).contiguous().unbind(0))
    bias = list(rows["b"].float().permute(1, 2, 0).contiguous().unbind(0)) if "b" in rows else None
    return keys, values, bias


def _block_stat(x: torch.Tensor, block: int, stat) -> torch.Tensor:
    """`stat` (amin or amax) of each channel over each block of entries: [blocks, L, H, D]."""
    return torch.stack([stat(x[s: s + block], dim=0) for s in range(0, x.shape[0], block)])


def _rows(per_block: torch.Tensor, t: int, block: int) -> torch.Tensor:
    """A per-block tensor repeated for each entry of its block (float32)."""
    return per_block.float().repeat_interleave(block, dim=0)[:t]


def _scale(x: torch.Tensor) -> torch.Tensor:
    # float16 as stored; quantising with the stored value keeps the round trip honest
    return x.clamp(min=1e-6).to(torch.float16)


def _q8(x: torch.Tensor) -> torch.Tensor:
    """Signed bytes, stored as uint8 (safetensors' U8) and viewed back on read."""
    return torch.round(x).clamp(-127, 127).to(torch.int8).view(torch.uint8)


def _q4(x: torch.Tensor) -> torch.Tensor:
    """0..15, two channels to a byte (the even channel in the low nibble)."""
    q = torch.round(x).clamp(0, 15).to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)

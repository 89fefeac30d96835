"""The one type for compiled KV: `Buffer`, and the RoPE arithmetic that moves it.

A buffer is what a cartridge stores and what the reader's cache holds: per layer, keys and
values of T cache entries. RoPE is already applied to the keys, so each entry also carries its
RoPE *position*. The central fact of the design lives here: an entry's cache index (0..T-1) is
not its position. A question read after a buffer starts at `first_query_position`, one past
the largest position.

Because RoPE rotations compose, a stored key can be moved to another position by rotating it
by the difference (`Rope.shift`). That is how buffers are normalised to start at 0 and laid
side by side when composed. Only RoPE variants whose rotation depends on the position alone
can be moved exactly; `Rope.from_parameters` refuses the others.

This module needs torch and nothing else: the file format, the reader and the compiler all
import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ModelMismatchError

# RoPE types whose rotation angle is position x a fixed per-pair frequency: exactly movable.
MOVABLE_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Rope:
    """Per-pair rotation frequencies of a model's RoPE (the rotate-half layout of Llama)."""

    inv_freq: torch.Tensor  # [head_dim // 2], float32, exactly as transformers computes it

    @classmethod
    def from_parameters(cls, params: dict, head_dim: int) -> Rope:
        """Build from the rope facts a manifest records: rope_type, rope_theta and the
        scaling fields of that type. Raises ModelMismatchError for types that cannot be
        moved exactly (their angles depend on sequence length or rescale the vectors)."""
        kind = params.get("rope_type") or "default"
        if kind not in MOVABLE_ROPE:
            raise ModelMismatchError(f"RoPE type {kind!r} cannot be re-rotated exactly",
                                     hint=f"lcc supports {', '.join(MOVABLE_ROPE)}")
        if float(params.get("partial_rotary_factor") or 1.0) != 1.0:
            raise ModelMismatchError("partial rotary embeddings cannot be re-rotated by lcc")
        theta = float(params["rope_theta"])
        # The same float32 expression as transformers, so moved keys match keys it rotates.
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if kind == "linear":
            inv = inv / float(params["factor"])
        elif kind == "llama3":
            inv = _llama3_frequencies(inv, params)
        return cls(inv)

    def shift(self, keys: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """Rotate keys [..., T, head_dim] by `delta` positions (an int, or one per entry [T]).
        Computed in float64 and cast back, so moving and moving back round-trips to float
        precision."""
        delta = torch.as_tensor(delta, dtype=torch.float64, device=keys.device)
        angles = delta.reshape(-1, 1) * self.inv_freq.to(keys.device, torch.float64)  # [T or 1, d/2]
        angles = torch.cat([angles, angles], dim=-1)
        x = keys.double()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x * angles.cos() + rotated * angles.sin()).to(keys.dtype)


def _llama3_frequencies(inv: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3's frequency-dependent scaling: long wavelengths are divided by `factor`, short
    ones kept, and the band between interpolated smoothly."""
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelength > original / low, inv / factor, inv)
    between = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(between, blended, out)


@dataclass
class Buffer:
    """Compiled KV: per layer keys and values [kv_heads, T, head_dim], RoPE baked into the
    keys at `positions` (one int per entry, not necessarily 0..T-1), and optionally per layer
    an attention bias [kv_heads, T] added to the logits of each entry (runtime/bias.py)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor  # int64 [T]
    bias: list[torch.Tensor] | None = None  # float32, per layer [kv_heads, T]; None: no bias

    @property
    def slots(self) -> int:
        return int(self.positions.numel())

    @property
    def first_query_position(self) -> int:
        """Where the first token read after this buffer goes: one past its largest position."""
        return int(self.positions.max()) + 1 if self.slots else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def to(self, device=None, dtype: torch.dtype | None = None) -> Buffer:
        """The same buffer on another device and/or in another float dtype (biases stay float32)."""
        return Buffer([k.to(device=device, dtype=dtype) for k in self.keys],
                      [v.to(device=device, dtype=dtype) for v in self.values], self.positions,
                      [b.to(device=device) for b in self.bias] if self.bias is not None else None)

    def cache_layers(self, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer with a batch axis, as a model cache holds them."""
        return [(k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1))
                for k, v in zip(self.keys, self.values)]

    def select(self, start: int, stop: int) -> Buffer:
        """Entries start..stop-1 (a segment of a cartridge), copied."""
        return Buffer([k[:, start:stop].clone() for k in self.keys], [v[:, start:stop].clone() for v in self.values],
                      self.positions[start:stop].clone(),
                      [b[:, start:stop].clone() for b in self.bias] if self.bias is not None else None)

    def take(self, index: torch.Tensor) -> Buffer:
        """The entries at `index` (int64 [n], cache order), copied."""
        return Buffer([k[:, index] for k in self.keys], [v[:, index] for v in self.values], self.positions[index],
                      [b[:, index] for b in self.bias] if self.bias is not None else None)

    def moved(self, rope: Rope, delta: int) -> Buffer:
        """The buffer with every entry moved `delta` positions (keys re-rotated; values and
        biases belong to the entry, not its position, and are kept)."""
        if delta == 0:
            return self
        return Buffer([rope.shift(k, delta) for k in self.keys], list(self.values), self.positions + delta, self.bias)

    def without_bias(self) -> Buffer:
        return Buffer(self.keys, self.values, self.positions)

    @classmethod
    def concat(cls, parts: list[Buffer]) -> Buffer:
        """Entries of several buffers one after another in the cache, positions unchanged. If
        any part has biases, the others get zeros (a bias of 0 is no bias)."""
        layers = len(parts[0].keys)
        bias = None
        if any(p.bias is not None for p in parts):
            bias = [torch.cat([p.bias[i] if p.bias is not None else
                               torch.zeros(p.keys[i].shape[:2], device=p.keys[i].device) for p in parts], dim=-1)
                    for i in range(layers)]
        return cls([torch.cat([p.keys[i] for p in parts], dim=-2) for i in range(layers)],
                   [torch.cat([p.values[i] for p in parts], dim=-2) for i in range(layers)],
                   torch.cat([p.positions for p in parts]), bias)

    @classmethod
    def laid_out(cls, parts: list[Buffer], rope: Rope) -> Buffer:
        """Parts one after another, like consecutive text: the first starts at position 0 and
        each later one is moved (keys re-rotated) so that its lowest position follows the
        previous part's last. Distances inside a part are kept. The one way buffers are put
        side by side: composed cartridges, a cartridge's segments, chosen pages, the buffers
        of training's compiled documents (keys [..., T, head_dim] with any leading axes)."""
        moved, offset = [], 0
        for part in parts:
            low = int(part.positions.min()) if part.slots else 0
            part = part.moved(rope, offset - low)
            moved.append(part)
            offset = part.first_query_position if part.slots else offset
        return cls.concat(moved)

    @classmethod
    def from_cache_layers(cls, layers, positions) -> Buffer:
        """From a model cache's (keys, values) per layer, batch row 0."""
        return cls([k[0] for k, _ in layers], [v[0] for _, v in layers],
                   torch.as_tensor(positions, dtype=torch.long).cpu())

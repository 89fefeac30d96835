"""The reading-prefix file: safetensors with a trained prefix's keys and values and a manifest.

A reading prefix is KV entries the frozen reader reads before every context turn (issue 38;
training/prefix.py trains it, runtime/prefix.py reads it). Tensors: `k.{layer}` and
`v.{layer}`, [kv_heads, entries, head_dim], RoPE baked into the keys at positions
0..entries-1. Metadata: `lcc_prefix` (the manifest) and `lcc_checksum` (sha256 over the
manifest text and the tensor digest), as a cartridge and a compiler file have:

    {"format": "lcc-prefix", "format_version": 1, "name": "...",
     "model": {"id", "fingerprint", "num_layers", "num_kv_heads", "head_dim", "rope", ...},
     "entries": 16, "prompt": {"system", "suffix"}, "training": {...},
     "lcc_version", "created", "tensor_sha256"}

Loading never unpickles; shapes are checked against the manifest before any value is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CartridgeError
from . import cartridge as carts
from .fsio import atomic_write

FORMAT_NAME = "lcc-prefix"
FORMAT_VERSION = 1
MAX_ENTRIES = 4096


@dataclass
class PrefixFile:
    manifest: dict
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def entries(self) -> int:
        return int(self.manifest["entries"])


def save_prefix(path: Path, manifest: dict, keys: list[torch.Tensor], values: list[torch.Tensor],
                dtype: torch.dtype = torch.float16) -> None:
    """Write atomically (float16 by default: a 16-entry prefix of the embedded model is 737 KB)."""
    from safetensors.torch import save

    tensors = {f"k.{i}": k.detach().to("cpu", dtype).contiguous() for i, k in enumerate(keys)}
    tensors |= {f"v.{i}": v.detach().to("cpu", dtype).contiguous() for i, v in enumerate(values)}
    manifest = {**manifest, "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "entries": int(keys[0].shape[1]), "tensor_sha256": carts.tensor_sha256(tensors)}
    text = json.dumps(manifest, sort_keys=True)
    data = save(tensors, metadata={"lcc_prefix": text, "lcc_checksum": carts.checksum(text, manifest["tensor_sha256"])})
    atomic_write(Path(path), data, overwrite=True)


def is_prefix_file(path: Path) -> bool:
    """True when the file's header carries a prefix manifest (cheap: the header only)."""
    return carts.carries(path, "lcc_prefix")


def read_prefix_manifest(path: Path) -> dict:
    """The manifest alone (cheap: the header only)."""
    return _header(Path(path), Path(path).name)[2]


def load_prefix(path: str | Path) -> PrefixFile:
    path = Path(path)
    raw, meta, m = _header(path, path.name)
    try:
        tensors = carts.read_tensors(raw, path.name)
    except Exception as exc:
        raise CartridgeError(getattr(exc, "message", str(exc))) from exc
    digest = carts.tensor_sha256(tensors)
    if digest != m["tensor_sha256"] or meta.get("lcc_checksum") != carts.checksum(meta["lcc_prefix"], digest):
        raise CartridgeError(f"{path.name}: checksum mismatch (file corrupted or modified)")
    layers = m["model"]["num_layers"]
    for t in tensors.values():
        if not torch.isfinite(t.float()).all():
            raise CartridgeError(f"{path.name}: the prefix holds NaN or infinite values")
    return PrefixFile(m, [tensors[f"k.{i}"] for i in range(layers)], [tensors[f"v.{i}"] for i in range(layers)])


def _header(source: Path, name: str) -> tuple:
    if not source.is_file():
        raise CartridgeError(f"no such reading prefix: {source}")
    raw, meta, m = carts.side_manifest(source, name, "lcc_prefix", CartridgeError, "an lcc reading prefix",
                                      (FORMAT_NAME, FORMAT_VERSION, "prefix"))
    _validate(m, raw, name)
    return raw, meta, m


def _validate(m, raw, name: str) -> None:
    model = m.get("model")
    ok = isinstance(model, dict) and isinstance(model.get("fingerprint"), str) and isinstance(model.get("id"), str)
    sizes = [model.get(k) for k in ("num_layers", "num_kv_heads", "head_dim")] if ok else []
    if not ok or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 65536 for x in sizes):
        raise CartridgeError(f"{name}: manifest has no valid model (id, fingerprint, num_layers, num_kv_heads, head_dim)")
    n = m.get("entries")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_ENTRIES:
        raise CartridgeError(f"{name}: entries must be between 1 and {MAX_ENTRIES}")
    if not isinstance(m.get("name"), str) or not isinstance(m.get("tensor_sha256"), str):
        raise CartridgeError(f"{name}: manifest has no name or tensor digest")
    layers, heads, dim = sizes
    want = {f"{kv}.{i}" for kv in "kv" for i in range(layers)}
    have = {k for k in raw.header if k != "__metadata__"}
    if have != want:
        raise CartridgeError(f"{name}: expected tensors k.0..k.{layers - 1} and v.0..v.{layers - 1}")
    for key in want:
        entry = raw.header[key]
        if entry.get("dtype") not in ("F32", "BF16", "F16") or entry.get("shape") != [heads, n, dim]:
            raise CartridgeError(f"{name}: tensor {key} is not [{heads}, {n}, {dim}] floats")

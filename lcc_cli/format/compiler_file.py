"""The pretrained-compiler file: safetensors with the compiler's weights and a JSON manifest.

Tensors: the buffer-only LoRA (`lora.<module path>.lora_A|B`) and `slot_bias` (added to every
slot's input embedding). Metadata: `lcc_compiler` (the manifest) and `lcc_checksum`
(sha256 over the manifest text and the tensor digest), exactly as a cartridge does. The
manifest pins the base model by fingerprint and records how the compiler was trained:

    {"format": "lcc-compiler", "format_version": 1,
     "model": {"id", "fingerprint", "num_layers", ...},
     "compiler": {"lora_rank", "lora_alpha", "lora_targets", "sink", "slot_init"},
     "training": {"ratios": [4, 16], "objective": {...}, "steps", "seed", "data": [{"name", "sha256", "rows"}],
                  "tokens", "seconds", "device"},
     "lcc_version", "created", "tensor_sha256"}

Loading never unpickles; a file made for another model is refused by `check_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CompilerFileError
from . import cartridge as carts
from .fsio import atomic_write

FORMAT_NAME = "lcc-compiler"
FORMAT_VERSION = 1
_MAX_TENSORS = 10_000


@dataclass
class CompilerFile:
    manifest: dict
    tensors: dict[str, torch.Tensor]
    sha256: str  # of the file's bytes: what a cartridge records

    @property
    def lora(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("lora."): v for k, v in self.tensors.items() if k.startswith("lora.")}

    @property
    def slot_bias(self) -> torch.Tensor:
        return self.tensors["slot_bias"]


def save_compiler(path: Path, manifest: dict, tensors: dict[str, torch.Tensor], overwrite: bool = True) -> str:
    """Write atomically; returns the file's sha256."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    manifest = {**manifest, "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "tensor_sha256": carts.tensor_sha256(tensors)}
    text = json.dumps(manifest, sort_keys=True)
    data = save(tensors, metadata={"lcc_compiler": text,
                                   "lcc_checksum": carts.checksum(text, manifest["tensor_sha256"])})
    atomic_write(Path(path), data, overwrite=overwrite)
    return hashlib.sha256(data).hexdigest()


def is_compiler_file(path: Path) -> bool:
    """True when the file's header carries a compiler manifest (cheap: header only)."""
    return carts.carries(path, "lcc_compiler")


def _read_header(source: Path | bytes, name: str) -> tuple:
    """(raw header, metadata, checked manifest) from the header alone."""
    raw, meta, manifest = carts.side_manifest(source, name, "lcc_compiler", CompilerFileError, "an lcc compiler file",
                                             (FORMAT_NAME, FORMAT_VERSION, "compiler"))
    _validate(manifest, raw, name)
    return raw, meta, manifest


def read_compiler_manifest(path: Path) -> dict:
    """The manifest of a compiler file, from its header only (cheap: no tensors read)."""
    return _read_header(Path(path), Path(path).name)[2]


def load_compiler(path: str | Path) -> CompilerFile:
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise CompilerFileError(f"no such compiler file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CompilerFileError(f"cannot read {path}: {exc.strerror}") from exc
    raw, meta, manifest = _read_header(data, name)
    try:
        tensors = carts.read_tensors(raw, name)
    except Exception as exc:
        raise CompilerFileError(getattr(exc, "message", str(exc))) from exc
    digest = carts.tensor_sha256(tensors)
    if digest != manifest["tensor_sha256"] or meta.get("lcc_checksum") != carts.checksum(meta["lcc_compiler"], digest):
        raise CompilerFileError(f"{name}: checksum mismatch (file corrupted or modified)")
    for key, t in tensors.items():
        if not torch.isfinite(t.float()).all():
            raise CompilerFileError(f"{name}: tensor {key} holds NaN or infinite values")
    return CompilerFile(manifest, tensors, hashlib.sha256(data).hexdigest())


def _validate(m, raw, name: str) -> None:
    model, comp = m.get("model"), m.get("compiler")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise CompilerFileError(f"{name}: manifest has no model fingerprint")
    if (not isinstance(comp, dict) or not isinstance(comp.get("lora_rank"), int) or comp["lora_rank"] < 1
            or not isinstance(comp.get("lora_alpha"), (int, float)) or not isinstance(comp.get("sink"), bool)
            or not isinstance(comp.get("lora_targets"), list) or not comp["lora_targets"]
            or not all(isinstance(t, str) for t in comp["lora_targets"])):
        raise CompilerFileError(f"{name}: manifest has no valid compiler settings (lora_rank, lora_alpha, "
                                f"lora_targets, sink)")
    if not isinstance(model.get("id"), str):
        raise CompilerFileError(f"{name}: manifest has no model id")
    alpha = comp["lora_alpha"]
    if isinstance(alpha, bool) or not math.isfinite(alpha) or not 0 < alpha <= 1e6 or comp["lora_rank"] > 4096:
        raise CompilerFileError(f"{name}: lora_alpha must be a positive finite number and lora_rank at most 4096")
    if "training" in m and not isinstance(m["training"], dict):
        raise CompilerFileError(f"{name}: manifest field training must be a table")
    if not isinstance(m.get("tensor_sha256"), str):
        raise CompilerFileError(f"{name}: manifest has no tensor digest")
    entries = [k for k in raw.header if k != "__metadata__"]
    if len(entries) > _MAX_TENSORS or "slot_bias" not in entries:
        raise CompilerFileError(f"{name}: unexpected tensors")
    rank = comp["lora_rank"]
    for key in entries:
        entry = raw.header[key]
        shape = entry.get("shape")
        if (entry.get("dtype") not in ("F32", "BF16", "F16") or not isinstance(shape, list) or len(shape) > 2
                or not all(isinstance(d, int) and 0 < d <= 1_000_000 for d in shape)):
            raise CompilerFileError(f"{name}: tensor {key[:60]!r} has an unexpected shape or dtype")
        # The declared rank sizes the LoRA built before these tensors are read: it must be
        # the rank the tensors have (lora_A is [rank, in], lora_B [out, rank]).
        if key.startswith("lora.") and (len(shape) != 2 or (".lora_A." in key and shape[0] != rank)
                                        or (".lora_B." in key and shape[1] != rank)):
            raise CompilerFileError(f"{name}: lora_rank {rank} does not match tensor {key[:60]!r} {shape}")
    if not any(k.startswith("lora.") for k in entries):
        raise CompilerFileError(f"{name}: no LoRA tensors")

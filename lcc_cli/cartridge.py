"""The .lcc cartridge format (v1): save, load and validate. Spec: docs/format.md.

A cartridge is one safetensors file. Tensors `k.{layer}` and `v.{layer}` hold the buffer
keys and values, [kv_heads, slots, head_dim], at exact length (no padding). The metadata
holds two strings: `lcc_manifest` (JSON: model identity, RoPE facts, buffer positions,
source, settings, metrics) and `lcc_checksum`, a sha256 over the manifest text and the
tensor bytes, so that an edit to either is caught. Loading never unpickles anything, and
every way a file can be broken surfaces as `CartridgeError`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .errors import CartridgeError, ModelMismatchError, OutputExistsError, ResourceError, UsageError

FORMAT_NAME = "lcc-cartridge"
FORMAT_VERSION = 1
SUFFIX = ".lcc"
_MAX_HEADER = 64 * 1024 * 1024
_REQUIRED = {
    "format": str, "format_version": int, "model": dict, "buffer": dict, "source": dict,
    "compile": dict, "metrics": dict, "lcc_version": str, "created": str, "tensor_sha256": str,
}
_REQUIRED_MODEL = {"id": str, "fingerprint": str, "num_layers": int, "num_kv_heads": int, "head_dim": int,
                   "dtype": str}
_REQUIRED_SEGMENT = {"index": int, "position_start": int, "slots": int, "token_count": int}


@dataclass
class Cartridge:
    manifest: dict
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [kv_heads, slots, head_dim]

    @property
    def first_query_position(self) -> int:
        return self.manifest["buffer"]["first_query_position"]

    @property
    def slots(self) -> int:
        return self.kv[0][0].shape[-2]

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    def reader_kv(self, device=None):
        """The buffer KV with a batch axis, ready for the reader's cache."""
        return [(k.unsqueeze(0).to(device), v.unsqueeze(0).to(device)) for k, v in self.kv]


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checksum(manifest_text: str, tensor_digest: str) -> str:
    return hashlib.sha256(manifest_text.encode() + b"\n" + tensor_digest.encode()).hexdigest()


def build_manifest(*, model: dict, segments: list[dict], source: dict, compile: dict, metrics: dict,
                   version: str) -> dict:
    """Assemble a manifest; the buffer layout is derived from the segments."""
    first_query = max(s["position_start"] + s["slots"] for s in segments)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model,
        "buffer": {"total_slots": sum(s["slots"] for s in segments), "first_query_position": first_query,
                   "segments": segments},
        "source": source,
        "compile": compile,
        "metrics": metrics,
        "lcc_version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tensor_sha256": "",
    }


def to_bytes(cart: Cartridge) -> bytes:
    from safetensors.torch import save

    tensors = {}
    for i, (k, v) in enumerate(cart.kv):
        tensors[f"k.{i}"] = k.detach().cpu().contiguous()
        tensors[f"v.{i}"] = v.detach().cpu().contiguous()
    cart.manifest["tensor_sha256"] = tensor_sha256(tensors)
    text = json.dumps(cart.manifest, sort_keys=True)
    return save(tensors, metadata={"lcc_manifest": text, "lcc_checksum": _checksum(text, cart.manifest["tensor_sha256"])})


def save_cartridge(cart: Cartridge, path: str | Path, force: bool = False) -> Path:
    """Write atomically: a temp file in the same directory, fsync, then rename. A crash or
    Ctrl-C leaves either the old file or the new one, never half of one."""
    path = Path(path)
    check_writable(path, force)
    data = to_bytes(cart)
    atomic_write(path, data)
    return path


def check_writable(path: Path, force: bool) -> None:
    """Fail before any work is done if `path` cannot be written."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists", hint="pass --force to overwrite it")
    if path.is_dir():
        raise UsageError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory does not exist: {parent}")
    try:  # really try: permission bits say nothing for root or on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output directory is not writable: {parent} ({exc.strerror})") from exc


def atomic_write(path: Path, data: bytes) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise UsageError(f"cannot write to {parent}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; a cartridge is an ordinary file
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ResourceError(f"no space left to write {path}") from exc
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cartridge(path: str | Path, allow_partial: bool = False) -> Cartridge:
    """Load and validate a cartridge. Partial files (an interrupted compile) are refused
    unless `allow_partial` (resume reads them)."""
    path = Path(path)
    if not path.is_file():
        raise CartridgeError(f"no such cartridge: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CartridgeError(f"cannot read {path}: {exc.strerror}") from exc
    cart = from_bytes(data, path.name)
    if cart.manifest.get("partial") and not allow_partial:
        raise CartridgeError(f"{path.name} is an unfinished compile, not a cartridge",
                             hint="finish it with `lcc compile ... --resume`")
    return cart


def from_bytes(data: bytes, name: str = "cartridge") -> Cartridge:
    """Parse and validate. Any defect raises CartridgeError naming what is wrong."""
    meta, manifest = read_manifest(data, name)
    validate_manifest(manifest, name)
    tensors = _load_tensors(data, name)
    digest = tensor_sha256(tensors)
    if digest != manifest["tensor_sha256"]:
        raise CartridgeError(f"{name}: tensor checksum mismatch (file corrupted or modified)")
    if meta.get("lcc_checksum") != _checksum(meta["lcc_manifest"], digest):
        raise CartridgeError(f"{name}: manifest checksum mismatch (manifest edited or corrupted)")
    kv = _check_shapes(manifest, tensors, name)
    return Cartridge(manifest, kv)


def read_manifest(data: bytes, name: str) -> tuple[dict, dict]:
    """The safetensors metadata and the parsed manifest (a dict), or CartridgeError."""
    header = _parse_header(data, name)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get("lcc_manifest"), str):
        raise CartridgeError(f"{name} is a safetensors file but not an lcc cartridge (no manifest)")
    try:
        manifest = json.loads(meta["lcc_manifest"])
    except ValueError as exc:
        raise CartridgeError(f"{name}: manifest is not valid JSON") from exc
    if not isinstance(manifest, dict):
        raise CartridgeError(f"{name}: manifest is not a JSON object")
    return meta, manifest


def _parse_header(data: bytes, name: str) -> dict:
    """Read the safetensors header ourselves, so truncation and garbage give clear errors
    before any tensor is touched."""
    if len(data) < 8:
        raise CartridgeError(f"{name} is not a cartridge (only {len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size == 0 or size > _MAX_HEADER or 8 + size > len(data):
        raise CartridgeError(f"{name} is not a cartridge, or is truncated (bad header length)")
    try:
        header = json.loads(data[8: 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CartridgeError(f"{name} is not a cartridge (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise CartridgeError(f"{name} is not a cartridge (header is not an object)")
    body = len(data) - 8 - size
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1] <= body):
            raise CartridgeError(f"{name} is truncated or damaged (tensor {key!r} lies outside the file)")
    return header


def _load_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types on damaged input
        raise CartridgeError(f"{name}: tensors cannot be read ({str(exc).splitlines()[0][:120]})") from exc


def validate_manifest(m: object, name: str = "cartridge") -> None:
    if not isinstance(m, dict):
        raise CartridgeError(f"{name}: manifest is not a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise CartridgeError(f"{name}: not an lcc cartridge (format {m.get('format')!r})")
    version = m.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CartridgeError(f"{name} uses format version {version}; this lcc reads up to {FORMAT_VERSION}",
                             hint="upgrade lcc")
    _require(m, _REQUIRED, name, "manifest")
    if version != FORMAT_VERSION:
        raise CartridgeError(f"{name}: unsupported format version {version!r}")
    _require(m["model"], _REQUIRED_MODEL, name, "model")
    buf = m["buffer"]
    _require(buf, {"total_slots": int, "first_query_position": int, "segments": list}, name, "buffer")
    if not buf["segments"]:
        raise CartridgeError(f"{name}: manifest lists no segments")
    for seg in buf["segments"]:
        _require(seg, _REQUIRED_SEGMENT, name, "segment")
        if seg["slots"] < 1 or seg["position_start"] < 0:
            raise CartridgeError(f"{name}: segment with invalid slots or position")
    if buf["total_slots"] != sum(s["slots"] for s in buf["segments"]):
        raise CartridgeError(f"{name}: segment slots do not add up to total_slots")
    if buf["first_query_position"] < max(s["position_start"] + s["slots"] for s in buf["segments"]):
        raise CartridgeError(f"{name}: first query position overlaps the buffer")


def _require(obj: object, fields: dict, name: str, where: str) -> None:
    if not isinstance(obj, dict):
        raise CartridgeError(f"{name}: {where} entry is not an object")
    for key, typ in fields.items():
        value = obj.get(key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise CartridgeError(f"{name}: manifest field {where}.{key} is missing or not {typ.__name__}")


def _check_shapes(m: dict, tensors: dict, name: str):
    model, slots = m["model"], m["buffer"]["total_slots"]
    layers = model["num_layers"]
    expected = {f"{kind}.{i}" for i in range(layers) for kind in "kv"}
    if set(tensors) != expected:
        raise CartridgeError(f"{name}: tensors do not match the manifest's {layers} layers")
    shape = (model["num_kv_heads"], slots, model["head_dim"])
    for key, t in tensors.items():
        if tuple(t.shape) != shape:
            raise CartridgeError(f"{name}: tensor {key} has shape {tuple(t.shape)}, manifest says {shape}")
        if str(t.dtype).removeprefix("torch.") != model["dtype"]:
            raise CartridgeError(f"{name}: tensor {key} is {t.dtype}, manifest says {model['dtype']}")
    return [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(layers)]


def check_model(cart: Cartridge, loaded, name: str = "cartridge", force: bool = False) -> None:
    """Refuse a cartridge made for another model. Shapes, RoPE, dtype and the position
    window must fit even with --force: without them the answer is fluent nonsense."""
    check_compatible(cart, loaded.facts)
    want = cart.manifest["model"]
    if want["fingerprint"] != loaded.fingerprint and not force:
        raise ModelMismatchError(
            f"{name} was made for model {want['id']} ({want['fingerprint'][:12]}), "
            f"not {loaded.model_id} ({loaded.fingerprint[:12]})", hint="pass --force to use it anyway")


def check_compatible(cart: Cartridge, facts: dict) -> str:
    """Shape, RoPE, dtype and window facts of the cartridge against a model's."""
    want = cart.manifest["model"]
    for key in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
        if want[key] != facts[key]:
            raise ModelMismatchError(f"cartridge {key} is {want[key]}, the model's is {facts[key]}")
    if want.get("rope_theta") and facts.get("rope_theta") and want["rope_theta"] != facts["rope_theta"]:
        raise ModelMismatchError(f"cartridge rope_theta is {want['rope_theta']}, the model's is {facts['rope_theta']}")
    limit = facts.get("max_positions")
    if limit and cart.first_query_position >= limit:
        raise ModelMismatchError(f"first query position {cart.first_query_position} is past the model's "
                                 f"{limit}-position window")
    return (f"layers {facts['num_layers']}, kv heads {facts['num_kv_heads']}, head dim {facts['head_dim']}, "
            f"{facts['dtype']}")


def combine(carts: list[Cartridge]):
    """Compose cartridges: concatenate their buffers; the question goes after the largest
    buffer position of any of them. Returns (reader kv, first query position)."""
    prints = {c.fingerprint for c in carts}
    if len(prints) > 1:
        raise ModelMismatchError("the cartridges were made for different models")
    kv = [(torch.cat([c.kv[i][0] for c in carts], dim=-2).unsqueeze(0),
           torch.cat([c.kv[i][1] for c in carts], dim=-2).unsqueeze(0)) for i in range(len(carts[0].kv))]
    return kv, max(c.first_query_position for c in carts)


def from_segments(loaded, segments, doc, settings: dict, version: str, partial: bool = False) -> Cartridge:
    """Assemble a cartridge from compiled segments (compiler.Segment) of `doc`."""
    facts = loaded.facts
    model = {"id": loaded.model_id, "fingerprint": loaded.fingerprint, **facts, "rope_baked_into_keys": True}
    seg_rows = [{"index": s.index, "position_start": s.position_start, "slots": s.slots,
                 "token_count": s.token_count} for s in segments]
    tokens = sum(s.token_count for s in segments)
    source = {"name": doc.name, "sha256": doc.sha256, "token_count": tokens, "ratio": settings.get("ratio")}
    metrics = {"seconds": round(sum(s.metrics.get("seconds", 0) for s in segments), 3),
               "segments": [s.metrics for s in segments]}
    manifest = build_manifest(model=model, segments=seg_rows, source=source, compile=settings, metrics=metrics,
                              version=version)
    if partial:
        manifest["partial"] = True
    kv = [(torch.cat([s.kv[i][0] for s in segments], dim=-2), torch.cat([s.kv[i][1] for s in segments], dim=-2))
          for i in range(len(segments[0].kv))]
    return Cartridge(manifest, kv)

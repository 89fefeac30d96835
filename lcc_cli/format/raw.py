"""The safetensors container that cartridges and compiler files share: the header read on its
own and bounded, the metadata strings, each tensor read from its own checked byte range (all of
it, or rows of it), the v1/v2 checksums, and the value checks. No pickle, no model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CartridgeError

MAX_HEADER = 64 * 1024 * 1024  # a manifest for thousands of segments, or an index's page texts, is a few MB
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
           "I32": torch.int32}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
# A logit bias beyond this is a mask or a broken fit, not a weight: e^30 is 1e13 keys' worth.
BIAS_LIMIT = 30.0


@dataclass
class RawFile:
    """What `read_raw` found: the safetensors header and where the tensor bytes start.
    `bytes_read` counts the tensor bytes read so far (ranged reads are tested by it)."""

    path: Path | None
    data: bytes | None  # the whole file, when loading from bytes
    size: int
    header: dict
    body_start: int
    bytes_read: int = 0

    def read_range(self, start: int, stop: int) -> bytes:
        self.bytes_read += stop - start
        if self.data is not None:
            return self.data[self.body_start + start: self.body_start + stop]
        with open(self.path, "rb") as f:
            f.seek(self.body_start + start)
            return f.read(stop - start)

    def tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or rows [a, b) of it (its first axis), read from the file alone."""
        entry = self.header[key]
        shape, dtype = list(entry["shape"]), _DTYPES[entry["dtype"]]
        start, stop = entry["data_offsets"]
        if rows is not None:
            row = (stop - start) // shape[0] if shape and shape[0] else 0
            a, b = rows
            start, stop, shape = start + a * row, start + b * row, [b - a, *shape[1:]]
        blob = bytearray(self.read_range(start, stop))
        if len(blob) != stop - start:
            raise CartridgeError(f"{self.path.name if self.path else 'cartridge'} is truncated (tensor {key} is short)")
        return torch.frombuffer(blob, dtype=dtype).reshape(shape) if blob else torch.zeros(shape, dtype=dtype)


def read_raw(source: Path | bytes, name: str) -> RawFile:
    """Step 1: the header, read on its own (8 bytes of length, then at most MAX_HEADER)."""
    if isinstance(source, (bytes, bytearray)):
        data, path, size = bytes(source), None, len(source)
        head = data[:8]
    else:
        data, path = None, Path(source)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
                text = f.read(length) if 0 < length <= min(MAX_HEADER, size - 8) else b""
        except OSError as exc:
            raise CartridgeError(f"cannot read {name}: {exc.strerror}") from exc
    if len(head) < 8:
        raise CartridgeError(f"{name} is not a cartridge (only {size} bytes)")
    (length,) = struct.unpack("<Q", head)
    if length == 0 or length > MAX_HEADER or 8 + length > size:
        raise CartridgeError(f"{name} is not a cartridge, or is truncated (bad header length)")
    if data is not None:
        text = data[8: 8 + length]
    header = _json(text, name, "header")
    if not isinstance(header, dict):
        raise CartridgeError(f"{name} is not a cartridge (header is not an object)")
    body = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CartridgeError(f"{name} is damaged (header entry {key[:40]!r} is not an object)")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= body):
            raise CartridgeError(f"{name} is truncated or damaged (tensor {key[:40]!r} lies outside the file)")
    return RawFile(path, data, size, header, 8 + length)


def carries(path: Path, key: str) -> bool:
    """True when a file's safetensors header carries the metadata string `key` (cheap: the
    header only). How a compiler file (`lcc_compiler`) and a reading prefix (`lcc_prefix`) are
    told from a cartridge."""
    try:
        raw = read_raw(Path(path), Path(path).name)
    except Exception:
        return False
    meta = raw.header.get("__metadata__")
    return isinstance(meta, dict) and isinstance(meta.get(key), str)


def side_manifest(source: Path | bytes, name: str, key: str, error, what: str,
                  fmt: tuple[str, int, str]) -> tuple:
    """(raw header, metadata, manifest) of a file whose JSON manifest is the metadata string
    `key` (a compiler file, a reading prefix), from the header alone; `error` (an LccError
    class) for anything wrong, naming the file as `what`. `fmt`: the format name and version
    the manifest must declare, and the word for it in the version error."""
    try:
        raw = read_raw(source, name)
    except Exception as exc:
        raise error(getattr(exc, "message", str(exc))) from exc
    meta = raw.header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get(key), str):
        raise error(f"{name} is not {what} (no {key} manifest)")
    try:
        manifest = json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise error(f"{name}: {key} manifest is not valid JSON") from exc
    format_name, version, word = fmt
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        raise error(f"{name} is not {what}")
    if manifest.get("format_version") != version:
        raise error(f"{name} uses {word} format version {str(manifest.get('format_version'))[:12]}; this lcc "
                    f"reads version {version}", hint="upgrade lcc")
    return raw, meta, manifest


def _json(raw: bytes | str, name: str, what: str):
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CartridgeError(f"{name} is not a cartridge ({what} is not JSON)") from exc
    except RecursionError as exc:
        raise CartridgeError(f"{name}: {what} is nested too deeply") from exc


def read_manifest(raw: RawFile, name: str) -> tuple[dict, dict]:
    """Step 2: the metadata strings and the manifest as written (v1 or v2, not yet checked)."""
    meta = raw.header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get("lcc_manifest"), str):
        raise CartridgeError(f"{name} is a safetensors file but not an lcc cartridge (no manifest)")
    manifest = _json(meta["lcc_manifest"], name, "manifest")
    if not isinstance(manifest, dict):
        raise CartridgeError(f"{name}: manifest is not a JSON object")
    return meta, manifest


def _check_legacy_entries(raw: RawFile, m: dict, name: str) -> None:
    """v1/v2: per-layer tensors k.{i}, v.{i} (and b.{i}) of the manifest's shapes."""
    model, slots = m["model"], m["buffer"]["total_slots"]
    layers = model["num_layers"]
    entries = {k: v for k, v in raw.header.items() if k != "__metadata__"}
    biased = bool(m["buffer"].get("bias"))
    if len(entries) != (3 if biased else 2) * layers:
        raise CartridgeError(f"{name}: {len(entries)} tensors for the manifest's {layers} layers"
                             + (" with biases" if biased else ""))
    for i in range(layers if biased else 0):
        entry = entries.get(f"b.{i}")
        if entry is None:
            raise CartridgeError(f"{name}: tensor b.{i} (attention bias) is missing")
        if entry.get("shape") != [model["num_kv_heads"], slots] or entry.get("dtype") != "F32":
            raise CartridgeError(f"{name}: tensor b.{i} must be float32 of shape {[model['num_kv_heads'], slots]}")
        start, stop = entry["data_offsets"]
        if stop - start != 4 * model["num_kv_heads"] * slots:
            raise CartridgeError(f"{name}: tensor b.{i} has the wrong number of bytes")
    shape = [model["num_kv_heads"], slots, model["head_dim"]]
    dtype = None
    for i in range(layers):
        for kind in "kv":
            entry = entries.get(f"{kind}.{i}")
            if entry is None:
                raise CartridgeError(f"{name}: tensor {kind}.{i} is missing")
            if entry.get("shape") != shape:
                raise CartridgeError(f"{name}: tensor {kind}.{i} has shape {str(entry.get('shape'))[:40]}, "
                                     f"manifest says {shape}")
            if entry.get("dtype") not in _DTYPES or (dtype and entry["dtype"] != dtype):
                raise CartridgeError(f"{name}: tensor {kind}.{i} has dtype {str(entry.get('dtype'))[:12]}")
            dtype = entry["dtype"]
            start, stop = entry["data_offsets"]
            if stop - start != _DTYPES[dtype].itemsize * shape[0] * shape[1] * shape[2]:
                raise CartridgeError(f"{name}: tensor {kind}.{i} has the wrong number of bytes")
    declared = m["buffer"].get("dtype") or model["dtype"]
    if str(_DTYPES[dtype]).removeprefix("torch.") != declared:
        raise CartridgeError(f"{name}: tensors are {_DTYPES[dtype]}, manifest says {declared}")


def read_tensors(raw: RawFile, name: str) -> dict[str, torch.Tensor]:
    """Step 4: the tensor bytes, each read from its own checked range."""
    out = {}
    for key, entry in raw.header.items():
        if key == "__metadata__":
            continue
        start, stop = entry["data_offsets"]
        blob = bytearray(raw.read_range(start, stop))
        if len(blob) != stop - start:
            raise CartridgeError(f"{name} is truncated (tensor {key} is short)")
        out[key] = torch.frombuffer(blob, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"]) if blob else \
            torch.zeros(entry["shape"], dtype=_DTYPES[entry["dtype"]])
    return out


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checksum(manifest_text: str, tensor_digest: str) -> str:
    return hashlib.sha256(manifest_text.encode("utf-8", "surrogatepass") + b"\n" + tensor_digest.encode()).hexdigest()


def check_checksums(meta: dict, m: dict, tensors: dict, name: str) -> str:
    """Step 5: tensor digest and manifest checksum. Detects accidents, not attackers (anyone
    can recompute them); see the threat model in docs/format.md."""
    digest = tensor_sha256(tensors)
    if digest != m["tensor_sha256"]:
        raise CartridgeError(f"{name}: tensor checksum mismatch (file corrupted or modified)")
    if meta.get("lcc_checksum") != checksum(meta["lcc_manifest"], digest):
        raise CartridgeError(f"{name}: manifest checksum mismatch (manifest edited or corrupted)")
    return digest


def check_values(tensors: dict[str, torch.Tensor], name: str, limit: float = 1e4) -> float:
    """Step 6: every value finite and of plausible size. Real keys and values are within a few
    hundred; NaN, Inf or 1e30 means a broken compile or a doctored file, and the reader would
    answer from garbage. Returns the largest magnitude."""
    largest = 0.0
    for key in sorted(tensors):
        t = tensors[key].float()
        if not torch.isfinite(t).all():
            raise CartridgeError(f"{name}: tensor {key} holds NaN or infinite values")
        if key.startswith("b.") and t.numel() and float(t.abs().max()) > BIAS_LIMIT:
            raise CartridgeError(f"{name}: attention bias {key} reaches {float(t.abs().max()):.3g}, beyond "
                                 f"±{BIAS_LIMIT:g} (a bias that large silences or swamps every other entry)")
        largest = max(largest, float(t.abs().max()) if t.numel() else 0.0)
    if largest > limit:
        raise CartridgeError(f"{name}: values up to {largest:.3g}, beyond any real KV cache (limit {limit:g})")
    return largest

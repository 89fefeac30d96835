"""The .lcc cartridge file: save, and load in public steps that `verify` runs one by one.

A cartridge is one safetensors file: tensors `k.{layer}` and `v.{layer}` ([kv_heads, slots,
head_dim], exact length) and two metadata strings, `lcc_manifest` (JSON) and `lcc_checksum`
(sha256 over the manifest text and the tensor digest). Spec: docs/format.md.

Loading never unpickles and never reads more than the header says, and the header is checked
before the tensors are touched: its length against the file size and a cap, then the manifest,
then every tensor entry against the manifest, and only then are the tensor bytes read (each
range exactly, from the file). Every defect is a CartridgeError naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..buffer import Buffer, Rope
from ..errors import CartridgeError
from . import manifest as mf
from .fsio import atomic_write

PARTIAL_SUFFIX = ".partial"
MAX_HEADER = 64 * 1024 * 1024  # a manifest for thousands of segments is a few MB
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
# A logit bias beyond this is a mask or a broken fit, not a weight: e^30 is 1e13 keys' worth.
BIAS_LIMIT = 30.0


@dataclass
class Cartridge:
    """A manifest (the file's JSON, always in its v2 shape) and the buffer it describes."""

    manifest: dict
    buffer: Buffer

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def slots(self) -> int:
        return self.buffer.slots

    @property
    def segments(self) -> list[dict]:
        return self.manifest["buffer"]["segments"]

    @property
    def rope(self) -> Rope:
        return Rope.from_parameters(self.manifest["model"]["rope"], self.manifest["model"]["head_dim"])

    def segment_buffers(self) -> list[Buffer]:
        """The buffer of each segment, in segment order (a slice of the whole)."""
        out, start = [], 0
        for row in self.segments:
            out.append(self.buffer.select(start, start + row["slots"]))
            start += row["slots"]
        return out


# --- reading, step by step ------------------------------------------------------------------

@dataclass
class RawFile:
    """What `read_raw` found: the safetensors header and where the tensor bytes start."""

    path: Path | None
    data: bytes | None  # the whole file, when loading from bytes
    size: int
    header: dict
    body_start: int

    def read_range(self, start: int, stop: int) -> bytes:
        if self.data is not None:
            return self.data[self.body_start + start: self.body_start + stop]
        with open(self.path, "rb") as f:
            f.seek(self.body_start + start)
            return f.read(stop - start)


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


def check_tensor_entries(raw: RawFile, m: dict, name: str) -> None:
    """Step 3: the header's tensors are exactly those the manifest implies, with its shapes,
    before a single tensor byte is read (counts were bounded by `manifest.validate`)."""
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


def to_cartridge(m: dict, tensors: dict[str, torch.Tensor]) -> Cartridge:
    """Step 7: the Cartridge, v1 files converted to the v2 layout (keys moved exactly)."""
    layers = m["model"]["num_layers"]
    keys = [tensors[f"k.{i}"] for i in range(layers)]
    values = [tensors[f"v.{i}"] for i in range(layers)]
    bias = [tensors[f"b.{i}"] for i in range(layers)] if m["buffer"].get("bias") else None
    shift = 0
    if m["format_version"] == 1:
        m, shift = mf.migrate_v1(m)
    buffer = Buffer(keys, values, _positions(m) - shift, bias)
    if shift:
        buffer = buffer.moved(Rope.from_parameters(m["model"]["rope"], m["model"]["head_dim"]), shift)
    return Cartridge(m, buffer)


def parse(source: Path | bytes, name: str, allow_partial: bool = False) -> Cartridge:
    """All steps in order; the first defect raises."""
    raw = read_raw(source, name)
    meta, m = read_manifest(raw, name)
    mf.validate(m, name)
    check_tensor_entries(raw, m, name)
    tensors = read_tensors(raw, name)
    check_checksums(meta, m, tensors, name)
    check_values(tensors, name)
    if m.get("partial") and not allow_partial:
        raise CartridgeError(f"{name} is an unfinished compile, not a cartridge",
                             hint="finish it with `lcc compile ... --resume`")
    return to_cartridge(m, tensors)


def load_cartridge(path: str | Path, allow_partial: bool = False) -> Cartridge:
    path = Path(path)
    if not path.exists():
        raise CartridgeError(f"no such cartridge: {path}")
    if not path.is_file():
        raise CartridgeError(f"{path} is not a regular file (a directory, device or pipe?)")
    return parse(path, path.name, allow_partial)


def from_bytes(data: bytes, name: str = "cartridge") -> Cartridge:
    return parse(data, name)


# --- writing ----------------------------------------------------------------------------------

def to_bytes(cart: Cartridge) -> bytes:
    """Serialise (v2). The manifest's tensor digest is filled in here."""
    from safetensors.torch import save

    if cart.manifest["buffer"].get("layout") == "v1":
        cart = relayout(cart)
    buffer = cart.buffer
    if buffer.positions.tolist() != _positions(cart.manifest).tolist():
        raise CartridgeError("internal: buffer positions disagree with the manifest")
    tensors = {}
    for i, (k, v) in enumerate(zip(buffer.keys, buffer.values)):
        tensors[f"k.{i}"] = k.detach().cpu().contiguous()
        tensors[f"v.{i}"] = v.detach().cpu().contiguous()
    for i, b in enumerate(buffer.bias or []):
        tensors[f"b.{i}"] = b.detach().float().cpu().contiguous()
    if buffer.bias is not None:
        cart.manifest["buffer"]["bias"] = True
    else:
        cart.manifest["buffer"].pop("bias", None)
    cart.manifest["tensor_sha256"] = tensor_sha256(tensors)
    cart.manifest["buffer"]["dtype"] = str(buffer.dtype).removeprefix("torch.")
    text = json.dumps(cart.manifest, sort_keys=True)
    return save(tensors, metadata={"lcc_manifest": text, "lcc_checksum": checksum(text, cart.manifest["tensor_sha256"])})


def _positions(m: dict) -> torch.Tensor:
    return torch.cat([torch.arange(s["position_start"], s["position_start"] + s["slots"])
                      for s in m["buffer"]["segments"]])


def relayout(cart: Cartridge) -> Cartridge:
    """The cartridge with its segments moved to the consecutive layout (a converted v1
    file with several segments: its buffers overlapped in position)."""
    rows = mf.consecutive_segments(cart.segments)
    m = {**cart.manifest, "buffer": {**cart.manifest["buffer"], "segments": rows, "layout": "consecutive",
                                     "first_query_position": sum(r["slots"] for r in rows)}}
    return Cartridge(m, Buffer.laid_out(cart.segment_buffers(), cart.rope))


def save_cartridge(cart: Cartridge, path: str | Path, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Write atomically. Without `overwrite` an existing file is never replaced."""
    return atomic_write(Path(path), to_bytes(cart), overwrite=overwrite, inputs=inputs)


def partial_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + PARTIAL_SUFFIX)

"""The .lcc cartridge file: save, open, and read in public steps that `verify` runs one by one.

A cartridge is one safetensors file (spec: docs/format.md). Format v3 stores every tensor
entry-major (format/storage.py), in blocks of `buffer.block_entries` entries, each block with
its own sha256 in the `blocks` tensor: a range of entries is read on its own (only the blocks
that hold it, each checked), which is how a question reads its pages of a large indexed
cartridge. `lcc_manifest` (JSON) and `lcc_checksum` (over the manifest and `tensor_sha256`, the
digest of the block table and the index tensors) are metadata strings. v1 and v2 files (tensors
`k.{layer}` / `v.{layer}`, one checksum for all) are still read, whole.

Loading never unpickles and never reads more than the header says, and the header is checked
before the tensors are touched: its length against the file size and a cap, then the manifest,
then every tensor entry against the manifest, and only then are tensor bytes read (each range
exactly, from the file). Every defect is a CartridgeError naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..buffer import Buffer, Rope
from ..errors import CartridgeError
from . import manifest as mf
from . import storage as st
from .fsio import atomic_write
from .layouts import layout_of, positions
from .raw import (_DTYPE_CODES, _DTYPES, BIAS_LIMIT, MAX_HEADER, RawFile, _check_legacy_entries,  # noqa: F401
                  carries, check_checksums, check_values, checksum, read_manifest, read_raw, read_tensors,
                  side_manifest, tensor_sha256)

PARTIAL_SUFFIX = ".partial"
BLOCK_TABLE = "blocks"  # [blocks, 32] uint8: the sha256 of each block's bytes
INDEX_PREFIX = "index."  # tensors an indexed cartridge reads whole to select pages (key summaries)


@dataclass
class Cartridge:
    """A manifest (the file's JSON; a v1 file's in the v2 shape) and the buffer it describes:
    every stored entry, in cache order."""

    manifest: dict
    buffer: Buffer
    index_tensors: dict | None = None  # an indexed cartridge's `index.*` tensors

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
        return rope_of(self.manifest)

    def segment_buffers(self) -> list[Buffer]:
        """The buffer of each segment, in segment order (a slice of the whole)."""
        out, start = [], 0
        for row in self.segments:
            out.append(self.buffer.select(start, start + row["slots"]))
            start += row["slots"]
        return out


def rope_of(m: dict) -> Rope:
    return Rope.from_parameters(m["model"]["rope"], m["model"]["head_dim"])


# --- reading, step by step ------------------------------------------------------------------

def check_tensor_entries(raw: RawFile, m: dict, name: str) -> None:
    """Step 3: the header's tensors are exactly those the manifest implies, with its shapes,
    dtypes and byte counts, before a single tensor byte is read (counts were bounded by
    `manifest.validate`)."""
    if m["format_version"] < 3:
        return _check_legacy_entries(raw, m, name)
    model, buf = m["model"], m["buffer"]
    t, layers, heads, d = buf["total_slots"], model["num_layers"], model["num_kv_heads"], model["head_dim"]
    storage, block = buf["dtype"], buf["block_entries"]
    blocks = -(-t // block)
    want = expected_tensors(storage, t, layers, heads, d, blocks, bool(buf.get("bias")))
    entries = {k: v for k, v in raw.header.items() if k != "__metadata__"}
    index = {k: v for k, v in entries.items() if k.startswith(INDEX_PREFIX)}
    unexpected = sorted(set(entries) - set(want) - set(index))
    if unexpected:
        raise CartridgeError(f"{name}: tensors the manifest does not announce: "
                             f"{', '.join(repr(k[:40]) for k in unexpected[:3])}")
    for key, (dtype, shape) in want.items():
        entry = entries.get(key)
        if entry is None:
            raise CartridgeError(f"{name}: tensor {key} is missing")
        _check_entry(entry, key, dtype, shape, name)
    allowed = {}
    if layout_of(m, name).indexed:
        gist = sum(s["slots"] for s in buf["segments"])
        allowed = {"index.token_ids": ("I32", [t - gist]),
                   "index.key_mean": ("F16", [len(m["index"]["pages"]), layers, heads, d])}
    for key, entry in index.items():
        if key not in allowed:
            raise CartridgeError(f"{name}: index tensor {key[:40]!r} is not one lcc knows")
        _check_entry(entry, key, *allowed[key], name)
    if allowed and "index.token_ids" not in index:
        raise CartridgeError(f"{name}: tensor index.token_ids is missing")


def expected_tensors(storage: str, t: int, layers: int, heads: int, d: int, blocks: int, bias: bool) -> dict:
    """{name: (dtype code, shape)} of a v3 cartridge's stored tensors."""
    if storage in st.FLOAT:
        code = _DTYPE_CODES[st.FLOAT[storage]]
        want = {"k": (code, [t, layers, heads, d]), "v": (code, [t, layers, heads, d])}
    else:
        width = d if storage == "int8" else d // 2
        want = {"k": ("U8", [t, layers, heads, width]), "v": ("U8", [t, layers, heads, width]),
                "k.scale": ("F16", [blocks, layers, heads, d]), "v.scale": ("F16", [t, layers, heads])}
        if storage == "int4":
            want.update({"k.min": ("F16", [blocks, layers, heads, d]), "v.min": ("F16", [t, layers, heads])})
    if bias:
        want["b"] = ("F32", [t, layers, heads])
    want[BLOCK_TABLE] = ("U8", [blocks, 32])
    return want


def _check_entry(entry: dict, key: str, dtype: str, shape: list, name: str) -> None:
    if entry.get("dtype") != dtype or entry.get("shape") != shape:
        raise CartridgeError(f"{name}: tensor {key[:40]} is {str(entry.get('dtype'))[:8]} "
                             f"{str(entry.get('shape'))[:40]}, the manifest implies {dtype} {shape}")
    start, stop = entry["data_offsets"]
    count = 1
    for x in shape:
        count *= x
    if stop - start != _DTYPES[dtype].itemsize * count:
        raise CartridgeError(f"{name}: tensor {key[:40]} has the wrong number of bytes")


def block_sha256(rows: dict[str, torch.Tensor]) -> bytes:
    """The sha256 of one block: its rows of every stored tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(rows):
        h.update(name.encode() + b"\n")
        h.update(rows[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def v3_digest(table: torch.Tensor, index: dict[str, torch.Tensor]) -> str:
    """`tensor_sha256` of a v3 cartridge: over the block table and the index tensors."""
    h = hashlib.sha256(b"lcc-v3 blocks\n")
    h.update(table.contiguous().numpy().tobytes())
    for name in sorted(index):
        t = index[name].contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_cartridge(m: dict, tensors: dict[str, torch.Tensor]) -> Cartridge:
    """Step 7: the Cartridge, v1 files converted to the v2 layout (keys moved exactly)."""
    layers = m["model"]["num_layers"]
    keys = [tensors[f"k.{i}"] for i in range(layers)]
    values = [tensors[f"v.{i}"] for i in range(layers)]
    bias = [tensors[f"b.{i}"] for i in range(layers)] if m["buffer"].get("bias") else None
    shift = 0
    if m["format_version"] == 1:
        m, shift = mf.migrate_v1(m)
    buffer = Buffer(keys, values, positions(m) - shift, bias)
    if shift:
        buffer = buffer.moved(Rope.from_parameters(m["model"]["rope"], m["model"]["head_dim"]), shift)
    return Cartridge(m, buffer)


def check_digests(raw: RawFile, meta: dict, m: dict, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """v3, step 5: the block table and the index tensors against `tensor_sha256`, and the
    manifest against `lcc_checksum`. Returns the table and the index tensors."""
    table = raw.tensor(BLOCK_TABLE)
    index = {k: raw.tensor(k) for k in raw.header if k.startswith(INDEX_PREFIX)}
    digest = v3_digest(table, index)
    if digest != m["tensor_sha256"]:
        raise CartridgeError(f"{name}: tensor checksum mismatch (file corrupted or modified)")
    if meta.get("lcc_checksum") != checksum(meta["lcc_manifest"], digest):
        raise CartridgeError(f"{name}: manifest checksum mismatch (manifest edited or corrupted)")
    check_values({k: v for k, v in index.items() if v.is_floating_point()}, name)
    if any(int(v.min()) < 0 for v in index.values() if not v.is_floating_point() and v.numel()):
        raise CartridgeError(f"{name}: an index tensor holds negative token ids")
    return table, index


def read_blocks(raw: RawFile, m: dict, table: torch.Tensor, first: int, last: int, name: str) -> dict:
    """v3, step 6: blocks first..last of every stored tensor, each block checked against its
    sha256 in the table; nothing outside them is read."""
    block, t = m["buffer"]["block_entries"], m["buffer"]["total_slots"]
    lo, hi = first * block, min((last + 1) * block, t)
    names = [k for k in raw.header if k not in ("__metadata__", BLOCK_TABLE) and not k.startswith(INDEX_PREFIX)]
    rows = {k: raw.tensor(k, (first, last + 1) if k in st.BLOCK_TENSORS else (lo, hi)) for k in names}
    for j in range(first, last + 1):
        a, b = j * block - lo, min((j + 1) * block, t) - lo
        got = block_sha256({k: (r[j - first: j - first + 1] if k in st.BLOCK_TENSORS else r[a:b])
                            for k, r in rows.items()})
        if got != table[j].numpy().tobytes():
            raise CartridgeError(f"{name}: block {j} (entries {lo + a}..{lo + b - 1}) fails its checksum "
                                 f"(file corrupted or modified)")
    return rows


def decode_rows(rows: dict, m: dict, first_entry: int, name: str) -> tuple[list, list, list | None, float]:
    """v3, step 7: stored rows to float32 keys, values and biases, every value checked
    (finite, plausible; a quantised cartridge's scales positive, as every writer stores them);
    returns them and the largest magnitude."""
    for scale in ("k.scale", "v.scale"):
        if scale in rows and not bool((rows[scale].float() > 0).all()):
            raise CartridgeError(f"{name}: a {scale} is zero or negative (file corrupted or modified)")
    keys, values, bias = st.decode(rows, m["buffer"]["dtype"], m["buffer"]["block_entries"], first_entry)
    largest = check_values({**{f"k.{i}": t for i, t in enumerate(keys)}, **{f"v.{i}": t for i, t in enumerate(values)},
                            **{f"b.{i}": t for i, t in enumerate(bias or [])}}, name)
    return keys, values, bias, largest


class CartridgeFile:
    """An open cartridge, its manifest and (v3) block table checked: entries are read on
    demand by range, each read checking the sha256 of every block it touches and the values it
    decodes. v1 and v2 files are read and checked whole when opened."""

    def __init__(self, source: Path | bytes, name: str, allow_partial: bool = False):
        self.name = name
        self.raw = read_raw(source, name)
        self.meta, m = read_manifest(self.raw, name)
        mf.validate(m, name)
        check_tensor_entries(self.raw, m, name)
        if m.get("partial") and not allow_partial:
            raise CartridgeError(f"{name} is an unfinished compile, not a cartridge",
                                 hint="finish it with `lcc compile ... --resume`")
        self.version = m["format_version"]
        self._whole: Cartridge | None = None
        self.index: dict[str, torch.Tensor] = {}
        if self.version >= 3:
            self.table, self.index = check_digests(self.raw, self.meta, m, name)
            self.manifest = m
            self.positions = positions(m)
        else:
            self._whole = _parse_legacy(self.raw, self.meta, m, name)
            self.manifest = self._whole.manifest
            self.positions = self._whole.buffer.positions

    @property
    def entries(self) -> int:
        return int(self.manifest["buffer"]["total_slots"])

    @property
    def block(self) -> int:
        return int(self.manifest["buffer"].get("block_entries") or self.entries)

    def read(self, start: int, stop: int) -> Buffer:
        """Entries start..stop-1 as a Buffer (float32 keys and values, biases if stored)."""
        if not 0 <= start <= stop <= self.entries:
            raise CartridgeError(f"{self.name}: entries {start}..{stop} lie outside its {self.entries}")
        if self._whole is not None:
            return self._whole.buffer.select(start, stop)
        if start == stop:
            return self.read(0, 1).select(0, 0)
        first, last = start // self.block, (stop - 1) // self.block
        lo, hi = first * self.block, min((last + 1) * self.block, self.entries)
        rows = read_blocks(self.raw, self.manifest, self.table, first, last, self.name)
        keys, values, bias, _ = decode_rows(rows, self.manifest, lo, self.name)
        return Buffer(keys, values, self.positions[lo:hi].clone(), bias).select(start - lo, stop - lo)

    def cartridge(self) -> Cartridge:
        """Every entry: the whole cartridge in memory."""
        if self._whole is None:
            self._whole = Cartridge(self.manifest, self.read(0, self.entries), self.index or None)
        return self._whole


def _parse_legacy(raw: RawFile, meta: dict, m: dict, name: str) -> Cartridge:
    """v1/v2: every tensor read, both checksums and the values checked, v1 converted."""
    tensors = read_tensors(raw, name)
    check_checksums(meta, m, tensors, name)
    check_values(tensors, name)
    return to_cartridge(m, tensors)


def open_cartridge(path: str | Path, allow_partial: bool = False) -> CartridgeFile:
    """A cartridge file opened for ranged reads (a regular file only)."""
    path = Path(path)
    if not path.exists():
        raise CartridgeError(f"no such cartridge: {path}")
    if not path.is_file():
        raise CartridgeError(f"{path} is not a regular file (a directory, device or pipe?)")
    return CartridgeFile(path, path.name, allow_partial)


def open_held(path: str | Path, name: str | None = None, allow_partial: bool = False) -> CartridgeFile:
    """The one way lcc opens a cartridge it must not be tricked into reading through a link (a
    served folder, a library): opened without following a link, its descriptor held open for
    as long as the CartridgeFile lives. Every ranged read goes through it (/proc/self/fd/N),
    so a file swapped for a link or for another file after it was opened is never read
    instead. (Where there is no /proc, its bytes are read once.) `stat` is the file's, as
    opened."""
    import errno
    import os
    import stat
    import weakref

    path = Path(path)
    shown = name or path.name
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO cannot hang the open
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CartridgeError(f"{shown} is a symbolic link (links are not followed)") from exc
        raise CartridgeError(f"cannot open {shown}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CartridgeError(f"{shown} is not a regular file")
        through = Path(f"/proc/self/fd/{fd}")
        if not through.exists():
            with os.fdopen(os.dup(fd), "rb") as f:
                through = f.read()
        held = CartridgeFile(through, shown, allow_partial)
    except BaseException:
        os.close(fd)
        raise
    held.stat = st
    weakref.finalize(held, os.close, fd)
    return held


def parse(source: Path | bytes, name: str, allow_partial: bool = False) -> Cartridge:
    """All steps in order, every entry read; the first defect raises."""
    return CartridgeFile(source, name, allow_partial).cartridge()


def load_cartridge(path: str | Path, allow_partial: bool = False) -> Cartridge:
    return open_cartridge(path, allow_partial).cartridge()


def from_bytes(data: bytes, name: str = "cartridge") -> Cartridge:
    return parse(data, name)


# --- writing ----------------------------------------------------------------------------------

def to_bytes(cart: Cartridge, storage: str | None = None) -> bytes:
    """Serialise (v3). `storage` (float32, bfloat16, float16, int8, int4): how keys and values
    are kept; default the manifest's `buffer.dtype`, else the buffer's own dtype.
    The manifest's dtype, block size and digests are filled in here."""
    if cart.manifest["buffer"].get("layout") == "v1":
        cart = relayout(cart)
    m, buffer = cart.manifest, cart.buffer
    if buffer.positions.tolist() != positions(m).tolist():
        raise CartridgeError("internal: buffer positions disagree with the manifest")
    if storage is None:
        declared = m["buffer"].get("dtype")
        storage = declared if declared in st.STORAGE else str(buffer.dtype).removeprefix("torch.")
    m["format_version"] = mf.FORMAT_VERSION
    m["buffer"]["dtype"] = storage
    block = m["buffer"].setdefault("block_entries", 64)
    if buffer.bias is not None:
        m["buffer"]["bias"] = True
    else:
        m["buffer"].pop("bias", None)
    tensors = reblock(m, st.encode(buffer.keys, buffer.values, storage, block, buffer.bias))
    index = {k: v.detach().cpu().contiguous() for k, v in (cart.index_tensors or {}).items()}
    return seal(m, {**tensors, **index})


def seal(m: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """The file for a v3 manifest and its tensors, `tensor_sha256` and `lcc_checksum` computed
    from the block table and index tensors given. Unkeyed: anyone can do this (docs/format.md)."""
    from safetensors.torch import save

    index = {k: v for k, v in tensors.items() if k.startswith(INDEX_PREFIX)}
    m["tensor_sha256"] = v3_digest(tensors[BLOCK_TABLE], index)
    text = json.dumps(m, sort_keys=True)
    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={"lcc_manifest": text, "lcc_checksum": checksum(text, m["tensor_sha256"])})


def reblock(m: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with a block table recomputed from their content (an edit re-signed, as an
    attacker can; tests use it)."""
    block = m["buffer"]["block_entries"]
    t = tensors["k"].shape[0]
    content = {k: v for k, v in tensors.items() if k != BLOCK_TABLE and not k.startswith(INDEX_PREFIX)}
    table = torch.zeros(-(-t // block), 32, dtype=torch.uint8)
    for j in range(table.shape[0]):
        a, b = j * block, min((j + 1) * block, t)
        digest = block_sha256({k: (v[j: j + 1] if k in st.BLOCK_TENSORS else v[a:b]) for k, v in content.items()})
        table[j] = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
    return {**tensors, BLOCK_TABLE: table}


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

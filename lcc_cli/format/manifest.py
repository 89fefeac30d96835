"""The cartridge manifest: its schema, its bounds, and the v1 -> v2 migration.

Every number in a manifest is checked here against sane bounds and against the other numbers
before anything is allocated from it: a re-signed manifest is untrusted input (the checksums
catch accidents, not attackers). The layout rule is checked too: in a v2 file, segment i
occupies RoPE positions start_i .. start_i+slots_i-1 with start_i the sum of the slots
before it, and the question starts at the total. A manifest that lies about positions is
refused instead of producing fluent nonsense. Spec: docs/format.md.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

from ..errors import CartridgeError
from .layouts import layout_of
from .storage import STORAGE

FORMAT_NAME = "lcc-cartridge"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

# Far beyond any real model or cartridge, far below what could exhaust memory to represent.
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_SLOTS = 10_000_000
MAX_POSITION = 100_000_000
FLOAT_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAX_BLOCK = 1 << 16
MAX_PAGES = 1_000_000
MAX_PAGE_TEXT = 100_000  # characters; a page is a sentence or a few dozen tokens

_REQUIRED = {"format": str, "format_version": int, "model": dict, "buffer": dict, "source": dict,
             "compile": dict, "metrics": dict, "lcc_version": str, "created": str, "tensor_sha256": str}
_REQUIRED_MODEL = {"id": str, "fingerprint": str, "num_layers": int, "num_kv_heads": int, "head_dim": int,
                   "dtype": str}
_REQUIRED_SEGMENT = {"index": int, "position_start": int, "slots": int, "token_count": int}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def consecutive_segments(rows: list[dict]) -> list[dict]:
    """Give each segment row (index, slots, token_count, ...) its position in the consecutive
    layout: one after another, like consecutive text, starting at 0."""
    out, start = [], 0
    for row in rows:
        out.append({**row, "position_start": start})
        start += row["slots"]
    return out


def build(*, model: dict, segments: list[dict], source: dict, compile: dict, compiler: dict, metrics: dict,
          version: str, storage_dtype: str, partial: bool = False, block: int = 64, index: dict | None = None,
          prompt: dict | None = None) -> dict:
    """A v3 manifest: buffers laid out consecutively (see `consecutive_segments`), then, with
    `index`, the document's own KV window by window (layout `indexed`)."""
    segments = consecutive_segments(segments)
    gist = sum(s["slots"] for s in segments)
    extra = sum(w["entries"] for w in index["windows"]) if index else 0
    ends = [s["position_start"] + s["slots"] for s in segments]
    ends += [w["position_start"] + w["entries"] for w in (index or {}).get("windows", [])]
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": model,
        "buffer": {"total_slots": gist + extra, "first_query_position": max(ends, default=0),
                   "layout": "indexed" if index else "consecutive", "dtype": storage_dtype, "block_entries": block,
                   "segments": segments},
        "source": source, "compile": compile, "compiler": compiler, "metrics": metrics,
        "lcc_version": version, "created": now(), "tensor_sha256": "",
    }
    if index:
        manifest["index"] = index
    if prompt:  # the system turn the cartridge's entries were encoded in (read at ask time as it was)
        manifest["prompt"] = prompt
    if partial:
        manifest["partial"] = True
    return manifest


def validate(m: object, name: str = "cartridge") -> None:
    """Check the version, the schema and every count and position; CartridgeError if wrong."""
    if not isinstance(m, dict):
        raise CartridgeError(f"{name}: manifest is not a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise CartridgeError(f"{name}: not an lcc cartridge (format {str(m.get('format'))[:40]!r})")
    version = m.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CartridgeError(f"{name} uses format version {version}; this lcc reads up to {FORMAT_VERSION}",
                             hint="upgrade lcc")
    _require(m, _REQUIRED, name, "manifest")
    if version not in READABLE_VERSIONS:
        raise CartridgeError(f"{name}: unsupported format version {version!r}")
    model = m["model"]
    _require(model, _REQUIRED_MODEL, name, "model")
    _bounded(model["num_layers"], 1, MAX_LAYERS, name, "model.num_layers")
    _bounded(model["num_kv_heads"], 1, MAX_KV_HEADS, name, "model.num_kv_heads")
    _bounded(model["head_dim"], 2, MAX_HEAD_DIM, name, "model.head_dim")
    if model["head_dim"] % 2:
        raise CartridgeError(f"{name}: model.head_dim must be even (RoPE rotates pairs)")
    if version == 1:
        _validate_rope_v1(model, name)
    else:
        _validate_rope(model.get("rope"), name)
    buf = m["buffer"]
    _require(buf, {"total_slots": int, "first_query_position": int, "segments": list}, name, "buffer")
    _bounded(buf["total_slots"], 1, MAX_SLOTS, name, "buffer.total_slots")
    segments = buf["segments"]
    if len(segments) > buf["total_slots"]:
        raise CartridgeError(f"{name}: more segments than slots")
    for seg in segments:
        _require(seg, _REQUIRED_SEGMENT, name, "segment")
        _bounded(seg["slots"], 1, MAX_SLOTS, name, "segment.slots")
        _bounded(seg["position_start"], 0, MAX_POSITION, name, "segment.position_start")
        _bounded(seg["token_count"], 0, MAX_POSITION, name, "segment.token_count")
        _bounded(seg["index"], 0, MAX_SLOTS, name, "segment.index")
    layout = layout_of(m, name)
    if layout.partial_only and m.get("partial") is not True:
        raise CartridgeError(f"{name}: buffer.layout {layout.name!r} is only for an unfinished compile")
    if layout.readable_only and version != 1:
        raise CartridgeError(f"{name}: buffer.layout {layout.name!r} is never written to a file")
    if not segments and not layout.indexed:
        raise CartridgeError(f"{name}: manifest lists no segments")
    gist = sum(s["slots"] for s in segments)
    if ("index" in m) != layout.indexed:
        raise CartridgeError(f"{name}: an `index` belongs with layout 'indexed', and only there")
    windows = _validate_index(m, gist, name) if layout.indexed else []
    if buf["total_slots"] != gist + sum(w["entries"] for w in windows):
        raise CartridgeError(f"{name}: segment slots do not add up to total_slots")
    for seg, start in zip(segments, layout.segment_starts(segments)):
        if seg["position_start"] != start:
            what = f"a v1 buffer sits right after its {seg['token_count']} tokens" if version == 1 else \
                f"its layout puts it at {start}"
            raise CartridgeError(f"{name}: segment {seg['index']} claims position {seg['position_start']}; {what}")
    ends = [s["position_start"] + s["slots"] for s in segments] + [w["position_start"] + w["entries"] for w in windows]
    if buf["first_query_position"] != max(ends):
        raise CartridgeError(f"{name}: first_query_position is not one past the last buffer position")
    if version == 1:
        return
    allowed = FLOAT_DTYPES if version == 2 else STORAGE
    if not isinstance(buf.get("dtype"), str) or buf["dtype"] not in allowed:
        raise CartridgeError(f"{name}: buffer.dtype must be one of {', '.join(allowed)}")
    if version >= 3:
        _require(buf, {"block_entries": int}, name, "buffer")
        _bounded(buf["block_entries"], 1, MAX_BLOCK, name, "buffer.block_entries")
    if not isinstance(buf.get("bias", False), bool):
        raise CartridgeError(f"{name}: buffer.bias must be true or false")
    sinks = [s.get("sink", False) for s in segments]
    if not all(isinstance(s, bool) for s in sinks):
        raise CartridgeError(f"{name}: segment.sink must be true or false")


def _validate_index(m: dict, gist: int, name: str) -> list[dict]:
    """An indexed cartridge's `index`: windows of the document's KV stored one after another
    after the gist's entries, each at consecutive positions; pages and always-read ranges inside
    them. Returns the windows."""
    index = m.get("index")
    _require(index, {"windows": list, "pages": list, "always": list, "doc_tokens": int}, name, "index")
    _bounded(index["doc_tokens"], 0, MAX_POSITION, name, "index.doc_tokens")
    windows = index["windows"]
    if not windows or len(windows) > MAX_SLOTS:
        raise CartridgeError(f"{name}: index.windows must list the document's windows")
    entry = gist
    for w in windows:
        _require(w, {"entry_start": int, "entries": int, "position_start": int}, name, "index.windows")
        _bounded(w["entries"], 1, MAX_SLOTS, name, "index.windows.entries")
        _bounded(w["position_start"], 0, MAX_POSITION, name, "index.windows.position_start")
        if w["entry_start"] != entry:
            raise CartridgeError(f"{name}: index window at entry {w['entry_start']}; the one before ends at {entry}")
        entry += w["entries"]
    pages = index["pages"]
    if len(pages) > MAX_PAGES:
        raise CartridgeError(f"{name}: index.pages lists {len(pages):,} pages; at most {MAX_PAGES:,}")
    ends = [w["entry_start"] + w["entries"] for w in windows]
    last, w = gist, 0
    for p in pages:
        _require(p, {"start": int, "entries": int, "text": str}, name, "index.pages")
        _bounded(p["entries"], 1, MAX_SLOTS, name, "index.pages.entries")
        if p["start"] < last or p["start"] + p["entries"] > entry:
            raise CartridgeError(f"{name}: index pages overlap, are out of order or lie outside the document's entries")
        while ends[w] <= p["start"]:
            w += 1
        if p["start"] + p["entries"] > ends[w]:  # re-laid, its entries would not keep their distances
            raise CartridgeError(f"{name}: an index page spans two windows")
        if len(p["text"]) > MAX_PAGE_TEXT:
            raise CartridgeError(f"{name}: an index page's text is over {MAX_PAGE_TEXT:,} characters")
        last = p["start"] + p["entries"]
    always = index["always"]
    if not 1 <= len(always) <= 2:
        raise CartridgeError(f"{name}: index.always must hold the header's range and the end of the turn's")
    previous = gist
    for r in always:
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or not previous <= r[0] < r[1] <= entry):
            raise CartridgeError(f"{name}: index.always must be ordered [start, stop] entry ranges of the document's "
                                 f"entries")
        previous = r[1]
    if always[0][0] != gist:
        raise CartridgeError(f"{name}: index.always must start with the header, at the first index entry")
    source = m["source"]
    tokens, ratio = source.get("token_count"), source.get("ratio")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_POSITION:
        raise CartridgeError(f"{name}: source.token_count of an indexed cartridge must be a count of tokens")
    if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool)
                              or not math.isfinite(ratio) or not 1 <= ratio <= 1e6):
        raise CartridgeError(f"{name}: source.ratio must be a number of at least 1")
    return windows


def _validate_rope(rope: object, name: str) -> None:
    if not isinstance(rope, dict) or not isinstance(rope.get("rope_type"), str):
        raise CartridgeError(f"{name}: manifest field model.rope is missing (RoPE type and theta)")
    theta = rope.get("rope_theta")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 1:
        raise CartridgeError(f"{name}: model.rope.rope_theta is missing or not a number above 1")


def _validate_rope_v1(model: dict, name: str) -> None:
    theta = model.get("rope_theta")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 1:
        raise CartridgeError(f"{name}: v1 manifest has no usable model.rope_theta; its keys cannot be placed")


def _bounded(value: int, low: int, high: int, name: str, where: str) -> None:
    if not low <= value <= high:
        raise CartridgeError(f"{name}: {where} = {value} is out of range ({low}..{high})")


def _require(obj: object, fields: dict, name: str, where: str) -> None:
    if not isinstance(obj, dict):
        raise CartridgeError(f"{name}: {where} entry is not an object")
    for key, typ in fields.items():
        value = obj.get(key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise CartridgeError(f"{name}: manifest field {where}.{key} is missing or not {typ.__name__}")


def migrate_v1(m: dict) -> tuple[dict, int]:
    """The v2 manifest of a validated v1 one, and the shift (-min position) its keys need.

    v1 buffers sat at positions token_count.. of their own segment and the question after the
    largest; moving every key by the same shift keeps every query-key distance, so answers
    do not change. v1 recorded only rope_theta: the conversion assumes the plain RoPE that
    lcc 0.1 models had, and the model check refuses any model whose RoPE differs."""
    segments = m["buffer"]["segments"]
    shift = -min(s["position_start"] for s in segments)
    model = {k: v for k, v in m["model"].items() if k not in ("rope_theta", "rope_baked_into_keys")}
    model["rope"] = {"rope_type": "default", "rope_theta": float(m["model"]["rope_theta"])}
    new = {**m, "format_version": 2, "model": model, "converted_from": 1}  # the v2 shape it is converted to
    new["buffer"] = {**m["buffer"], "layout": "v1", "dtype": m["model"]["dtype"],
                     "first_query_position": m["buffer"]["first_query_position"] + shift,
                     "segments": [{**s, "position_start": s["position_start"] + shift} for s in segments]}
    new.setdefault("compiler", {"name": "optimise", "steps": m["compile"].get("steps")})
    return new, shift

"""Input text: read a source document (plain text, Markdown or PDF, or stdin) into a
`Document`, and split its text into `TextSegment`s that each fit one compile.

Only text leaves this module. Every way a file can be unusable (missing, empty, binary, not
UTF-8, encrypted or scanned PDF, too large, unknown type, not a regular file) becomes an
`InputError` with a one-line message. A TextSegment is input text; its compiled form is a
`Buffer` (buffer.py): two words for two things.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text", ".rst")
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + (".pdf",)
# 20 MB of source is already far more than one cartridge can usefully hold.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
STDIN = "-"


@dataclass(frozen=True)
class Document:
    text: str
    sha256: str  # of the source bytes: `verify --source` compares against it
    name: str


@dataclass(frozen=True)
class TextSegment:
    """One piece of a document's text, compiled on its own into one buffer."""

    index: int
    text: str


def read_document(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Document:
    """Read and normalise a document; `-` reads stdin."""
    if str(path) == STDIN:
        data = sys.stdin.buffer.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise InputError(f"stdin holds more than the {max_bytes:,}-byte limit", hint="raise it with --max-bytes")
        return _document(data, "stdin", ".txt")
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    check_readable(path, st)
    if st.st_size > max_bytes:
        raise InputError(f"{path.name} is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit",
                         hint="raise it with --max-bytes")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # a pipe has no size to check beforehand
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise InputError(f"{path.name} holds more than the {max_bytes:,}-byte limit", hint="raise it with --max-bytes")
    return _document(data, path.name, path.suffix.lower(), path)


def document_from_bytes(data: bytes, name: str = "document.txt") -> Document:
    """A document from bytes already in memory; `name`'s suffix says how to read them (.pdf,
    .md, .txt; a PDF is also known by its first bytes)."""
    return _document(data, name, Path(name).suffix.lower())


def check_readable(path: Path, st) -> None:
    """The one rule for every input lcc reads (documents, questions, datasets, training data):
    a regular file, or a pipe (a FIFO, `<(...)`, stdin as '-'), read once from start to end.
    Directories and devices are refused. A pipe that nobody writes to waits, as it does for
    any program that reads it."""
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path} is a directory, not a file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise InputError(f"not a regular file or a pipe: {path}")


def _document(data: bytes, name: str, suffix: str, path: Path | None = None) -> Document:
    if not data.strip():
        raise InputError(f"{name} is empty")
    if suffix == ".pdf" or data.startswith(b"%PDF-"):
        text = _pdf_text(data, name)
    elif suffix in TEXT_SUFFIXES or suffix == "":
        text = _decode_text(data, name)
    else:
        raise InputError(f"unsupported file type '{suffix}' for {name}", hint="lcc reads .txt, .md and .pdf")
    text = _normalise(text)
    if not text:
        raise InputError(f"{name} holds no text")
    return Document(text=text, sha256=hashlib.sha256(data).hexdigest(), name=name)


def _decode_text(data: bytes, name: str) -> str:
    if b"\x00" in data[:8192]:
        raise InputError(f"{name} looks binary, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not valid UTF-8 (byte {exc.start})",
                         hint="convert it, e.g. iconv -f latin1 -t utf-8") from exc


def _pdf_text(data: bytes, name: str) -> str:
    import io
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise InputError(f"{name} is an encrypted PDF", hint="decrypt it first (e.g. qpdf --decrypt)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except InputError:
        raise
    except Exception as exc:  # pypdf raises many types (and RecursionError) on a damaged file
        raise InputError(f"{name} is not a readable PDF: {exc}".splitlines()[0][:200]) from exc
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        raise InputError(f"{name} has no extractable text (a scanned PDF?)", hint="run OCR on it first")
    return text


def _normalise(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out: list[str] = []
    for line in lines:  # collapse runs of blank lines: they cost tokens and carry nothing
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


# --- splitting ------------------------------------------------------------------------------

# Where a cut may fall, best first: a paragraph break, a sentence end, any whitespace.
_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"(?<=[.!?])\s+"), re.compile(r"\s+"))


def split_text(text: str, token_spans: Callable[[str], list[tuple[int, int]]], max_tokens: int) -> list[str]:
    """Split text into pieces of at most `max_tokens` tokens, cutting at paragraph breaks
    where possible, then at sentence ends, then at whitespace, and inside a word (a URL, a
    base64 blob) only as a last resort. `token_spans(text)` gives each token's character
    span (one tokenizer pass); cut points come from one regex pass per kind, so the whole
    split is linear in the text, not quadratic."""
    spans = token_spans(text)
    if len(spans) <= max_tokens:
        return [text.strip()] if text.strip() else []
    token_ends = [end for _, end in spans]
    cuts = [[m.start() for m in pattern.finditer(text)] for pattern in _BREAKS]
    pieces, start, first_token = [], 0, 0
    while first_token < len(spans):
        last = first_token + max_tokens  # tokens first_token..last-1 fit
        if last >= len(spans):
            pieces.append(text[start:])
            break
        limit = token_ends[last - 1]
        cut = _best_cut(cuts, start, limit) or limit
        pieces.append(text[start:cut])
        start = cut
        first_token = bisect.bisect_right(token_ends, cut)
    out = []
    for piece in (p.strip() for p in pieces):
        # Tokenised alone, a piece can come out a token or two longer than its share of the
        # whole (merges at its edges); split those again with the excess taken off.
        excess = len(token_spans(piece)) - max_tokens if piece else 0
        budget = max(max_tokens // 2, max_tokens - excess)
        out.extend(split_text(piece, token_spans, budget) if excess > 0 and budget < max_tokens else [piece] if piece else [])
    return out


def _best_cut(cuts: list[list[int]], start: int, limit: int) -> int | None:
    """The latest cut point of the best kind in the second half of (start, limit]: a
    paragraph break right after a title must not make a one-line segment."""
    half = start + (limit - start) // 2
    for points in cuts:
        i = bisect.bisect_right(points, limit) - 1
        if i >= 0 and points[i] > half:
            return points[i]
    return None


def token_spans_of(tokenizer):
    """`token_spans` for split_text from a Hugging Face (fast) tokenizer: one pass, offsets."""
    def spans(text: str) -> list[tuple[int, int]]:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    return spans


def read_input(path: str | Path, what: str = "file") -> bytes:
    """The bytes of an input (a regular file or a pipe, read once; '-' reads stdin)."""
    try:
        if str(path) != STDIN:
            check_readable(Path(path), Path(path).stat())
        return sys.stdin.buffer.read() if str(path) == STDIN else Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from exc


def read_jsonl(path: str | Path, what: str = "file", raw: bytes | None = None) -> list[tuple[int, str, object]]:
    """(line number, line, parsed value or None if it is not JSON) for each non-blank line of
    a UTF-8 (BOM allowed) JSON-lines file; '-' reads stdin. InputError if unreadable. `raw`:
    the input's bytes, when the caller has read them already (a pipe can be read only once)."""
    import json

    raw = read_input(path, what) if raw is None else raw
    try:
        text = raw.decode("utf-8-sig")  # stdin as bytes too: binary input is "not UTF-8", not a bad row
    except UnicodeDecodeError as exc:
        raise InputError(f"{Path(str(path)).name} is not valid UTF-8 (byte {exc.start})") from exc
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        out.append((number, line.strip(), value))
    return out


# --- batch compile: which files, and the name of each one's cartridge -------------------------

def expand_sources(sources: list, unlisted: list | None = None) -> list[Path]:
    """Files as given; folders walked (recursively, sorted) for documents lcc reads. A folder
    that cannot be listed is added to `unlisted` as (folder, reason) instead of vanishing."""
    import os

    out = []
    for source in map(Path, sources):
        if not source.is_dir():
            out.append(source)
            continue

        def failed(exc: OSError) -> None:
            if unlisted is not None:
                unlisted.append((exc.filename or str(source), exc.strerror or str(exc)))

        found = []
        for root, dirs, files in os.walk(source, onerror=failed):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(root) / f for f in files if not f.startswith(".")
                      and Path(f).suffix.lower() in DOCUMENT_SUFFIXES and (Path(root) / f).is_file()]
        out += sorted(found)
    return out


def output_names(files: list[Path], out_dir: Path) -> list[Path]:
    """One distinct cartridge name per source, decided before any work: STEM.lcc, or
    STEM-2.lcc, STEM-3.lcc... when a name is taken by an earlier source of the batch (names
    are compared case-blind: some file systems are). A name that is taken is never reused,
    even by a source whose own stem looks like `doc-2`."""
    used: set[str] = set()
    names = []
    for f in files:
        stem = f.stem or "document"
        name, n = f"{stem}.lcc", 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}.lcc"
        used.add(name.lower())
        names.append(out_dir / name)
    return names


def distinct(files: list[Path]) -> list[Path]:
    """Sources named twice (the same file by two paths) are compiled once."""
    seen, out = set(), []
    for f in files:
        try:
            key = f.resolve()
        except OSError:
            key = f
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out

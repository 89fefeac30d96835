"""Read a source document (plain text, Markdown or PDF) into a `Document`.

Only text leaves this module. Every way a file can be unusable (missing, empty, binary,
not UTF-8, encrypted or scanned PDF, too large, unknown type) becomes an `InputError` with
a one-line message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".rst"}
# 20 MB of source is already far more than one cartridge can usefully hold.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class Document:
    text: str
    sha256: str  # of the source file's bytes: `verify --source` compares against it
    name: str


def read_document(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Document:
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if not path.is_file():
        raise InputError(f"not a regular file: {path}")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(f"{path.name} is {size:,} bytes, over the {max_bytes:,}-byte limit",
                             hint="raise it with --max-bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if not data.strip():
        raise InputError(f"{path.name} is empty")
    suffix = path.suffix.lower()
    if suffix == ".pdf" or data.startswith(b"%PDF-"):
        text = _pdf_text(path)
    elif suffix in TEXT_SUFFIXES or suffix == "":
        text = _decode_text(data, path.name)
    else:
        raise InputError(f"unsupported file type '{suffix}' for {path.name}",
                         hint="lcc reads .txt, .md and .pdf")
    text = _normalise(text)
    if not text:
        raise InputError(f"{path.name} holds no text")
    return Document(text=text, sha256=hashlib.sha256(data).hexdigest(), name=path.name)


def _decode_text(data: bytes, name: str) -> str:
    if b"\x00" in data[:8192]:
        raise InputError(f"{name} looks binary, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not valid UTF-8 (byte {exc.start})",
                         hint="convert it, e.g. iconv -f latin1 -t utf-8") from exc


def _pdf_text(path: Path) -> str:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise InputError(f"{path.name} is an encrypted PDF", hint="decrypt it first (e.g. qpdf --decrypt)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except InputError:
        raise
    except (PdfReadError, Exception) as exc:  # pypdf raises many types on a damaged file
        raise InputError(f"{path.name} is not a readable PDF: {exc}".splitlines()[0]) from exc
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        raise InputError(f"{path.name} has no extractable text (a scanned PDF?)", hint="run OCR on it first")
    return text


def _normalise(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out: list[str] = []
    for line in lines:  # collapse runs of blank lines: they cost tokens and carry nothing
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def split_segments(text: str, count_tokens, max_tokens: int) -> list[str]:
    """Split text into segments of at most `max_tokens` tokens, on paragraph boundaries
    where possible, then on sentences, and on raw token windows only as a last resort.
    `count_tokens(str) -> int` is the model tokenizer's counter."""
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if count_tokens(para) <= max_tokens:
            pieces.append(para)
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", para):
            pieces.extend(_hard_split(sentence, count_tokens, max_tokens))
    segments: list[str] = []
    current = ""
    for piece in pieces:
        joined = f"{current}\n\n{piece}" if current else piece
        if current and count_tokens(joined) > max_tokens:
            segments.append(current)
            current = piece
        else:
            current = joined
    if current:
        segments.append(current)
    return segments


def _hard_split(sentence: str, count_tokens, max_tokens: int) -> list[str]:
    """Split an over-long sentence by words; a single word longer than the limit (a URL, a
    base64 blob) is cut into character windows."""
    if count_tokens(sentence) <= max_tokens:
        return [sentence]
    out, current = [], ""
    words = []
    for word in sentence.split():
        while count_tokens(word) > max_tokens:
            cut = max(1, len(word) * max_tokens // (2 * count_tokens(word)))
            words.append(word[:cut])
            word = word[cut:]
        words.append(word)
    for word in words:
        joined = f"{current} {word}" if current else word
        if current and count_tokens(joined) > max_tokens:
            out.append(current)
            current = word
        else:
            current = joined
    if current:
        out.append(current)
    return out

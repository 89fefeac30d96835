"""Reading sources: text, Markdown, PDF, and every unusable input as a one-line InputError."""

from __future__ import annotations

import hashlib

import pytest

from lcc_cli.errors import InputError
import re

from lcc_cli.ingest import read_document, split_text
from pdfs import blank_pdf, encrypted_pdf, text_pdf


def test_text_and_markdown(tmp_path):
    p = tmp_path / "a.md"
    p.write_bytes("# Title\r\n\r\n\r\n\r\nBody text.\r\n".encode())
    doc = read_document(p)
    assert doc.text == "# Title\n\nBody text."
    assert doc.sha256 == hashlib.sha256(p.read_bytes()).hexdigest() and doc.name == "a.md"


def test_pdf_text_is_extracted(tmp_path):
    p = tmp_path / "a.pdf"
    p.write_bytes(text_pdf([["The bridge has seven arches."], ["It was built in 1742."]]))
    doc = read_document(p)
    assert "seven arches" in doc.text and "1742" in doc.text


@pytest.mark.parametrize("name,data,fragment", [
    ("empty.txt", b"", "empty"),
    ("blank.txt", b"\n\n   \n", "empty"),
    ("bin.txt", b"\x00\x01\x02\x03" * 50, "binary"),
    ("latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "not valid UTF-8"),
    ("x.docx", b"PK\x03\x04 zip", "unsupported file type"),
    ("scan.pdf", None, "no extractable text"),
    ("locked.pdf", None, "encrypted"),
    ("broken.pdf", b"%PDF-1.4\n this is not really a pdf", "PDF"),
])
def test_unusable_inputs(tmp_path, name, data, fragment):
    if name == "scan.pdf":
        data = blank_pdf()
    if name == "locked.pdf":
        data = encrypted_pdf(["secret text"])
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(InputError, match=fragment) as info:
        read_document(p)
    assert "\n" not in info.value.message


def test_size_limit(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("word " * 1000)
    with pytest.raises(InputError, match="limit"):
        read_document(p, max_bytes=100)
    assert read_document(p, max_bytes=10_000).text.startswith("word")


def test_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_document(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="is a directory"):
        read_document(tmp_path)
    with pytest.raises(InputError, match="not a regular file or a pipe"):
        read_document("/dev/zero")


def test_a_pipe_is_read_like_a_file(tmp_path):
    """Documents, questions, datasets and training data may come from a pipe (`<(...)`, a
    FIFO): read once, with the size limit applied while reading."""
    import os
    import threading

    import json

    from lcc_cli.api import read_questions
    from lcc_cli.training.data import read_training_data
    from lcc_cli.eval.data import load_dataset

    fifo = tmp_path / "p"
    row = json.dumps({"context": "A paragraph from a pipe.", "questions": [{"q": "From where?", "answers": ["pipe"]}]})
    os.mkfifo(fifo)

    def write(data: bytes):
        with open(fifo, "wb") as f:
            f.write(data)

    for data, read, check in ((b"A document from a pipe.", lambda: read_document(fifo), lambda r: "pipe" in r.text),
                              (b"first?\nsecond?\n", lambda: read_questions(fifo), lambda r: r == ["first?", "second?"]),
                              (row.encode(), lambda: load_dataset(fifo), lambda r: r[0]["questions"][0]["q"] == "From where?"),
                              # read once: the data's sha256 comes from the same bytes (a second open would wait)
                              (row.encode(), lambda: read_training_data([fifo]), lambda r: r[1][0]["rows"] == 1),
                              (b"word " * 100, lambda: read_document(fifo, max_bytes=50), None)):
        t = threading.Thread(target=write, args=(data,))
        t.start()
        try:
            if check is None:
                with pytest.raises(InputError, match="limit"):
                    read()
            else:
                assert check(read())
        finally:
            t.join(timeout=10)


def count_words(s: str) -> int:
    return len(s.split())


def word_spans(s: str) -> list[tuple[int, int]]:
    """A whitespace "tokenizer" for split tests: one token per word."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", s)]


def test_split_prefers_paragraphs_and_respects_the_limit():
    paras = [" ".join(f"p{i}w{j}." for j in range(8)) for i in range(6)]
    segments = split_text("\n\n".join(paras), word_spans, 20)
    assert all(count_words(s) <= 20 for s in segments)
    assert len(segments) == 3  # two 8-word paragraphs fit in 20, a third does not
    assert " ".join(segments).split() == "\n\n".join(paras).split()  # nothing lost or reordered


def test_split_breaks_long_paragraphs_by_sentence_then_word():
    text = "One two three. " * 10 + " ".join(["long"] * 50)
    segments = split_text(text, word_spans, 12)
    assert all(count_words(s) <= 12 for s in segments)
    assert " ".join(segments).split() == text.split()

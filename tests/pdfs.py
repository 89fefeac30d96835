"""Build small real PDFs in tests (text pages, blank 'scanned' pages, encrypted) without fixtures on disk."""

from __future__ import annotations


def text_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF with one Helvetica text line per entry, one list per page."""
    objects: list[bytes] = []
    kids = []
    font_id = 3
    page_ids = []
    next_id = 4
    bodies = []
    for lines in pages:
        content = "BT /F1 11 Tf 50 780 Td 14 TL " + " ".join(
            "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") '" for line in lines) + " ET"
        page_id, content_id = next_id, next_id + 1
        next_id += 2
        page_ids.append(page_id)
        bodies.append((page_id, f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] /Contents {content_id} 0 R "
                                f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()))
        stream = content.encode("latin-1", errors="replace")  # Helvetica here is Latin-1 only
        bodies.append((content_id, b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"))
        kids.append(f"{page_id} 0 R")
    objects = [(1, b"<< /Type /Catalog /Pages 2 0 R >>"),
               (2, f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>".encode()),
               (3, b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")] + bodies
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for oid, body in sorted(objects):
        offsets[oid] = len(out)
        out += b"%d 0 obj\n" % oid + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for oid in range(1, len(objects) + 1):
        out += b"%010d 00000 n \n" % offsets[oid]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def blank_pdf(pages: int = 2) -> bytes:
    """Pages with no text layer: what a scanned document looks like to a text extractor."""
    import io

    from pypdf import PdfWriter

    w = PdfWriter()
    for _ in range(pages):
        w.add_blank_page(612, 842)
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def encrypted_pdf(lines: list[str]) -> bytes:
    import io

    from pypdf import PdfReader, PdfWriter

    w = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf([lines]))))
    w.encrypt("secret")
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()

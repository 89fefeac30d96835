"""Write a multi-page PDF from paragraphs of the shared SQuAD sample (CC BY-SA 4.0), for
trying `lcc compile` on a long PDF. Usage:

    python scripts/make_sample_pdf.py ../shared/data/squad_dev_sample.jsonl /tmp/sample.pdf --pages 10
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pdfs import text_pdf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--pages", type=int, default=10)
    ap.add_argument("--lines-per-page", type=int, default=16)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    lines: list[str] = []
    for row in rows:
        text = row["context"].replace("\u2013", "-").replace("\u2014", "-").replace("\u2019", "'")
        lines += textwrap.wrap(text, 95) + [""]
        if len(lines) >= args.pages * args.lines_per_page:
            break
    per = args.lines_per_page
    pages = [lines[i:i + per] for i in range(0, args.pages * per, per)]
    args.out.write_bytes(text_pdf(pages))
    print(f"wrote {args.out}: {len(pages)} pages, {sum(len(p) for p in pages)} lines")


if __name__ == "__main__":
    main()

"""Evaluation datasets: JSONL rows of {"id", "title", "context", "questions": [{"q", "answers", "qid"}]}.

Every row is checked before anything slow starts, so a bad row fails at once with its line
number instead of after an hour of compiling.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..ingest import read_jsonl


def load_dataset(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():  # a regular file or a pipe; read_jsonl refuses anything else
        raise InputError(f"no such dataset: {path}")
    rows = []
    for number, _, row in read_jsonl(path, "dataset"):
        problem = _problem(row)
        if problem:
            raise InputError(f"{path.name} line {number}: not a dataset row ({problem})")
        row["id"] = str(row.get("id") or f"doc{number}")
        # Paired comparisons match answers by (document, qid): every question needs its own.
        for i, q in enumerate(row["questions"]):
            q["qid"] = str(q.get("qid") or f"{row['id']}#q{i}")
        if len({q["qid"] for q in row["questions"]}) < len(row["questions"]):
            raise InputError(f"{path.name} line {number}: not a dataset row (two questions share a qid)")
        rows.append(row)
    if not rows:
        raise InputError(f"{path.name} holds no documents")
    return rows


# Checked in characters before anything tokenises them: an eval document is compiled and read
# whole (a million characters is about 250,000 tokens), and a question is a sentence.
MAX_CONTEXT_CHARS = 1_000_000
MAX_QUESTION_CHARS = 10_000


def _problem(row) -> str | None:
    if not isinstance(row, dict):
        return "need a JSON object with context and questions"
    if not isinstance(row.get("context"), str) or not row["context"].strip():
        return "context must be non-empty text"
    if len(row["context"]) > MAX_CONTEXT_CHARS:
        return f"context is {len(row['context']):,} characters; at most {MAX_CONTEXT_CHARS:,}"
    if "id" in row and not isinstance(row["id"], (str, int)):
        return "id must be text or a number"
    if "title" in row and not isinstance(row["title"], (str, type(None))):
        return "title must be text"
    questions = row.get("questions")
    if not isinstance(questions, list) or not questions:
        return "questions must be a non-empty list"
    for q in questions:
        if not isinstance(q, dict) or not isinstance(q.get("q"), str) or not q["q"].strip():
            return "each question needs a text field q"
        if "qid" in q and not isinstance(q["qid"], (str, int)):
            return "qid must be text or a number"
        if len(q["q"]) > MAX_QUESTION_CHARS:
            return f"a question is {len(q['q']):,} characters; at most {MAX_QUESTION_CHARS:,}"
        answers = q.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            return "each question needs answers, a list of text"
    return None

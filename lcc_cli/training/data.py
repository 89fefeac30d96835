"""Training data: rows from JSONL, tokenised as `lcc compile` sees them, and the held-out split."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path


from ..config import TrainConfig
from ..errors import InputError
from ..ingest import split_text, token_spans_of


LONG_WORDS_PER_SEGMENT_TOKEN = 0.6
# A context this long (characters) is cut at load: training reads at most max_doc_tokens.
MAX_CONTEXT_CHARS = 200_000

# --- data -------------------------------------------------------------------------------------


@dataclass
class Row:
    text: str
    questions: list[dict]  # {"q", "answer" (str or None), "para" (int or None)}
    group: str  # what is held out together: the article title, or the row itself

    long: bool = False


def read_training_data(paths: list[Path], segment_tokens: int = 1024) -> tuple[list[Row], list[dict]]:
    """Rows of {"context" (or "text"), "title" (optional), "questions": [{"q", "answers"
    (optional), "para" (optional)}]} from JSONL files, and a record of each file (name,
    sha256, rows) for the compiler's manifest."""
    from ..ingest import read_input, read_jsonl

    rows, files = [], []
    for path in map(Path, paths):
        count = 0
        raw = read_input(path, "training data")  # read once: the data may be a pipe
        for number, _, row in read_jsonl(path, "training data", raw):
            text = row.get("context", row.get("text")) if isinstance(row, dict) else None
            questions = row.get("questions", []) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip() or not isinstance(questions, list) or not all(
                    isinstance(q, dict) and isinstance(q.get("q"), str) for q in questions):
                raise InputError(f"{path.name} line {number}: need \"context\" text and optional \"questions\" "
                                 f"[{{\"q\": ...}}]")
            qs = []
            for q in questions:
                answers = [a for a in q.get("answers") or [] if isinstance(a, str) and a.strip()]
                para = q.get("para")
                qs.append({"q": q["q"][:2000], "answer": answers[0].strip() if answers else None,
                           "para": para if isinstance(para, int) and not isinstance(para, bool) else None})
            title = row.get("title")
            group = title if isinstance(title, str) and title else f"{path.name}:{number}"
            text = text.strip()[:MAX_CONTEXT_CHARS]
            rows.append(Row(text, qs, group, len(text.split()) > LONG_WORDS_PER_SEGMENT_TOKEN * segment_tokens))
            count += 1
        files.append({"name": path.name, "sha256": hashlib.sha256(raw).hexdigest(), "rows": count})
    if not rows:
        raise InputError("the training data holds no documents")
    return rows, files


@dataclass
class Question:
    prompt: list[int]
    answer: list[int] | None  # gold answer + end of turn; None: the teacher answers greedily
    segment: int


@dataclass
class Doc:
    """A training document tokenised as `lcc compile` would see it."""

    segments: list[list[int]]  # each segment's context turn
    recon: list[int] | None  # reconstruction target (one-segment documents only)
    questions: list[Question]


def prepare(loaded, row: Row, cfg: TrainConfig) -> Doc:
    """Split and tokenise one row. A question belongs to the segment that holds its answer
    inside its paragraph (the paragraph's start when the answer is not found)."""
    p = loaded.prompter
    texts = split_text(row.text, token_spans_of(loaded.tokenizer), cfg.segment_tokens)
    starts, pos = [], 0
    for t in texts:
        at = row.text.find(t[:200], pos)
        starts.append(at if at >= 0 else pos)
        pos = starts[-1] + len(t)
    paras, offset = [], 0
    for para in row.text.split("\n\n"):
        paras.append((offset, para))
        offset += len(para) + 2
    texts = texts[: cfg.max_segments]
    questions = []
    for q in row.questions:
        if len(starts) > 1:
            if q["para"] is None or not 0 <= q["para"] < len(paras):
                continue  # a question of a long document without its paragraph: no segment to ask
            start, para = paras[q["para"]]
            found = para.find(q["answer"]) if q["answer"] else -1
            segment = max(i for i, s in enumerate(starts) if s <= start + max(found, 0))
            if segment >= len(texts):
                continue  # its segment is past max_segments
        else:
            segment = 0
        # The assistant turn starts on a fresh line: the answer is encoded without a leading space.
        answer = p.encode(q["answer"])[: cfg.response_tokens] + p.end_ids if q["answer"] else None
        questions.append(Question(p.query_ids(q["q"]), answer, segment))
    segments = [p.context_ids(t)[: cfg.max_doc_tokens] for t in texts]
    recon = p.document_ids(texts[0])[: cfg.recon_tokens] if len(texts) == 1 else None
    return Doc(segments, recon, questions)


def _ratio(rng: random.Random, cfg: TrainConfig) -> float:
    return math.exp(rng.uniform(math.log(cfg.min_ratio), math.log(cfg.max_ratio)))


def _order(count: int, index: int, seed: str) -> int:
    """The `index`-th document drawn: a fresh seeded permutation every epoch."""
    epoch, pos = divmod(index, count)
    perm = list(range(count))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(perm)
    return perm[pos]


@dataclass
class Split:
    """Which rows train and which are held out (whole groups, e.g. articles, at a time)."""

    short: list[int]
    long: list[int]
    heldout: list[int]


def split_rows(rows: list[Row], cfg: TrainConfig) -> Split:
    """Hold out whole groups (articles) until there are `heldout` paragraphs and
    `heldout_long` long documents with questions among them (at most a fifth of the groups);
    the held-out documents are then taken from those groups in turn, for variety."""
    groups = sorted({r.group for r in rows})
    random.Random(f"{cfg.seed}:heldout").shuffle(groups)
    want = {False: min(cfg.heldout, len(rows) // 5), True: cfg.heldout_long}
    members: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        members.setdefault(r.group, []).append(i)
    held: list[str] = []
    for g in groups:
        counts = {kind: sum(rows[i].long == kind and bool(rows[i].questions) for h in held for i in members[h])
                  for kind in (False, True)}
        if (all(counts[k] >= want[k] for k in want) and len(held) >= min(6, len(groups) // 5)) \
                or len(held) >= max(1, len(groups) // 5):
            break
        held.append(g)
    heldout = []
    for kind in (False, True):
        heldout += _in_turn([[i for i in members[g] if rows[i].long == kind and rows[i].questions] for g in held],
                            want[kind])
    held_set = set(held)
    train = [i for i, r in enumerate(rows) if r.group not in held_set]
    return Split([i for i in train if not rows[i].long], [i for i in train if rows[i].long], sorted(heldout))


def spread(questions: list[Question], count: int) -> list[Question]:
    """`count` questions taken in turn from each segment (in data order within a segment), so
    that every segment's buffer is asked about. Deterministic."""
    by_segment: dict[int, list[Question]] = {}
    for q in questions:
        by_segment.setdefault(q.segment, []).append(q)
    return _in_turn([by_segment[s] for s in sorted(by_segment)], count)


def _in_turn(queues: list[list], count: int) -> list:
    """Up to `count` items, one from each queue in turn (each queue in its own order)."""
    queues = [list(q) for q in queues]
    out: list = []
    while len(out) < count and any(queues):
        for queue in queues:
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out

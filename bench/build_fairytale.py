#!/usr/bin/env python3
"""Build a long-document QA benchmark from FairytaleQA's *train* split (standard library only).

FairytaleQA (uci-soe/FairytaleQAData, Apache-2.0) is 278 children's stories from Project
Gutenberg with questions and answers written by education experts. Bring a snapshot of that
repository here (the `fetch` tool, or `git clone`), then:

    python3 bench/build_fairytale.py --git-dir <its git directory> --out build/fairytale

What is read: only data-by-train-split/section-stories/train/<story>-story.csv (one row per
section) and data-by-train-split/questions/train/<story>-questions.csv (one row per question),
at the commit pinned below, straight from git (ls-tree, cat-file); both folders are checked against the sha256
manifest below first, so another snapshot fails before anything is written. The val and test
splits, the `all` folders and story_meta.csv (which lists every split) are never opened:
they stay unseen for checks made outside this repository.

What is written: DIR/fairytale_train.jsonl, one record per story, in the record format of
squad_long_dev.jsonl (less its `para`): {"id", "source", "title", "context", "questions":
[{"q", "answers", "qid"}]}; a qid is <story>#q<row>, the question's row in its CSV.
`context` is the whole story: each section's paragraphs have their whitespace (and the
Gutenberg hard line wraps) collapsed and are joined by a newline; sections are joined by a
blank line. Records are sorted by id (the story's file name), questions by their row in the CSV.

Which questions are kept:
  * explicit ones: `ex-or-im1` is "explicit" and `ex-or-im2` (a second annotator, where there is
    one) is empty or also "explicit"; implicit answers are inferences, not spans of the text;
  * answers of at most 12 words (answer1-answer6, empty ones and repeats dropped); a question
    with none left is dropped;
  * at least one of those answers occurs in the story under the normalisation of the `contains`
    metric (lcc_cli/eval/scoring.py: lower case, no punctuation, no a/an/the, whitespace
    collapsed; whole words), so a reader that quotes the story can score. The other short
    answers stay as alternatives (the metrics take the best gold answer). For 3,076 of the kept
    questions an answer is in the story verbatim but for case and a final . ! or ?; the other
    73 differ from the story only in punctuation or an article;
  * one question per wording in a story (a handful are asked twice).

Which stories are kept: 1,500 to 6,000 words, with at least 5 questions kept. The train
split's 232 stories run from 221 to 7,495 words (median 1,845); SmolLM2's tokenizer gives them
1.15-1.60 tokens a word (median 1.25). From 1,500 words every kept story is over 1,800 tokens
(median about 3,350), a long document for the model rather than a passage; up to 6,000 words
the longest kept story is about 7,300 tokens, so the whole story, a question and an answer still
fit the model's 8,192-token window and the full-context baseline can be scored on every story
(only two train stories are longer: 6,226 and 7,495 words). That keeps 139 of the 232 stories
and 3,149 questions; the summary this script prints gives the counts and the drops. The
output's sha256 is f1010020fcf4fe2a541d945164bd6d7f4deff7beda97367580a5d4e1be283721.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import statistics
import string
import subprocess
import sys
from pathlib import Path

REPO = "uci-soe/FairytaleQAData"
# The newest commit of the snapshot (2023-05-31); the train folders are unchanged since b6a60a4.
COMMIT = "a24ddc17364666b7c13a425b9970c87368b03417"
STORIES = "data-by-train-split/section-stories/train"
QUESTIONS = "data-by-train-split/questions/train"
# sha256 of the text "<sha256>  <folder>/<file>\t<bytes>\n" over both folders' files, in git's order.
MANIFEST_SHA256 = "8a7a4d174fdcb0fccc7cebe4675604755075c5b9463c0064f122be763338a34e"

SOURCE = "fairytaleqa-train"
MIN_WORDS, MAX_WORDS = 1500, 6000
MIN_QUESTIONS = 5
MAX_ANSWER_WORDS = 12
ANSWER_COLUMNS = ("answer1", "answer2", "answer3", "answer4", "answer5", "answer6")

_PUNCT = set(string.punctuation)


def git(git_dir: str, *args: str) -> bytes:
    if (Path(git_dir) / ".git").exists():  # a clone with a work tree: use its .git
        git_dir = str(Path(git_dir) / ".git")
    done = subprocess.run(["git", "--git-dir", git_dir, *args], check=False, capture_output=True)
    if done.returncode:
        sys.exit(f"git {' '.join(args[:2])} failed in {git_dir}: {done.stderr.decode().strip()[:200]}"
                 f" (is it a snapshot of {REPO} that has commit {COMMIT[:8]}?)")
    return done.stdout


def read_checked(git_dir: str) -> dict[str, bytes]:
    """{"<folder>/<file>": bytes} of the two train folders, after checking them against the manifest."""
    files, manifest = {}, []
    for folder in (STORIES, QUESTIONS):
        for entry in filter(None, git(git_dir, "ls-tree", "-z", f"{COMMIT}:{folder}").decode().split("\0")):
            meta, name = entry.split("\t", 1)
            kind, blob = meta.split()[1:3]
            if kind != "blob":
                sys.exit(f"unexpected {kind} {folder}/{name} at {COMMIT[:8]}")
            data = git(git_dir, "cat-file", "blob", blob)
            path = f"{folder}/{name}"
            manifest.append(f"{hashlib.sha256(data).hexdigest()}  {path}\t{len(data)}\n")
            files[path] = data
    digest = hashlib.sha256("".join(manifest).encode()).hexdigest()
    if digest != MANIFEST_SHA256:
        sys.exit(f"the train files at {COMMIT[:8]} are not the expected ones (manifest {digest})")
    return files


def rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def normalize(text: str) -> str:
    """The answer normalisation of lcc_cli/eval/scoring.py (SQuAD v1.1), restated here."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def story_text(story_rows: list[dict]) -> str:
    # The rows are in story order (one story, remarkable-rocket, numbers two sections 5).
    out = []
    for r in story_rows:
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", r["text"])]
        out.append("\n".join(p for p in paragraphs if p))
    return "\n\n".join(s for s in out if s)


SMALL_WORDS = {"a", "an", "and", "at", "by", "for", "from", "in", "into", "of", "on", "or", "the", "to", "with"}


def title_of(slug: str) -> str:
    """A title from the file name (the-white-cat: The White Cat); story_meta.csv is not read."""
    words = slug.replace("-", " ").split()
    return " ".join(w if i and w in SMALL_WORDS else w[:1].upper() + w[1:] for i, w in enumerate(words))


def questions_of(slug: str, question_rows: list[dict], context: str, dropped: dict) -> list[dict]:
    haystack = f" {normalize(context)} "
    kept, seen = [], set()
    for i, r in enumerate(question_rows):
        q = " ".join((r.get("question") or "").split())
        first, second = (r.get("ex-or-im1") or "").strip(), (r.get("ex-or-im2") or "").strip()
        if not q:
            dropped["no question"] += 1
            continue
        if first != "explicit" or second not in ("", "explicit"):
            dropped["implicit"] += 1
            continue
        answers = list(dict.fromkeys(a for c in ANSWER_COLUMNS if (a := " ".join((r.get(c) or "").split()))))
        answers = [a for a in answers if len(a.split()) <= MAX_ANSWER_WORDS and normalize(a)]
        if not answers:
            dropped["answers too long"] += 1
            continue
        if not any(f" {normalize(a)} " in haystack for a in answers):
            dropped["no answer in the story"] += 1
            continue
        if q.lower() in seen:
            dropped["repeated question"] += 1
            continue
        seen.add(q.lower())
        kept.append({"q": q, "answers": answers, "qid": f"{slug}#q{i}"})
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--git-dir", required=True, help=f"git directory of a snapshot of {REPO}")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    files = read_checked(args.git_dir)

    slugs = sorted(p[len(STORIES) + 1:-len("-story.csv")] for p in files if p.startswith(STORIES + "/"))
    expected = {f"{QUESTIONS}/{s}-questions.csv" for s in slugs}
    if expected != {p for p in files if p.startswith(QUESTIONS + "/")}:
        sys.exit("the story and question files do not pair up")

    dropped = dict.fromkeys(("no question", "implicit", "answers too long", "no answer in the story",
                             "repeated question"), 0)
    stories = {"too short": 0, "too long": 0, "too few questions": 0}
    total_questions = 0
    records = []
    for slug in slugs:
        question_rows = rows(files[f"{QUESTIONS}/{slug}-questions.csv"])
        total_questions += len(question_rows)
        context = story_text(rows(files[f"{STORIES}/{slug}-story.csv"]))
        questions = questions_of(slug, question_rows, context, dropped)
        words = len(context.split())
        if words < MIN_WORDS or words > MAX_WORDS:
            stories["too short" if words < MIN_WORDS else "too long"] += 1
            continue
        if len(questions) < MIN_QUESTIONS:
            stories["too few questions"] += 1
            continue
        records.append({"id": slug, "source": SOURCE, "title": title_of(slug), "context": context,
                        "questions": questions})

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fairytale_train.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(records, key=lambda r: r["id"]))
    path.write_text(text, encoding="utf-8")
    words = [len(r["context"].split()) for r in records]
    summary = {
        "commit": COMMIT, "out": str(path), "stories": len(records),
        "questions": sum(len(r["questions"]) for r in records),
        "words": {"min": min(words), "median": statistics.median(words), "max": max(words)} if words else None,
        "train_stories": len(slugs), "stories_left_out": stories,
        "train_questions": total_questions,
        "train_questions_dropped": dropped,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""General ability with the reading prefix (issue 38's target): held-out generic instructions
(bench/data/general-heldout.txt, none seen in training) answered with the prefix and by the
plain model on the same read, their token F1 (per instruction, then the mean with a bootstrap
interval): with a document (the default read of an indexed cartridge of a paragraph of the bench
sample, at 8x) and with no document. lcc reads no prefix before the plain model's own system
turn (no document), so there its answers are the plain model's by construction; the "no
document" row forces the prefix there anyway, to show what it would do.

    python bench/prefix_general.py [--prefix-file FILE] > bench/results/prefix-general.json
    python bench/prefix_general.py --untrained > bench/results/prefix-general-init.json

`--untrained` reads the prefix's starting point instead (the KV of its one instruction, as
`lcc train-prefix` begins): how far a single plain instruction moves the answers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import lcc  # noqa: E402
from lcc_cli.scoring import token_f1  # noqa: E402

PARAGRAPHS = ROOT.parent / "shared" / "data" / "squad_dev_sample.jsonl"


def instructions() -> tuple[list[str], list[str]]:
    sections: list[list[str]] = [[]]
    for line in (ROOT / "bench" / "data" / "general-heldout.txt").read_text().splitlines():
        if line.startswith("# Section 2"):
            sections.append([])
        elif line.strip() and not line.startswith("#"):
            sections[-1].append(line.strip())
    return sections[0], sections[1]


def bootstrap(values: list[float], draws: int = 2000) -> list[float]:
    rng = random.Random(0)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(draws))
    return [round(means[int(0.025 * draws)], 3), round(means[int(0.975 * draws)], 3)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix-file", default=None)
    parser.add_argument("--untrained", action="store_true", help="the prefix's starting point (step 0)")
    parser.add_argument("--documents", type=int, default=10)
    args = parser.parse_args()
    model = lcc.load_model()
    if args.untrained:
        args.prefix_file = _untrained(model.loaded)
    agnostic, about = instructions()
    out: dict = {"instructions": {"no document": len(agnostic), "with a document": len(about)}}
    rows = {"no document": [], "with a document": []}
    read = {"prefix_file": args.prefix_file} if args.prefix_file else {}
    from lcc_cli.config import AskConfig
    from lcc_cli.runtime.prefix import reading_prefix
    from lcc_cli.runtime.reading import Row, View, answer_rows

    loaded = model.loaded
    forced = reading_prefix(loaded, True, args.prefix_file)
    plain_turn = View.text(loaded.prompter.context_ids(None), document=True)  # the prefix forced on it
    cfg = AskConfig(max_new_tokens=48)
    for q in agnostic:
        row = [Row(plain_turn, loaded.prompter.query_ids(q), q)]
        a, b = answer_rows(loaded, row, cfg)[0], answer_rows(loaded, row, cfg, forced)[0]
        rows["no document"].append({"q": q, "plain": a.text, "prefix": b.text, "f1": _agree(b.text, a.text)})
    docs = [json.loads(line) for line in PARAGRAPHS.read_text().splitlines()][:args.documents]
    for n, doc in enumerate(docs):
        cart = model.compile(text=doc["context"], name=f"{doc['id']}.txt", ratio=8)
        plain, prefixed = model.reader(cart, prefix=False), model.reader(cart, **read)
        for q in about[n % 3::3]:  # a third of them per document, in turn
            a, b = plain.ask(q, max_new_tokens=48), prefixed.ask(q, max_new_tokens=48)
            rows["with a document"].append({"doc": doc["id"], "q": q, "plain": a.text, "prefix": b.text,
                                            "f1": _agree(b.text, a.text)})
    for kind, got in rows.items():
        f1 = [r["f1"] for r in got]
        out[kind] = {"n": len(f1), "token_f1": round(sum(f1) / len(f1), 3), "ci95": bootstrap(f1),
                     "identical": round(sum(r["prefix"] == r["plain"] for r in got) / len(got), 3)}
    out["prefix"] = forced.name if forced is not None else None
    out["rows"] = rows
    print(json.dumps(out, indent=1))


def _untrained(loaded) -> str:
    """The KV of the init instruction's prefill written as a prefix file (a temporary one)."""
    import tempfile

    from lcc_cli.config import PrefixConfig
    from lcc_cli.format.prefix_file import save_prefix
    from lcc_cli.training.prefix import Trainer

    cfg = PrefixConfig()
    start = Trainer.starting_entries(loaded, cfg)
    path = Path(tempfile.mkdtemp()) / "untrained.safetensors"
    save_prefix(path, {"name": "init-instruction", "prompt": {"init": cfg.init}, "training": {"steps": 0},
                       "model": loaded.facts.to_manifest(loaded.model_id, loaded.fingerprint)},
                list(start.keys), list(start.values))
    return str(path)


def _agree(mine: str, plain: str) -> float:
    return token_f1(mine, [plain]) if plain.strip() else float(not mine.strip())


if __name__ == "__main__":
    main()

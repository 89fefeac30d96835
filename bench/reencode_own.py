"""The 200 questions of `bench/measure.py library`'s quality check (SQuAD train paragraphs, needs
its build/library/1000), each from its own cartridge at its tokens / 8, read as stored and with
its pages re-encoded (the default below 64 entries), paired:
    python bench/reencode_own.py > bench/results/reencode-own.json
"""
import json, os, random, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, "bench")
import measure
from lcc_cli import api
from lcc_cli.config import AskConfig, ReadConfig
from lcc_cli.eval.scoring import score
from lcc_cli.format.cartridge import open_cartridge
from lcc_cli.runtime.memory import answer_all, open_memory

rows = measure._library_rows()
loaded = api.load(api.RunOptions())
picks = [(i, q) for i, r in enumerate(rows) for q in r["questions"][:1]]
picks = random.Random(1).sample(picks, min(200, len(picks)))
folder = measure.LIBRARY / "1000"
ask = AskConfig(max_new_tokens=32)
a_rows, b_rows = [], []
for i, q in picks:
    cart = open_cartridge(folder / f"p{i:04d}.lcc")
    budget = -(-cart.manifest["source"]["token_count"] // 8)
    for rows_, re in ((a_rows, 0), (b_rows, 64)):
        got = answer_all(loaded, open_memory([cart], loaded, read=ReadConfig(budget=budget, reencode=re)), [q["q"]], ask)[0]
        rows_.append(score(got.text, q["answers"]))
out = {}
for metric in ("contains", "f1"):
    diffs = [b[metric] - a[metric] for a, b in zip(a_rows, b_rows)]
    rng = random.Random(0)
    boots = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(5000))
    out[metric] = {"stored": round(sum(r[metric] for r in a_rows) / len(a_rows), 3),
                   "reencoded": round(sum(r[metric] for r in b_rows) / len(b_rows), 3),
                   "diff": round(sum(diffs) / len(diffs), 3), "ci95": [round(boots[125], 3), round(boots[4875], 3)],
                   "better/worse": [sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)]}
print(json.dumps({"questions": len(a_rows), **out}))

"""The 200 questions of `bench/measure.py library`'s quality check (SQuAD train paragraphs; needs
its build/library/1000), each from its own cartridge at its tokens / 8, read as stored and with
its pages re-encoded (the default below 64 entries), paired:
    python bench/reencode_own.py > bench/results/reencode-own.json
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402
from lcc_cli import api  # noqa: E402
from lcc_cli.config import AskConfig, ReadConfig  # noqa: E402
from lcc_cli.scoring import score  # noqa: E402
from lcc_cli.format.cartridge import open_cartridge  # noqa: E402
from lcc_cli.eval.run import answers  # noqa: E402
from lcc_cli.runtime.memory import open_memory  # noqa: E402


def main() -> None:
    loaded = api.load(api.RunOptions())
    folder = measure.LIBRARY / "1000"
    ask = AskConfig(max_new_tokens=32)
    stored, reencoded = [], []
    for i, q in measure.library_picks(measure._library_rows()):
        cart = open_cartridge(folder / f"p{i:04d}.lcc")
        budget = -(-cart.manifest["source"]["token_count"] // 8)
        for rows, reencode in ((stored, 0), (reencoded, ReadConfig().reencode)):
            memory = open_memory([cart], loaded, read=ReadConfig(budget=budget, reencode=reencode))
            rows.append(score(answers(loaded, memory, [q["q"]], ask)[0].text, q["answers"]))
    print(json.dumps({"questions": len(stored), **{m: measure.paired(stored, reencoded, m, ("stored", "reencoded"))
                                                   for m in ("contains", "f1")}}))


if __name__ == "__main__":
    main()

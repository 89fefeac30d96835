"""Write a golden cartridge under tests/fixtures/ from the tiny test model, with a fixed seed.

    python scripts/make_golden.py v2         # writes tests/fixtures/golden-v2.lcc
    python scripts/make_golden.py v3         # writes tests/fixtures/golden-v3.lcc

Each golden file was written by this script at the commit that added it (golden-v1.lcc by
lcc 0.1.0's `engine.compile_file`; golden-v2.lcc at the last commit that wrote format v2); the
tests that load them are never edited. A later format version adds its own golden file.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main(version: str) -> None:
    from conftest import DOC, build_tiny_model

    from lcc_cli import api

    torch.set_num_threads(1)  # float sums depend on the thread count
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LCC_HOME"] = str(tmp / "home")
        model = build_tiny_model(tmp / "tiny")
        src = tmp / "doc.txt"
        src.write_text(DOC + "\n\n" + DOC)
        out = ROOT / "tests" / "fixtures" / f"golden-{version}.lcc"
        # am: deterministic and closed-form; two segments, so that positions across segments are pinned
        settings = {"ratio": 4.0, "segment_tokens": 40}
        if version == "v3":
            settings.update(index=True, kv_dtype="int8")
        api.compile_file(src, out, settings, compiler="am", run=api.RunOptions(model=str(model)), force=True)
        print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "v3")

"""Write the golden cartridge under tests/fixtures/ from the tiny test model, with a fixed seed.

    python scripts/make_golden.py            # writes tests/fixtures/golden-v1.lcc

The v1 golden file was written by lcc 0.1.0 (this script at the commit that added it); the
test that loads it is never edited. A later format version adds its own golden file.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from conftest import DOC, build_tiny_model, fast_config

    from lcc_cli import engine

    torch.set_num_threads(1)  # float sums depend on the thread count
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LCC_HOME"] = str(tmp / "home")
        model = build_tiny_model(tmp / "tiny")
        src = tmp / "doc.txt"
        src.write_text(DOC)
        out = ROOT / "tests" / "fixtures" / "golden-v1.lcc"
        engine.compile_file(src, out, fast_config(), model=str(model), force=True)
        print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

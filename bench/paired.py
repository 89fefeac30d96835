"""Two methods (or a method and a baseline: truncate, retrieve) of one `lcc eval` run
compared question by question (lcc_cli/eval/paired.py).

    python bench/paired.py RESULTS.json A B
"""

from __future__ import annotations

import json
import sys

from lcc_cli.eval.paired import compare

if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        print(json.dumps(compare(json.load(f), sys.argv[2], sys.argv[3]), indent=1))

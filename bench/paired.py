"""Two methods (or a method and a baseline: truncate, retrieve) compared question by question
(lcc_cli/eval/paired.py), from one `lcc eval` run or from two runs on the same questions
(same data, questions_per_doc and sample_seed; e.g. an A/B whose second run has
`baselines = false`).

    python bench/paired.py RESULTS.json A B
    python bench/paired.py RESULTS_A.json A RESULTS_B.json B
"""

from __future__ import annotations

import json
import sys

from lcc_cli.eval.paired import compare


def _documents(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["documents"]


if __name__ == "__main__":
    if len(sys.argv) == 4:
        results, a, b = {"documents": _documents(sys.argv[1])}, sys.argv[2], sys.argv[3]
    elif len(sys.argv) == 5:
        # answers are keyed by (document, qid): rows of both runs side by side pair up
        first, second, a, b = _documents(sys.argv[1]), _documents(sys.argv[3]), sys.argv[2], sys.argv[4]
        if a == b:  # one label in both runs (two steps of one candidate): tell the second run's rows apart
            b = f"{b} (second run)"
            for doc in second:
                for row in doc["rows"]:
                    if row.get("method") == a:
                        row["method"] = b
        results = {"documents": first + second}
    else:
        raise SystemExit(__doc__)
    print(json.dumps(compare(results, a, b), indent=1))

"""GPU check (issue 11): compile one bench paragraph on the GPU and on the CPU with each method
and print seconds and prefill equivalents (PE) side by side, from the same process.

    python scripts/gpu_check.py PARAGRAPH.txt [COMPILER]

Run by scripts/gpu_session.sh on a lent GPU machine; CI never runs it.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_prefill(loaded, ids, repeats=5):
    from lcc_cli.runtime.cache import prefill

    times = []
    with torch.inference_mode():
        prefill(loaded.model, ids)
        for _ in range(repeats):
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            prefill(loaded.model, ids)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    from lcc_cli.compile.base import CompilerSpec
    from lcc_cli.compile.document import text_segments
    from lcc_cli.config import compile_config
    from lcc_cli.runtime.model import load_model

    text = Path(sys.argv[1]).read_text()
    compiler = sys.argv[2] if len(sys.argv) > 2 else None
    scratch = CompilerSpec("optimise")
    methods = {"cuda": [("scratch 80 steps", scratch, compile_config("optimise", steps=80, ratio=16.0))],
               # the CPU pass measures per-step cost on fewer steps: 80 steps would take minutes
               "cpu": [("scratch 10 steps", scratch, compile_config("optimise", steps=10, ratio=16.0))]}
    if compiler:
        spec = CompilerSpec("pretrained", compiler)
        presets = [(f"pretrained {q}", spec, compile_config("pretrained", q, ratio=16.0))
                   for q in ("fast", "balanced", "best")]
        methods = {"cuda": presets + methods["cuda"], "cpu": presets[:2] + methods["cpu"]}
    rows = []
    import os

    for device in os.environ.get("DEVICES", "cuda,cpu").split(","):
        loaded = load_model(None, device=device)
        from lcc_cli.compile.base import build_compiler

        base = median_prefill(loaded, loaded.prompter.context_ids(text))
        for label, spec, cfg in methods[device]:
            segment = text_segments(loaded, text, cfg)[0]
            comp = build_compiler(spec, loaded)
            if device == "cuda":
                comp.compile(segment, cfg)  # warm-up (kernels, allocator)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            comp.compile(segment, cfg)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append({"device": device, "method": label, "seconds": round(seconds, 3),
                         "prefill_seconds": round(base, 5), "PE": round(seconds / base, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"gpu_check": rows}))


if __name__ == "__main__":
    main()

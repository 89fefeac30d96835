"""A compiler-training step on a GPU, one document at a time against batched (issue 17).

    python scripts/gpu_profile.py PARAGRAPHS.jsonl [LONG.jsonl]

Takes 8 paragraphs (and one long document) of the data, the default TrainConfig, and times
forward + backward of one step both ways (median of 3, alternating), then profiles the
batched step: wall seconds beside the GPU's own kernel time. When the kernels fill a small
part of the wall time, the step is bound by Python and kernel launches (the per-document
step on an H100: 0.28 s of kernels in 4.4 s). Run by scripts/gpu_session.sh on a lent GPU
machine; CI never runs it.
"""

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    from lcc_cli.api import RunOptions, load
    from lcc_cli.training import batched, data as train_data, losses
    from lcc_cli.compile.optimise import attach_lora
    from lcc_cli.config import TrainConfig

    cfg = TrainConfig()
    loaded = load(RunOptions(device="cuda" if torch.cuda.is_available() else "cpu"))
    rows, _ = train_data.read_training_data([Path(p) for p in sys.argv[1:]], cfg.segment_tokens)
    rows = [r for r in rows if not r.long and r.questions][:8] + [r for r in rows if r.long][:1]
    targets = losses.instruction_targets(loaded, cfg)
    peft_model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    bias = torch.nn.Parameter(torch.zeros(loaded.facts.hidden_size, device=loaded.device))
    rng = random.Random(0)
    items = []
    for row in rows:
        doc = train_data.prepare(loaded, row, cfg)
        items.append((doc, 8.0, *losses.sample_step(doc, targets, rng, cfg)))
    ways = {"per document": lambda: [losses.document_losses(loaded, peft_model, bias, *it, cfg) for it in items],
            "batched": lambda: batched.step_losses(loaded, peft_model, bias, items, cfg)}

    def step(fn):
        results = fn()
        sum(t["recon"] * cfg.recon_weight + t["qa"] * cfg.qa_weight + t["kl"] * cfg.kl_weight
            for t, _ in results).backward()
        return sum(n for _, n in results)

    for fn in ways.values():  # warm-up
        step(fn)
    times = {k: [] for k in ways}
    for _ in range(3):
        for name, fn in ways.items():
            sync()
            start = time.perf_counter()
            tokens = step(fn)
            sync()
            times[name].append(time.perf_counter() - start)
    out = {"device": str(loaded.device), "dtype": str(loaded.dtype), "documents": len(items), "tokens": tokens}
    for name, ts in times.items():
        out[name] = {"seconds": round(statistics.median(ts), 3), "tokens_per_s": round(tokens / statistics.median(ts))}
    if torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(ways["batched"])
            sync()
        kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
        out["batched_kernel_seconds"] = round(kernels, 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Why is a compiler-training step no faster on an H100 than on two CPU cores? (issue 9/11)

    python scripts/gpu_profile.py TRAIN.jsonl [DOCS]

Takes the first DOCS paragraphs (default 8, one training step's batch), generates their teacher
targets, then times and profiles one step's worth of `document_losses` + backward on the
device. It prints wall seconds per paragraph beside the GPU's own kernel time: when the kernels
fill a small part of the wall time, the step is bound by Python and kernel launches, and only
batching documents (or several processes sharing the GPU) can speed it up.
Run by scripts/gpu_session.sh on a lent GPU machine; CI never runs it.
"""

import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    from lcc_cli.compile.optimise import attach_lora
    from lcc_cli.compile.train import document_losses, read_training_data, sample_targets, teacher_targets
    from lcc_cli.config import TrainConfig
    from lcc_cli.runtime.model import load_model

    docs = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rows, _ = read_training_data([Path(sys.argv[1])])
    rows = rows[:docs]
    loaded = load_model(None, device="cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig()
    start = time.perf_counter()
    items = teacher_targets(loaded, rows, cfg)
    sync()
    teacher_s = time.perf_counter() - start
    peft_model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    bias = torch.nn.Parameter(torch.zeros(loaded.facts.hidden_size, device=loaded.device))
    rng = random.Random(0)

    def one_pass():
        for item in items:
            terms, _ = document_losses(loaded, peft_model, bias, item, 8.0, sample_targets(item, rng, cfg), cfg)
            (0.5 * terms["recon"] + terms["qa"] + 0.5 * terms["kl"]).backward()

    one_pass()  # warm-up: kernels, allocator
    sync()
    start = time.perf_counter()
    one_pass()
    sync()
    wall = time.perf_counter() - start

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        one_pass()
        sync()
    events = prof.key_averages()
    kernel_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(events.table(sort_by="cpu_time_total", row_limit=15))
    print(json.dumps({"device": str(loaded.device), "docs": len(items), "teacher_seconds": round(teacher_s, 2),
                      "step_wall_seconds": round(wall, 3), "per_doc_seconds": round(wall / len(items), 3),
                      "gpu_kernel_seconds": round(kernel_us / 1e6, 3), "kernel_launches": launches}))


if __name__ == "__main__":
    main()

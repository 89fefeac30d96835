"""A compiler file's score on the training run's held-out documents (the metric that selects
checkpoints), so that compilers trained with different recipes can be compared on it.

    python bench/heldout.py COMPILER.safetensors DATA.jsonl... [--ratio 16]
    python bench/heldout.py OUTPUT.safetensors.ckpt DATA.jsonl...   # a run's latest checkpoint

Same held-out split, questions and teacher as `lcc train-compiler` with the TrainConfig
defaults: mean per-token KL to the teacher on gold answers, paragraphs and long documents
(the current held-out metric, train.HELDOUT_METRIC). A checkpoint folder is scored from its
float32 weights, as the training loop scores it; a compiler file from its stored weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from lcc_cli.api import RunOptions, load
    from lcc_cli.compile import train
    from lcc_cli.compile.optimise import attach_lora
    from lcc_cli.config import TrainConfig
    from lcc_cli.format.compiler_file import load_compiler

    parser = argparse.ArgumentParser()
    parser.add_argument("compiler")
    parser.add_argument("data", nargs="+")
    parser.add_argument("--ratio", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = TrainConfig()
    if args.ratio:
        cfg = TrainConfig(heldout_ratio=args.ratio)
    loaded = load(RunOptions(threads=args.threads))
    rows, _ = train.read_training_data([Path(d) for d in args.data], cfg.segment_tokens)
    docs = [train.prepare(loaded, rows[i], cfg) for i in train.split_rows(rows, cfg).heldout]
    source = Path(args.compiler)
    if source.is_dir():  # OUTPUT.ckpt/: the run's settings and its latest weights
        from safetensors.torch import load_file

        state = json.loads((source / "state.json").read_text())
        c, step = state["config"], state["step"]
        tensors = load_file(str(source / "state.safetensors"))
        lora = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
        slot_bias = tensors["slot_bias"]
    else:
        comp = load_compiler(source)
        c, step = comp.manifest["compiler"], comp.manifest["training"].get("selected_step")
        lora, slot_bias = comp.lora, comp.slot_bias
    peft_model = attach_lora(loaded.model, c["lora_rank"], c["lora_alpha"], c["lora_targets"],
                             {k: v.float() for k, v in lora.items()})
    try:
        scores = train.heldout_scores(loaded, peft_model, slot_bias.float(), docs, cfg)
    finally:
        peft_model.unload()
    print(json.dumps({"compiler": source.name, "step": step, "ratio": cfg.heldout_ratio,
                      "heldout_metric": train.HELDOUT_METRIC, **scores}))


if __name__ == "__main__":
    main()

"""The pretrained compiler: a buffer-only LoRA and a slot initialisation learned once per
base model (train.py), applied to a new document in one forward pass.

`--steps 0` is that pass: the context turn is encoded by the frozen model, each slot starts
as the mean embedding of its share of the context plus a learned bias, and the slots are
encoded with the pretrained LoRA on. `--steps N` refines from there with the paper's
per-document optimisation (optimise.py) on a fresh *copy* of the LoRA, which is then
discarded: the pretrained weights themselves never change.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch

from ..config import CompileConfig
from ..errors import UsageError
from ..format.checks import check_fingerprint
from ..format.compiler_file import CompilerFile, load_compiler
from ..ingest import TextSegment
from ..progress import NO_PROGRESS, Progress
from ..runtime.cache import prefill
from .base import CompilerSpec, SegmentResult, register
from .optimise import Start, attach_lora, optimise_segment
from .slots import chunk_embeddings, encode_slots, entries, reader_view, to_buffer

SHIPPED = "compiler-smollm2-135m.safetensors"


def shipped_compiler() -> Path | None:
    """The compiler shipped as package data for the embedded model, if present."""
    path = Path(str(resources.files("lcc_cli").joinpath("data", SHIPPED)))
    return path if path.is_file() else None


class PretrainedCompiler:
    name = "pretrained"

    def __init__(self, loaded, file: CompilerFile, path: Path):
        check_fingerprint(file.manifest["model"], loaded.model_id, loaded.fingerprint, f"compiler {path.name}")
        self.loaded, self.file, self.path = loaded, file, path
        c = file.manifest["compiler"]
        self.start = Start(lora={k: v.float() for k, v in file.lora.items()}, rank=c["lora_rank"],
                           alpha=c["lora_alpha"], targets=tuple(c["lora_targets"]),
                           slot_bias=file.slot_bias.float(), sink=bool(c.get("sink")))

    def describe(self) -> dict:
        return {"name": self.name, "file": self.path.name, "sha256": self.file.sha256,
                "training_steps": self.file.manifest.get("training", {}).get("steps")}

    def compile(self, segment: TextSegment, cfg: CompileConfig, progress: Progress = NO_PROGRESS) -> SegmentResult:
        if cfg.steps:
            return optimise_segment(self.loaded, segment.text, cfg, progress, start=self.start)
        return one_pass(self.loaded, segment.text, cfg.ratio, self.start)


def one_pass(loaded, text: str, ratio: float, start: Start) -> SegmentResult:
    """The pretrained compiler applied once: about the cost of one prefill."""
    started = time.perf_counter()
    model, rope = loaded.model, loaded.rope
    ctx_ids = loaded.prompter.context_ids(text)
    n = len(ctx_ids)
    _, slots = entries(n, ratio, start.sink)
    with torch.no_grad():
        ctx_kv, _ = prefill(model, ctx_ids)
        peft_model = attach_lora(model, start.rank, start.alpha, start.targets, start.lora)
        try:
            embeds = chunk_embeddings(model, ctx_ids, slots) + start.slot_bias.to(model.device)
            view, at = reader_view(ctx_kv, encode_slots(model, ctx_kv, embeds, n), n, start.sink, rope)
        finally:
            peft_model.unload()
        buffer = to_buffer(view, at, start.sink, rope)
    return SegmentResult(buffer, n, {"steps": 0, "seconds": round(time.perf_counter() - started, 3)}, start.sink)


@register("pretrained")
def _build(spec: CompilerSpec, loaded) -> PretrainedCompiler:
    path = Path(spec.path) if spec.path else shipped_compiler()
    if path is None:
        raise UsageError("no pretrained compiler is shipped with this lcc; train one with `lcc train-compiler`",
                         field="compiler")
    return PretrainedCompiler(loaded, load_compiler(path), path)

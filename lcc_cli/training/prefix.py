"""Training the reading prefix (issue 38): KV entries that the frozen reader reads before every
context turn, trained once per base model to make it answer with the document's own short
phrase instead of restating the question.

What is trained is data, never the model: per layer, keys and values of `P` entries (RoPE
baked in at positions 0..P-1), optimised directly with Adam as the Cartridges recipe and
compile/refine.py optimise a buffer. They start as the KV of one instruction (`init`).

A step reads what `lcc ask` reads and scores what it should answer:

- QA rows: a question of SQuAD *train* with its gold answer (teacher-forced, cross-entropy,
  then the end of the turn), reading the default read of its document: a paragraph at
  `para_ratio` (its chosen pages re-encoded in the question's pass, as the default does for a
  paragraph's budget) or a long window at `long_ratio` (stored pages). The views come from the
  real compile and the real memory (compile.document.compile_text, runtime.memory), so the
  prefix is trained on the reads users get.
- KL rows: generic instructions (lcc_cli/data/instructions.txt), with no document or reading
  a document, scored by KL to the model *without* the prefix on that model's own greedy
  response: the seed's manifold regulariser, without which the prototype answered "List three
  uses of a paperclip." with "a pen".

Whole articles are held out to choose the kept step (QA F1 while general answers keep at
least GENERAL_FLOOR token F1 against the plain model's); the benches and FairytaleQA are never
read. Checkpoints every `checkpoint_every` steps (safetensors + JSON, no pickle) in
OUTPUT.ckpt/; `resume` continues from the last one, exactly (the step's draws are seeded by
the step number).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .._version import __version__
from ..buffer import Buffer
from ..config import AskConfig, PrefixConfig, ReadConfig
from ..errors import InputError, OutputExistsError
from ..format.fsio import atomic_write
from ..progress import NO_PROGRESS, Progress
from ..runtime.reading import Row, View, answer_rows

GENERAL_FLOOR = 0.7  # token F1 of prefixed answers to held-out instructions against the plain model's


@dataclass
class Example:
    question: str
    answer: str | None  # None: a generic instruction, scored by KL to the plain model's response
    doc: int | None  # index into the documents; None: no document (the plain system turn)


@dataclass
class Pools:
    docs: list  # training.data.Row: text, questions, group, long
    para: list[Example]
    long: list[Example]
    plain_kl: list[Example]
    doc_kl: list[Example]
    val_qa: list[Example]
    val_general: list[Example]
    files: list[dict]


def build_pools(paths: list[Path], cfg: PrefixConfig) -> Pools:
    """SQuAD train rows (paragraphs and long windows) split by article into training and
    validation, and the generic instructions split alike."""
    from ..runtime.prompts import generic_instructions
    from .data import read_training_data

    rows, files = read_training_data(paths)
    rng = random.Random(f"{cfg.seed}:split")
    groups = sorted({r.group for r in rows})
    rng.shuffle(groups)
    held = set(groups[:cfg.heldout_articles])
    long_rows = [i for i, r in enumerate(rows) if r.long and r.group not in held]
    rng.shuffle(long_rows)
    long_kept = set(long_rows[:cfg.long_documents])
    para, long, val = [], [], []
    for i, r in enumerate(rows):
        for q in r.questions:
            if not q["answer"]:
                continue
            ex = Example(q["q"], q["answer"], i)
            if r.group in held:
                val.append((r.long, ex))
            elif r.long and i in long_kept:
                long.append(ex)
            elif not r.long:
                para.append(ex)
    if not para and not long:
        raise InputError("the training data holds no questions with answers")
    agnostic, about = generic_instructions()
    train_instr = [t for j, t in enumerate(agnostic + about) if j % 5]
    val_instr = [t for j, t in enumerate(agnostic + about) if not j % 5]
    doc_pool = [i for i, r in enumerate(rows) if r.group not in held and (not r.long or i in long_kept)]
    rng.shuffle(doc_pool)
    doc_pool = doc_pool[:96]  # a bounded pool: each (document, instruction) teacher response is made once
    val_para = [ex for is_long, ex in val if not is_long]
    val_long = [ex for is_long, ex in val if is_long]
    rng.shuffle(val_para)
    rng.shuffle(val_long)
    half = cfg.validate_questions // 2
    val_qa = val_para[:cfg.validate_questions - min(half, len(val_long))] + val_long[:half]
    val_docs = sorted({ex.doc for ex in val_para[:4]})
    val_general = [Example(t, None, None) for t in val_instr]
    val_general += [Example(t, None, val_docs[j % len(val_docs)]) for j, t in enumerate(val_instr)] if val_docs else []
    return Pools(rows, para, long, [Example(t, None, None) for t in train_instr],
                 [Example(t, None, d) for d in doc_pool for t in train_instr], val_qa, val_general, files)


class Reads:
    """Views of training documents as `lcc ask` reads them: each compiled with the default
    (indexed) compile, paragraphs in memory (a few kept), long windows once into the work
    folder, then read through runtime.memory at the question's ratio."""

    def __init__(self, loaded, docs: list, work: Path, cfg: PrefixConfig):
        self.loaded, self.docs, self.work, self.cfg = loaded, docs, work, cfg
        self._memories: OrderedDict[int, object] = OrderedDict()
        self._built: dict = {}

    def view(self, ex: Example) -> View:
        if ex.doc is None:
            # trained (and validated) with the prefix read even here, so that a prefix forced on the
            # plain model (a bench, a client that asks for it) still keeps its answers
            return View.text(self.loaded.prompter.context_ids(None), key=("plain",), document=True)
        return self.memory(ex.doc).view(ex.question)

    def memory(self, doc: int):
        from ..compile.document import compile_text
        from ..format.cartridge import open_cartridge, save_cartridge
        from ..runtime.memory import open_memory

        if doc in self._memories:
            self._memories.move_to_end(doc)
            return self._memories[doc]
        row = self.docs[doc]
        ratio = self.cfg.long_ratio if row.long else self.cfg.para_ratio
        if row.long:
            path = self.work / "long" / f"{hashlib.sha256(row.text.encode()).hexdigest()[:16]}.lcc"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                save_cartridge(compile_text(self.loaded, row.text, path.name, built=self._built), path, overwrite=True)
            cart = open_cartridge(path)  # read by range, as a user's file is
        else:
            cart = compile_text(self.loaded, row.text, f"p{doc}.txt", built=self._built)
        memory = open_memory([cart], self.loaded, [f"doc{doc}"], read=ReadConfig(ratio=ratio, prefix=False))
        self._memories[doc] = memory
        while len(self._memories) > 48:
            self._memories.popitem(last=False)
        return memory


def _holds(view: View, answer: str) -> bool:
    """True when the pages a view read hold `answer` (case and spacing aside)."""
    from ..scoring import normalize

    return bool(view.pages) and normalize(answer) in normalize(" ".join(p.text for p in view.pages))


# --- the reader over a batch of rows, differentiable in the prefix -------------------------------


def row_logits(loaded, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, views: list[View],
               tokens: list[list[int]], keep: int) -> torch.Tensor:
    """Logits [rows, keep, vocab] at the last `keep` positions of each row: every row reads the
    prefix (entries at 0..P-1, or none), then its view moved after it, then its `tokens` (the
    view's fresh tokens first, then prompt and target), in the first pass `decode` makes
    (runtime/decode.py `first_pass`: rows left-padded, a token sees cache entries at earlier
    positions and tokens at its own or earlier ones)."""
    from ..runtime.cache import cache_kwargs
    from ..runtime.decode import Placed, first_pass

    model, rope, device, dtype = loaded.model, loaded.rope, loaded.device, loaded.dtype
    shift = prefix[0][0].shape[1] if prefix else 0
    layers, placed = [], []
    for v, t in zip(views, tokens):
        b = v.buffer.moved(rope, shift).to(device, dtype) if v.stored else None
        row = []
        for i in range(loaded.facts.num_layers):
            parts_k = ([prefix[i][0].to(dtype)] if prefix else []) + ([b.keys[i]] if b is not None else [])
            parts_v = ([prefix[i][1].to(dtype)] if prefix else []) + ([b.values[i]] if b is not None else [])
            if not parts_k:  # nothing stored: an empty cache row
                empty = torch.zeros(loaded.facts.num_kv_heads, 0, loaded.facts.head_dim, dtype=dtype, device=device)
                parts_k, parts_v = [empty], [empty]
            row.append((torch.cat(parts_k, dim=1)[None], torch.cat(parts_v, dim=1)[None]))
        layers.append(row)
        cached = torch.cat([torch.arange(shift), b.positions if b is not None else torch.zeros(0, dtype=torch.long)])
        end = v.end + shift
        placed.append(Placed([p + shift for p in v.fresh_positions] + list(range(end, end + len(t))), cached))
    rows = [v.fresh + t for v, t in zip(views, tokens)]
    stored = layers if any(r[0][0].shape[2] for r in layers) else None
    ids, _, mask, positions, cache = first_pass(stored, 0, rows, placed, device)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep,
                 **cache_kwargs(model, cache)).logits


def step_loss(loaded, prefix, views: list[View], rows: list[tuple[list[int], list[int], bool]]) -> dict:
    """{"qa", "kl"} for rows of (prompt, target, is_kl): cross-entropy of QA targets,
    KL(plain model || prefixed) on instruction responses, each a mean over its tokens."""
    keep = max(len(t) for _, t, _ in rows) + 1
    logits = row_logits(loaded, prefix, views, [p + t for p, t, _ in rows], keep)
    kl_rows = [i for i, (_, _, is_kl) in enumerate(rows) if is_kl]
    teacher = None
    if kl_rows:
        with torch.no_grad():
            teacher = row_logits(loaded, None, [views[i] for i in kl_rows], [rows[i][0] + rows[i][1] for i in kl_rows],
                                 keep)
    return loss_terms(logits, teacher, rows, keep)


def loss_terms(logits: torch.Tensor, teacher: torch.Tensor | None, rows: list[tuple[list[int], list[int], bool]],
               keep: int) -> dict:
    """The two terms from the trained reader's logits and the plain model's on the KL rows (in
    order); bench/page_lora.py trains another form of the skill on the same terms."""
    kl_rows = [i for i, (_, _, is_kl) in enumerate(rows) if is_kl]
    qa, kl, n_qa, n_kl = 0.0, 0.0, 0, 0
    for i, (_, target, is_kl) in enumerate(rows):
        n = len(target)
        student = F.log_softmax(logits[i, keep - 1 - n: keep - 1].float(), dim=-1)  # predicts each target token
        if is_kl:
            t = F.log_softmax(teacher[kl_rows.index(i), keep - 1 - n: keep - 1].float(), dim=-1)
            kl = kl + (t.exp() * (t - student)).sum()
            n_kl += n
        else:
            qa = qa - student.gather(-1, torch.tensor(target, device=student.device)[:, None]).sum()
            n_qa += n
    return {"qa": qa / max(n_qa, 1), "kl": kl / max(n_kl, 1)}


# --- the loop ---------------------------------------------------------------------------------------


@dataclass
class PrefixResult:
    path: str
    steps: int
    selected_step: int
    seconds: float
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, loaded, paths: list[Path], output: Path, cfg: PrefixConfig, progress: Progress = NO_PROGRESS):
        self.loaded, self.output, self.cfg, self.progress = loaded, Path(output), cfg, progress
        self.ckpt = Path(str(output) + ".ckpt")
        self.pools = build_pools(paths, cfg)
        # compiled long documents, kept across runs (--force starts the training over, not them)
        self.reads = Reads(loaded, self.pools.docs, Path(str(output) + ".work"), cfg)
        self.responses: dict[str, list[int]] = {}  # the plain model's responses to training instructions
        self.responses_val: dict = {}  # ... and its answers to the held-out ones
        self.history: list[dict] = []
        self.step = 0
        self.best: tuple[float, int] | None = None
        start = self.starting_entries(loaded, cfg)
        self.keys = [torch.nn.Parameter(k.float().clone()) for k in start.keys]
        self.values = [torch.nn.Parameter(v.float().clone()) for v in start.values]
        self.opt = torch.optim.Adam(self.keys + self.values, lr=cfg.lr)
        for param in loaded.model.parameters():
            param.requires_grad_(False)

    @staticmethod
    def starting_entries(loaded, cfg: PrefixConfig) -> Buffer:
        """Where the entries start: a trained prefix (`start_from`: a second phase with other
        weights), or the KV of the `init` instruction's prefill."""
        if cfg.start_from:
            from ..runtime.prefix import open_prefix

            return open_prefix(loaded, Path(cfg.start_from)).buffer
        from ..runtime.cache import prefill

        with torch.no_grad():
            layers, _ = prefill(loaded.model, loaded.prompter.encode(cfg.init))
        return Buffer([k[0] for k, _ in layers], [v[0] for _, v in layers], torch.arange(layers[0][0].shape[2]))

    # --- examples -------------------------------------------------------------------------------

    def draw(self, step: int) -> list[tuple[Example, View]]:
        """This step's examples and their views (seeded by the step: a resumed run draws the
        same). With `answerable`, a question is drawn again until its read holds its answer:
        taught to answer from a read that lacks it, the reader learns to make answers up."""
        cfg, pools = self.cfg, self.pools
        rng = random.Random(f"{cfg.seed}:step:{step}")
        n_long = round(cfg.qa_rows * cfg.long_share) if pools.long else 0
        n_para = cfg.qa_rows - n_long if pools.para else 0
        out = []
        for pool, count in ((pools.para, n_para), (pools.long, n_long)):
            for _ in range(count):
                for attempt in range(8):
                    ex = rng.choice(pool)
                    view = self.reads.view(ex)
                    if not cfg.answerable or attempt == 7 or _holds(view, ex.answer):
                        break
                out.append((ex, view))
        share = cfg.kl_document_share if pools.doc_kl else 0.0
        for j in range(cfg.kl_rows):  # spread evenly: at a half share, every other row reads a document
            pool = pools.doc_kl if math.floor((j + 1) * share) > math.floor(j * share) else pools.plain_kl
            ex = rng.choice(pool)
            out.append((ex, self.reads.view(ex)))
        return out

    def response(self, ex: Example, view: View) -> list[int]:
        """The plain model's own greedy response to an instruction (made once, kept)."""
        key = f"{ex.doc}:{ex.question}"
        if key not in self.responses:
            p = self.loaded.prompter
            a = answer_rows(self.loaded, [Row(view, p.query_ids(ex.question))],
                            AskConfig(max_new_tokens=self.cfg.response_tokens))[0]
            ended = len(a.token_ids) < self.cfg.response_tokens
            self.responses[key] = (a.token_ids + (p.end_ids if ended else []))[: self.cfg.response_tokens] or p.end_ids
        return self.responses[key]

    def rows(self, drawn: list[tuple[Example, View]]) -> tuple[list[View], list[tuple]]:
        p = self.loaded.prompter
        views, rows = [], []
        for ex, view in drawn:
            prompt = p.query_ids(ex.question)
            if ex.answer is None:
                target, is_kl = self.response(ex, view), True
            else:
                target, is_kl = p.encode(ex.answer)[: self.cfg.answer_tokens] + p.end_ids, False
            views.append(view)
            rows.append((prompt, target, is_kl))
        return views, rows

    # --- steps ----------------------------------------------------------------------------------

    def prefix(self):
        return list(zip(self.keys, self.values))

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))  # cosine to 10%

    def train_step(self, step: int) -> dict:
        started = time.perf_counter()
        views, rows = self.rows(self.draw(step))
        with torch.enable_grad():
            terms = step_loss(self.loaded, self.prefix(), views, rows)
            loss = terms["qa"] + self.cfg.kl_weight * terms["kl"]
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.keys + self.values, 1.0)
            self.opt.step()
        return {"step": step + 1, "qa": round(float(terms["qa"].detach()), 4), "kl": round(float(terms["kl"].detach()), 4),
                "seconds": round(time.perf_counter() - started, 2)}

    def reading_prefix(self):
        from ..runtime.prefix import ReadingPrefix

        buffer = Buffer([k.detach().to(self.loaded.dtype) for k in self.keys],
                        [v.detach().to(self.loaded.dtype) for v in self.values], torch.arange(self.keys[0].shape[1]))
        return ReadingPrefix(f"training step {self.step}", buffer, {})

    def validate(self) -> dict:
        """QA on held-out articles with the current prefix, and general answers against the
        plain model's (token F1), through the reading engine as `lcc ask` reads."""
        from ..scoring import score, token_f1

        p, prefix = self.loaded.prompter, self.reading_prefix()
        cfg = AskConfig(max_new_tokens=32)
        qa = self.pools.val_qa
        got = []
        for at in range(0, len(qa), 8):
            chunk = qa[at:at + 8]
            rows = [Row(self.reads.view(ex), p.query_ids(ex.question), ex.question) for ex in chunk]
            got += answer_rows(self.loaded, rows, cfg, prefix)
        scores = [score(a.text, [ex.answer]) for a, ex in zip(got, qa)]
        general = self.pools.val_general
        rows = [Row(self.reads.view(ex), p.query_ids(ex.question), ex.question) for ex in general]
        if "plain" not in self.responses_val:
            self.responses_val["plain"] = [a.text for a in answer_rows(self.loaded, rows, cfg)]
        mine = [a.text for a in answer_rows(self.loaded, rows, cfg, prefix)]
        agree = [token_f1(m, [g]) if g.strip() else float(not m.strip()) for m, g in zip(mine, self.responses_val["plain"])]
        mean = lambda xs: round(sum(xs) / max(len(xs), 1), 4)  # noqa: E731
        with_document = [a for a, ex in zip(agree, general) if ex.doc is not None]
        return {"val_contains": mean([s["contains"] for s in scores]), "val_f1": mean([s["f1"] for s in scores]),
                "val_em": mean([s["em"] for s in scores]), "general_f1": mean(agree),
                "general_f1_document": mean(with_document),
                "general_f1_plain": mean([a for a, ex in zip(agree, general) if ex.doc is None]),
                "examples": [{"q": ex.question, "gold": ex.answer, "got": a.text} for ex, a in zip(qa[:4], got)]
                + [{"q": ex.question, "plain": g, "got": m} for ex, g, m in
                   zip(general[:2], self.responses_val["plain"], mine)]}

    # --- checkpoints ----------------------------------------------------------------------------

    def save(self) -> None:
        from safetensors.torch import save

        tensors = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"k.{i}"], tensors[f"v.{i}"] = k.detach().contiguous(), v.detach().contiguous()
            for name, param in (("k", k), ("v", v)):
                state = self.opt.state.get(param)
                if state:
                    tensors[f"adam.{name}.{i}.m"] = state["exp_avg"].contiguous()
                    tensors[f"adam.{name}.{i}.v"] = state["exp_avg_sq"].contiguous()
                    tensors[f"adam.{name}.{i}.t"] = torch.as_tensor(state["step"]).float().reshape(1)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write(self.ckpt / "state.safetensors", save(tensors), overwrite=True)
        state = {"step": self.step, "history": self.history, "best": self.best, "config": self.cfg.to_dict()}
        atomic_write(self.ckpt / "responses.json", json.dumps(self.responses).encode(), overwrite=True)
        atomic_write(self.ckpt / "state.json", json.dumps(state).encode(), overwrite=True)

    def load(self) -> None:
        from safetensors.torch import load_file

        state = json.loads((self.ckpt / "state.json").read_text())
        defaults = PrefixConfig().to_dict()  # a setting added since the run began, at its default, changes nothing
        mine = {k: v for k, v in self.cfg.to_dict().items() if k in state["config"] or v != defaults[k]}
        if state["config"] != mine:
            raise OutputExistsError(f"{self.ckpt} was made with other settings; pass --force to start over")
        tensors = load_file(str(self.ckpt / "state.safetensors"))
        with torch.no_grad():
            for i, (k, v) in enumerate(zip(self.keys, self.values)):
                k.copy_(tensors[f"k.{i}"])
                v.copy_(tensors[f"v.{i}"])
                for name, param in (("k", k), ("v", v)):
                    if f"adam.{name}.{i}.m" in tensors:
                        self.opt.state[param] = {"step": tensors[f"adam.{name}.{i}.t"][0].clone(),
                                                 "exp_avg": tensors[f"adam.{name}.{i}.m"].clone(),
                                                 "exp_avg_sq": tensors[f"adam.{name}.{i}.v"].clone()}
        self.step, self.history = state["step"], state["history"]
        self.best = tuple(state["best"]) if state["best"] else None
        path = self.ckpt / "responses.json"
        self.responses = json.loads(path.read_text()) if path.is_file() else {}

    def keep_best(self, result: dict) -> None:
        # lcc reads the prefix before documents only (runtime.reading.View): that is the general
        # ability that must hold
        general_ok = result.get("general_f1_document", result["general_f1"]) >= GENERAL_FLOOR
        value = result["val_f1"] + result["val_contains"] - (0 if general_ok else 10)
        if self.best is None or value > self.best[0]:
            self.best = (value, self.step)
            self.ckpt.mkdir(parents=True, exist_ok=True)
            self.write(self.ckpt / "best.safetensors", selected=self.step, validation=result)

    def write(self, path: Path, selected: int, validation: dict | None = None) -> None:
        from ..format.prefix_file import save_prefix

        loaded = self.loaded
        manifest = {"name": self.output.stem, "model": loaded.facts.to_manifest(loaded.model_id, loaded.fingerprint),
                    "prompt": {"init": self.cfg.init},
                    "training": {**self.cfg.to_dict(), "data": self.pools.files, "selected_step": selected,
                                 "validation": {k: v for k, v in (validation or {}).items() if k != "examples"}},
                    "lcc_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        save_prefix(path, manifest, [k.detach() for k in self.keys], [v.detach() for v in self.values])

    def run(self, resume: bool = False, stop_after: int | None = None) -> PrefixResult:
        started = time.perf_counter()
        cfg, progress = self.cfg, self.progress
        if resume and (self.ckpt / "state.json").is_file():
            self.load()
            progress.status(f"resuming at step {self.step}")
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        progress.start("steps", cfg.steps)
        progress.advance("steps", self.step)
        while self.step < end:
            record = self.train_step(self.step)
            self.step += 1
            progress.advance("steps")
            progress.note(f"step {self.step}: qa {record['qa']:.3f} kl {record['kl']:.3f} ({record['seconds']:.1f}s)")
            if self.step % cfg.validate_every == 0 or self.step == cfg.steps:
                with torch.no_grad():
                    result = self.validate()
                record.update(result)
                progress.note(f"step {self.step}: validation contains {result['val_contains']:.3f} f1 "
                              f"{result['val_f1']:.3f} em {result['val_em']:.3f} general {result['general_f1']:.3f}")
                self.keep_best(result)
            self.history.append(record)
            if self.step % cfg.checkpoint_every == 0 or self.step == end:
                self.save()
        selected = self.best[1] if self.best else self.step
        if self.step >= cfg.steps:
            best = self.ckpt / "best.safetensors"
            data = best.read_bytes() if best.is_file() else None
            if data is None:
                self.write(self.output, self.step)
            else:
                atomic_write(self.output, data, overwrite=True)
        return PrefixResult(str(self.output), self.step, selected, time.perf_counter() - started, self.history)


def train_prefix(loaded, data: list[Path], output: Path, cfg: PrefixConfig, resume: bool = False,
                 force: bool = False, stop_after: int | None = None, progress: Progress = NO_PROGRESS) -> PrefixResult:
    """Train a reading prefix for `loaded` and write it to `output` once every step is done
    (the best validated step's entries). Checkpoints in OUTPUT.ckpt/."""
    import shutil

    output = Path(output)
    ckpt = Path(str(output) + ".ckpt")
    if ckpt.exists() and not resume:
        if not force:
            raise OutputExistsError(f"a training run exists in {ckpt}", hint="pass --resume to continue it or --force "
                                                                             "to start over")
        shutil.rmtree(ckpt)
    if output.exists() and not (force or resume):
        raise OutputExistsError(f"{output} exists", hint="pass --force to replace it")
    return Trainer(loaded, data, output, cfg, progress).run(resume, stop_after)

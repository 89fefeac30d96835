"""The pretrained compiler: training, its file, one-pass compiles, refinement, resume."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import DOC, fast_config, run_opts
from lcc_cli import api
from lcc_cli.cli import app
from lcc_cli.compile.base import CompilerSpec
from lcc_cli.config import TrainConfig
from lcc_cli.errors import CompilerFileError, ModelMismatchError
from lcc_cli.format.cartridge import load_cartridge
from lcc_cli.format.compiler_file import load_compiler
from lcc_cli.progress import Progress

LONG = "\n\n".join([
    "The harbour wall was begun in 1820 and finished in 1826 by the engineer Ada Stone.",
    "Its lighthouse burned oil until 1923, when an electric lamp replaced the old burner.",
    "The keepers left in 1987, when the station was automated and the cottages were sold.",
    "Seals rest on the granite spur at low tide, and terns nest on the roof of the store.",
])
ROWS = [
    {"context": DOC, "title": "harbor", "questions": [{"q": "Who built it?"}, {"q": "When was it completed?"}]},
    {"context": LONG, "title": "harbour-long", "questions": [
        {"q": "Who finished the wall?", "answers": ["Ada Stone"], "para": 0},
        {"q": "When was it automated?", "answers": ["1987"], "para": 2},
        {"q": "What rests on the spur?", "answers": ["Seals"], "para": 3}]},
    {"context": "The tower is 41 metres tall and painted in red and white bands.", "questions": [{"q": "How tall?"}]},
    {"context": "The lamp burned oil. It was replaced in 1923. The station was automated in 1987.",
     "questions": [{"q": "When was it automated?"}]},
    {"context": "Name three colours. The bay is wide and the spur is granite.", "questions": []},
    {"context": "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 lighthouse engineer Ada.",
     "questions": [{"q": "Which letters?"}]},
]


def small(**overrides) -> TrainConfig:
    base = dict(steps=6, batch=2, lr=5e-3, warmup=1, lora_rank=4, lora_alpha=4, response_tokens=4, top_k=8,
                checkpoint_every=3, heldout=1, heldout_long=0, recon_tokens=40, segment_tokens=32)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One compiler trained on ROWS, shared by read-only tests."""
    import os

    d = tmp_path_factory.mktemp("trained")
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    old = os.environ.get("LCC_HOME")
    os.environ["LCC_HOME"] = str(d / "home")
    try:
        result = api.train_compiler([d / "train.jsonl"], d / "c.safetensors", small(), run=run_opts(tiny_model_dir))
    finally:
        os.environ.pop("LCC_HOME") if old is None else os.environ.__setitem__("LCC_HOME", old)
    return d / "c.safetensors", result


def _losses(history: list[dict]) -> list[dict]:
    """A run's history without its timings (everything else must match exactly)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _tensors_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiler_file_records_model_training_and_data(trained, tiny):
    path, result = trained
    comp = load_compiler(path)
    m = comp.manifest
    assert m["format"] == "lcc-compiler" and m["model"]["fingerprint"] == tiny.fingerprint
    t = m["training"]
    assert t["ratios"] == [4.0, 32.0] and t["steps"] == result.steps == 6
    assert t["objective"] == {"recon": 0.5, "qa_kl": 1.0, "instruction_kl": 0.5}
    assert t["data"][0]["rows"] == 6 and len(t["data"][0]["sha256"]) == 64
    assert t["tokens"] > 0 and t["tokens_per_second"] > 0 and m["lcc_version"]
    assert comp.slot_bias.shape == (tiny.facts.hidden_size,) and comp.lora
    # the held-out score was measured at every checkpoint, and the kept step is one of them
    assert [h["step"] for h in t["history"]] == [3, 6] and t["selected_step"] in (3, 6)


def test_inspect_shows_a_compiler_file(trained):
    path, _ = trained
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0 and "lcc-compiler" in result.stdout and "LoRA rank 4" in result.stdout
    info = json.loads(CliRunner().invoke(app, ["inspect", str(path), "--json"]).stdout)
    assert info["kind"] == "compiler" and info["manifest"]["training"]["steps"] == 6


def test_a_damaged_compiler_file_is_refused(trained, tmp_path):
    data = bytearray(trained[0].read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CompilerFileError, match="checksum"):
        load_compiler(tmp_path / "bad.safetensors")


def test_compiler_for_another_model_is_refused(trained, other_model_dir, doc_file, tmp_path):
    with pytest.raises(ModelMismatchError, match="was made for model"):
        api.compile_file(doc_file, tmp_path / "o.lcc", fast_config(steps=0), compiler=CompilerSpec("pretrained",
                         str(trained[0])), run=run_opts(other_model_dir))


def test_one_pass_compile_has_a_sink_and_leaves_the_model_alone(trained, tiny_model_dir, doc_file, tmp_path):
    from lcc_cli.runtime.cache import prefill
    from lcc_cli.runtime.model import load_model

    loaded = load_model(str(tiny_model_dir))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = tmp_path / "o.lcc"
    result = api.compile_file(doc_file, out, {"steps": 0, "ratio": 8}, compiler=str(trained[0]),
                              run=run_opts(tiny_model_dir))
    cart = load_cartridge(out)
    comp = load_compiler(trained[0])
    assert cart.manifest["compiler"]["sha256"] == comp.sha256 and cart.manifest["compile"]["steps"] == 0
    assert cart.segments[0]["sink"] is True
    assert result.slots == -(-result.tokens // 8)  # the sink is one of the K = ceil(n / ratio) entries
    # entry 0 is the context's first token at position 0: its KV does not depend on the text
    kv, _ = prefill(loaded.model, loaded.prompter.context_ids(DOC)[:1])
    torch.testing.assert_close(cart.buffer.keys[0][:, :1], kv[0][0][0], rtol=1e-5, atol=1e-6)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in loaded.model.named_modules())


def test_refinement_starts_from_the_compiler_and_discards_its_copy(trained, tiny_model_dir, doc_file, tmp_path):
    before = trained[0].read_bytes()
    zero, refined = tmp_path / "z.lcc", tmp_path / "r.lcc"
    api.compile_file(doc_file, zero, {"steps": 0, "ratio": 8}, compiler=str(trained[0]), run=run_opts(tiny_model_dir))
    api.compile_file(doc_file, refined, {"steps": 3, "ratio": 8, "kl_pool": 4, "response_tokens": 4},
                     compiler=str(trained[0]), run=run_opts(tiny_model_dir))
    a, b = load_cartridge(zero), load_cartridge(refined)
    assert b.manifest["metrics"]["segments"][0]["steps"] == 3 and b.slots == a.slots
    assert not torch.equal(a.buffer.values[0], b.buffer.values[0])  # refinement moved the buffer
    torch.testing.assert_close(a.buffer.keys[0][:, :1], b.buffer.keys[0][:, :1])  # the sink did not move
    assert trained[0].read_bytes() == before  # the pretrained weights never change


def test_auto_takes_the_tables_any_model_method_for_a_model_without_a_compiler(tiny, doc_file, tmp_path,
                                                                              tiny_model_dir):
    """The tiny model has no pretrained compiler: `auto` follows the bench's any-model row,
    whose measured cost is within the preset's budget, instead of optimising from scratch."""
    from lcc_cli.compile.auto import table

    t = table()
    row = t["rows"]["any_model"]
    for quality, entry in row.items():
        assert entry["prefill_equivalents"] <= t["budgets"][quality] or quality == "fast"
        assert api.resolve_compiler(tiny, "auto", quality).name == entry["compiler"] != "optimise"
    assert api.resolve_compiler(tiny, "none").name == "optimise"
    # a compiled cartridge (--no-index): an indexed one of pages alone runs no compiler
    result = api.compile_file(doc_file, tmp_path / "o.lcc", {"ratio": 8, "index": False}, run=run_opts(tiny_model_dir))
    assert result.compiler["name"] == row["balanced"]["compiler"]
    m = load_cartridge(tmp_path / "o.lcc").manifest
    assert all(m["compile"][k] == v for k, v in row["balanced"]["settings"].items() if k != "segment_tokens")


def test_training_is_deterministic_for_a_seed(data, tmp_path, tiny_model_dir):
    threads = torch.get_num_threads()
    try:
        a = api.train_compiler([data], tmp_path / "a.safetensors", small(steps=3), run=run_opts(tiny_model_dir, threads=1))
        b = api.train_compiler([data], tmp_path / "b.safetensors", small(steps=3), run=run_opts(tiny_model_dir, threads=1))
    finally:
        torch.set_num_threads(threads)
    assert _losses(a.history) == _losses(b.history)
    assert _tensors_equal(load_compiler(tmp_path / "a.safetensors").tensors, load_compiler(tmp_path / "b.safetensors").tensors)


class StopAtStep(Progress):
    def __init__(self, step):
        self.step, self.done = step, 0

    def advance(self, task, n=1, **metrics):
        if task == "train":
            self.done += n
            if self.done >= self.step and metrics:
                raise KeyboardInterrupt


def test_interrupted_training_resumes_to_the_same_compiler(data, tmp_path, tiny_model_dir):
    from lcc_cli.errors import Interrupted

    threads = torch.get_num_threads()
    try:
        api.train_compiler([data], tmp_path / "ref.safetensors", small(), run=run_opts(tiny_model_dir, threads=1))
        with pytest.raises(Interrupted, match="checkpoints"):
            api.train_compiler([data], tmp_path / "c.safetensors", small(), run=run_opts(tiny_model_dir, threads=1),
                               progress=StopAtStep(4))
        assert not (tmp_path / "c.safetensors").exists()
        api.train_compiler([data], tmp_path / "c.safetensors", small(), run=run_opts(tiny_model_dir, threads=1),
                           resume=True)
    finally:
        torch.set_num_threads(threads)
    ref, got = load_compiler(tmp_path / "ref.safetensors"), load_compiler(tmp_path / "c.safetensors")
    assert _tensors_equal(ref.tensors, got.tensors)
    assert _losses(ref.manifest["training"]["history"]) == _losses(got.manifest["training"]["history"])


def test_train_compiler_cli_refuses_bad_data(tmp_path, tiny_model_dir):
    (tmp_path / "bad.jsonl").write_text('{"questions": []}\n')
    result = CliRunner().invoke(app, ["train-compiler", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "c"),
                                      "--model", str(tiny_model_dir)])
    assert result.exit_code == 3 and "line 1" in result.stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_gpu_train_compile_and_read_back_on_cpu(data, tmp_path, tiny_model_dir, doc_file):
    """Train and compile on CUDA (bf16), then answer on the CPU from the same cartridge, and
    the other way round."""
    gpu = run_opts(tiny_model_dir, device="cuda")
    api.train_compiler([data], tmp_path / "c.safetensors", small(steps=2), run=gpu)
    api.compile_file(doc_file, tmp_path / "g.lcc", {"steps": 2, "ratio": 8, "kl_pool": 2},
                     compiler=str(tmp_path / "c.safetensors"), run=gpu)
    assert load_cartridge(tmp_path / "g.lcc").manifest["buffer"]["dtype"] == "bfloat16"
    (cpu_answer,) = api.ask(["Who built it?"], [tmp_path / "g.lcc"], run=run_opts(tiny_model_dir, device="cpu"))
    assert cpu_answer.kv_positions == load_cartridge(tmp_path / "g.lcc").slots
    api.compile_file(doc_file, tmp_path / "c.lcc", {"steps": 1, "ratio": 8, "kl_pool": 2},
                     run=run_opts(tiny_model_dir, device="cpu"))
    (gpu_answer,) = api.ask(["Who built it?"], [tmp_path / "c.lcc"], run=gpu)
    assert gpu_answer.kv_positions == load_cartridge(tmp_path / "c.lcc").slots


def test_stop_after_ends_the_schedule_early_and_says_so(data, tmp_path, tiny_model_dir):
    result = api.train_compiler([data], tmp_path / "c.safetensors", small(steps=6, checkpoint_every=4),
                                run=run_opts(tiny_model_dir), stop_after=3)
    t = load_compiler(tmp_path / "c.safetensors").manifest["training"]
    assert result.steps == t["steps"] == 3 and t["config"]["steps"] == 6
    assert [h["step"] for h in t["history"]] == [3]  # the stopping step is scored like a checkpoint


def test_the_batched_step_computes_the_per_document_losses(data, tiny_model_dir, monkeypatch, tmp_path):
    """One padded pass per stage for a whole step (batched.py) against one document at a
    time: the same terms and the same gradient, up to float32 rounding of padded matmuls
    and of the summation order (1e-4 relative leaves room for that and catches any
    misplaced position, mask or row, which moves the terms by far more)."""
    import random

    from lcc_cli.api import load
    from lcc_cli.training import batched, data as train_data, losses
    from lcc_cli.compile.optimise import attach_lora

    monkeypatch.setenv("LCC_HOME", str(tmp_path / "home"))
    cfg = small(segment_tokens=32)
    loaded = load(run_opts(tiny_model_dir, threads=1))
    rows, _ = train_data.read_training_data([data], cfg.segment_tokens)
    targets = losses.instruction_targets(loaded, cfg)
    peft_model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    try:
        torch.manual_seed(0)
        for p in peft_model.parameters():
            if p.requires_grad:
                p.data = torch.randn_like(p) * 0.05  # a LoRA that does something
        bias = torch.nn.Parameter(torch.randn(loaded.facts.hidden_size) * 0.01)
        rng = random.Random(0)
        items = []
        for row in rows:
            doc = train_data.prepare(loaded, row, cfg)
            items.append((doc, [3.0, 5.0, 7.0][len(items) % 3], *losses.sample_step(doc, targets, rng, cfg)))
        assert any(len(it[0].segments) > 1 for it in items) and any(it[2] for it in items)
        params = [p for p in peft_model.parameters() if p.requires_grad] + [bias]

        def run(fn):
            for p in params:
                p.grad = None
            results = fn()
            sum(cfg.recon_weight * t["recon"] + cfg.qa_weight * t["qa"] + cfg.kl_weight * t["kl"]
                for t, _ in results).backward()
            return results, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

        one, g1 = run(lambda: [losses.document_losses(loaded, peft_model, bias, *it, cfg) for it in items])
        many, g2 = run(lambda: batched.step_losses(loaded, peft_model, bias, items, cfg))
        for (ta, na), (tb, nb) in zip(one, many):
            assert na == nb
            for key in ("recon", "qa", "kl"):
                assert float(tb[key]) == pytest.approx(float(ta[key]), rel=1e-4, abs=1e-5), key
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    finally:
        peft_model.unload()


def test_heldout_questions_are_spread_over_the_segments():
    """A long document's held-out questions must ask about every segment's buffer, not only
    the first segment's (whose questions the data lists first)."""
    from lcc_cli.training.data import Question, spread

    qs = [Question([i], None, segment) for i, segment in enumerate([0, 0, 0, 0, 1, 1, 2])]
    assert [q.segment for q in spread(qs, 5)] == [0, 1, 2, 0, 1]
    assert [q.prompt for q in spread(qs, 3)] == [[0], [4], [6]]
    assert len(spread(qs, 20)) == 7 and len(spread(qs[:4], 2)) == 2


def test_history_losses_average_each_term_over_the_documents_that_have_it(trained):
    """Between checkpoints, over every step; reconstruction only over one-segment documents
    (a long document has none, and counting it as 0 would understate the loss)."""
    _, result = trained
    t = load_compiler(trained[0]).manifest["training"]
    first, second = t["history"]
    assert (first["means_since"], second["means_since"]) == (0, 3)
    assert all(h["recon"] > 0.5 and h["qa"] > 0 and h["heldout_metric"] == 2 for h in t["history"])


def test_a_best_checkpoint_chosen_by_an_older_heldout_metric_is_chosen_again(tmp_path, tiny_model_dir):
    # every question with a gold answer, so that the held-out score exists (each row is a
    # long document at these 32-token segments)
    data = tmp_path / "answered.jsonl"
    data.write_text("\n".join(json.dumps({"context": f"{DOC} The keeper number {i} was Ada.", "title": f"t{i}",
                                          "questions": [{"q": "Who designed it?", "answers": ["Ada Pellinger"], "para": 0}]})
                               for i in range(10)) + "\n")
    api.train_compiler([data], tmp_path / "c.safetensors", small(heldout_long=1), run=run_opts(tiny_model_dir), stop_after=3)
    state_path = tmp_path / "c.safetensors.ckpt" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["best"]["heldout_qa_kl"] > 0
    state["best"] = {"step": 3, "heldout_qa_kl": -1.0}  # metric 1 (no version): unbeatable on its own scale
    state_path.write_text(json.dumps(state))
    api.train_compiler([data], tmp_path / "c.safetensors", small(heldout_long=1), run=run_opts(tiny_model_dir), resume=True,
                       force=True)
    t = load_compiler(tmp_path / "c.safetensors").manifest["training"]
    assert t["selected_step"] == 6 and t["heldout_qa_kl"] > 0
    # every document here is long: no reconstruction to average (not a mean of zeros)
    assert all(h["recon"] is None and h["qa"] > 0 for h in t["history"])

"""`--compiler am` (Attention-Matching compaction in closed form), `--compiler truncate`, and
direct KV refinement of either (`--steps N`)."""

from __future__ import annotations

import pytest
import torch

from conftest import DOC, run_opts
from lcc_cli import api
from lcc_cli.config import AskConfig
from lcc_cli.format.cartridge import load_cartridge


@pytest.mark.parametrize("method", ["am", "truncate"])
def test_at_ratio_1_the_buffer_is_the_context_itself(method, tiny_model_dir, doc_file, tmp_path):
    """Keeping every position moves no key: the cartridge must answer exactly as the
    document in the prompt does (same KV, same positions, same question)."""
    out = tmp_path / "all.lcc"
    api.compile_file(doc_file, out, {"ratio": 1.0}, compiler=method, run=run_opts(tiny_model_dir))
    cart = load_cartridge(out)
    assert cart.manifest["compiler"]["name"] == method and cart.segments[0]["sink"]
    assert cart.slots == cart.segments[0]["token_count"]
    cfg = AskConfig(max_new_tokens=12)
    q = ["Who designed the lighthouse?", "When was it completed?"]
    from_cart = api.ask(q, [out], cfg=cfg, run=run_opts(tiny_model_dir))
    from_doc = api.ask(q, context=doc_file, cfg=cfg, run=run_opts(tiny_model_dir))
    assert [a.text for a in from_cart] == [a.text for a in from_doc]


def test_am_compacts_deterministically_and_leaves_the_model_alone(tiny, doc_file, tmp_path, tiny_model_dir):
    from lcc_cli.compile.am import AttentionMatchingCompiler
    from lcc_cli.compile.choice import compile_config
    from lcc_cli.ingest import TextSegment

    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    compiler = AttentionMatchingCompiler(tiny)
    cfg = compile_config("am", "fast", ratio=8.0, segment_tokens=512)
    a = compiler.compile(TextSegment(0, DOC), cfg)
    b = compiler.compile(TextSegment(0, DOC), cfg)
    assert a.buffer.slots == -(-a.token_count // 8) and a.sink
    assert all(torch.equal(x, y) for x, y in zip(a.buffer.keys + a.buffer.values, b.buffer.keys + b.buffer.values))
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in before.items())
    # the first entry is the context's first token, untouched (the sink)
    from lcc_cli.runtime.cache import prefill

    kv, _ = prefill(tiny.model, tiny.prompter.context_ids(DOC))
    assert torch.allclose(a.buffer.keys[0][:, 0], kv[0][0][0, :, 0]) and torch.allclose(a.buffer.values[1][:, 0],
                                                                                           kv[1][1][0, :, 0])
    assert not hasattr(tiny.model, "peft_config")


def test_am_on_the_command_line(doc_file, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from lcc_cli.cli import app

    r = CliRunner().invoke(app, ["compile", str(doc_file), "-o", str(tmp_path / "a.lcc"), "--compiler", "am",
                                 "--ratio", "8", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, ["verify", str(tmp_path / "a.lcc"), "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.stdout + r.stderr
    r = CliRunner().invoke(app, ["compile", str(doc_file), "-o", str(tmp_path / "b.lcc"), "--compiler", "am",
                                 "--steps", "3", "--model", str(tiny_model_dir), "--json"])
    assert r.exit_code == 0, r.stderr
    cart = load_cartridge(tmp_path / "b.lcc")
    assert cart.manifest["compile"]["steps"] == 3 and cart.manifest["metrics"]["segments"][0]["steps"] == 3


def test_routing_reads_the_segment_the_question_attends_to(tiny_model_dir, tmp_path):
    """A two-segment cartridge whose second segment repeats the question's words: routing to
    one segment keeps a consecutive buffer of that segment alone; asking with it equals asking
    the one-segment cartridge of that text."""
    from lcc_cli.api import load
    from lcc_cli.runtime.memory.routed import Routed, segment_scores

    loaded = load(run_opts(tiny_model_dir))
    text = ("The granite quarry ships stone by rail to the city. " * 6) + "\n\n" + (DOC + " ") * 2
    src = tmp_path / "two.txt"
    src.write_text(text)
    api.compile_file(src, tmp_path / "two.lcc", {"ratio": 2.0, "segment_tokens": 96}, compiler="am",
                     run=run_opts(tiny_model_dir))
    cart = load_cartridge(tmp_path / "two.lcc")
    assert len(cart.segments) >= 2
    scores = segment_scores(loaded, cart.buffer, cart.segments, "Who designed the lighthouse?")
    assert len(scores) == len(cart.segments) and all(s >= 0 for s in scores)
    one = Routed(loaded, cart, 1).view("Who designed the lighthouse?").buffer
    best = max(range(len(scores)), key=scores.__getitem__)
    assert one.slots == cart.segments[best]["slots"]
    assert one.positions.tolist() == list(range(one.slots))  # laid out from 0, consecutively
    alone = cart.segment_buffers()[best].moved(loaded.rope, -int(cart.segment_buffers()[best].positions.min()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one.keys, alone.keys))
    everything = Routed(loaded, cart, len(cart.segments))
    assert everything.view("anything").buffer is everything.buffer


@pytest.mark.parametrize("method", ["am", "truncate"])
def test_direct_refinement_lowers_the_objective_and_moves_only_the_buffer(method, tiny, tmp_path):
    """Steps on the buffer's own keys and values: the loss falls, the sink entry and the
    model stay exactly as they were, and the same seed gives the same buffer."""
    from lcc_cli.compile.base import CompilerSpec, build_compiler
    from lcc_cli.compile.choice import compile_config
    from lcc_cli.ingest import TextSegment

    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    compiler = build_compiler(CompilerSpec(method), tiny)
    start = compiler.compile(TextSegment(0, DOC), compile_config(method, "fast", ratio=4.0))
    cfg = compile_config(method, "fast", ratio=4.0, steps=8, kl_pool=4, kl_per_step=2, response_tokens=8)
    a = compiler.compile(TextSegment(0, DOC), cfg)
    b = compiler.compile(TextSegment(0, DOC), cfg)
    assert a.metrics["final_recon"] < a.metrics["first_recon"]  # the one item every step reads
    assert a.buffer.slots == start.buffer.slots and a.buffer.positions.tolist() == start.buffer.positions.tolist()
    for x, y in zip(a.buffer.keys + a.buffer.values, start.buffer.keys + start.buffer.values):
        assert torch.equal(x[:, 0], y[:, 0])  # the sink
        assert not torch.allclose(x[:, 1:], y[:, 1:])  # every layer's entries moved
    assert all(torch.equal(x, y) for x, y in zip(a.buffer.keys + a.buffer.values, b.buffer.keys + b.buffer.values))
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in tiny.model.parameters())


def test_am_from_the_command_line_keeps_its_whole_document_preset(tmp_path, tiny_model_dir):
    """The flag's default must not override am's preset (one segment where the window allows)."""
    from typer.testing import CliRunner

    from lcc_cli.cli import app

    src = tmp_path / "long.txt"
    src.write_text((DOC + " ") * 20)  # about 1,200 tokens: two segments at the flag's old default
    r = CliRunner().invoke(app, ["compile", str(src), "-o", str(tmp_path / "a.lcc"), "--compiler", "am",
                                 "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.stderr
    cart = load_cartridge(tmp_path / "a.lcc")
    assert cart.manifest["compile"]["segment_tokens"] > 1024 and len(cart.segments) == 1


def test_self_check_agrees_fully_when_the_buffer_is_the_context(tmp_path, doc_file, tiny_model_dir):
    """At ratio 1, am keeps the document's own KV: every self-asked question gets the same
    answer from the cartridge as from the document, so agreement is exactly 1; inspect shows it."""
    from typer.testing import CliRunner

    from lcc_cli.cli import app

    r = CliRunner().invoke(app, ["compile", str(doc_file), "-o", str(tmp_path / "a.lcc"), "--compiler", "am",
                                 "--ratio", "1", "--self-check", "3", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.stderr
    check = load_cartridge(tmp_path / "a.lcc").manifest["metrics"]["self_check"]
    assert check["questions"] == 3 and check["agreement"] == 1.0
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "a.lcc")])
    assert "self-check" in r.stdout and "agree 1.0" in r.stdout
    r = CliRunner().invoke(app, ["compile", str(doc_file), "-o", str(tmp_path / "b.lcc"), "--self-check", "9",
                                 "--model", str(tiny_model_dir)])
    assert r.exit_code == 2 and "--self-check" in r.stderr


def test_self_check_skips_a_document_past_the_window_instead_of_failing(tiny_loaded):
    """A cartridge can hold a document longer than the model's window (one buffer per
    segment); the self-check's reference reads the document whole, so it records why it
    did not run rather than failing the compile after the work is done."""
    from lcc_cli.runtime.selfcheck import self_check

    text = (DOC + " ") * 80
    assert len(tiny_loaded.prompter.context_ids(text)) > tiny_loaded.facts.max_positions
    check = self_check(tiny_loaded, text, None, 3)
    assert check["questions"] == 0 and check["agreement"] is None and "window" in check["skipped"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_reference_queries_are_the_ones_the_attention_uses(tmp_path, arch):
    """Keys are ranked by the attention the reference queries give them: that attention must
    be the model's own (eager attention weights, renormalised over the context), also for a
    model that normalises its queries after q_proj (Qwen3's q_norm)."""
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model
    from lcc_cli.compile.am import MAX_QUERIES, AttentionMatchingCompiler
    from lcc_cli.runtime.model import load_model
    from lcc_cli.runtime.prompts import RECONSTRUCT_INSTRUCTION

    directory = build_tiny_model(tmp_path / arch, arch=arch)
    loaded = load_model(str(directory))
    am = AttentionMatchingCompiler(loaded)
    n, queries, kv = am.reference(DOC)

    p = loaded.prompter
    repeat = p.query_ids(RECONSTRUCT_INSTRUCTION) + p.document_ids(DOC)[:n]
    eager = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    with torch.no_grad():
        weights = eager(torch.tensor([p.context_ids(DOC) + repeat]), output_attentions=True).attentions
    pick = torch.linspace(0, len(repeat) - 1, min(len(repeat), MAX_QUERIES)).round().long()
    group = am.heads // am.kv_heads
    for layer, (q, (key, _)) in enumerate(zip(queries, kv)):
        expected = weights[layer][0][:, n + pick, :n]
        expected = expected / expected.sum(-1, keepdim=True)
        got = torch.softmax(q @ key.repeat_interleave(group, 0).transpose(1, 2) * am.scale, dim=-1)
        assert torch.allclose(got, expected, atol=1e-5), (arch, layer, (got - expected).abs().max())

"""The method's guarantees: hard bottleneck, gradient isolation, RoPE positions, determinism."""

from __future__ import annotations

import torch

from conftest import DOC, fast_config
from lcc_cli import compiler, kvcache
from lcc_cli.cartridge import from_bytes, from_segments, load_cartridge, to_bytes
from lcc_cli.ingest import Document
from lcc_cli.prompts import Prompter


def _doc(text=DOC):
    return Document(text=text, sha256="0" * 64, name="doc.txt")


def _reader_logits(loaded, kv, first_position, question="Who built it?"):
    ids = Prompter(loaded.tokenizer).query_ids(question)
    with torch.no_grad():
        cache = kvcache.make_cache(kv)
        return kvcache.forward(loaded.model, cache, first_position, input_ids=torch.tensor([ids]))[0]


def test_slot_count_is_ceil_of_tokens_over_ratio():
    assert compiler.slot_count(100, 16) == 7
    assert compiler.slot_count(16, 16) == 1


def test_base_weights_bit_identical_and_no_lora_left(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    seg = compiler.compile_segment(tiny, DOC, fast_config())
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in tiny.model.named_modules())
    assert seg.metrics["final_loss"] != seg.metrics["first_loss"]  # training did move something


def test_training_reader_sees_only_the_buffer(tiny, monkeypatch):
    """Structural bottleneck: every reader cache built during compile holds K positions, and
    the reader's questions start where the cartridge says they will at ask time."""
    lengths, positions = [], []
    real = compiler._reader_logits

    def spy(model, buf_kv, first_position, rows):
        lengths.append(buf_kv[0][0].shape[-2])
        positions.append(first_position)
        return real(model, buf_kv, first_position, rows)

    monkeypatch.setattr(compiler, "_reader_logits", spy)
    seg = compiler.compile_segment(tiny, DOC, fast_config())
    assert lengths and set(lengths) == {seg.slots}
    assert seg.slots < seg.token_count
    cart = from_segments(tiny, [seg], _doc(), fast_config().to_dict(), "test")
    assert set(positions) == {cart.first_query_position}


def test_reader_output_independent_of_source_text(compiled, tiny_model_dir, monkeypatch):
    """With a fixed cartridge the answer cannot depend on the document: rewriting the source
    file changes nothing, and the reader's cache holds exactly the buffer."""
    from lcc_cli import engine, reader

    path, src = compiled
    lengths = []
    real = reader.make_cache
    monkeypatch.setattr(reader, "make_cache", lambda kv: lengths.append(kv[0][0].shape[-2]) or real(kv))
    a = engine.ask("Who built it?", [path], model=str(tiny_model_dir))
    original = src.read_text()
    try:
        src.write_text("Something else entirely: the moon is made of basalt and was never built.")
        b = engine.ask("Who built it?", [path], model=str(tiny_model_dir))
    finally:
        src.write_text(original)
    assert a["answer"] == b["answer"]
    slots = load_cartridge(path).slots
    assert lengths == [slots, slots] and a["kv_positions"] == slots


def test_cartridge_round_trip_reproduces_compile_time_logits(tiny):
    seg = compiler.compile_segment(tiny, DOC, fast_config())
    first = seg.position_start + seg.slots
    live = _reader_logits(tiny, [(k[None], v[None]) for k, v in seg.kv], first)
    cart = from_bytes(to_bytes(from_segments(tiny, [seg], _doc(), fast_config().to_dict(), "test")))
    assert cart.first_query_position == first
    loaded = _reader_logits(tiny, cart.reader_kv(), cart.first_query_position)
    torch.testing.assert_close(loaded, live, rtol=0, atol=0)
    # The test is sensitive to positions: a query one position off reads differently.
    shifted = _reader_logits(tiny, cart.reader_kv(), cart.first_query_position + 1)
    assert not torch.allclose(shifted, live)


def test_compile_is_deterministic_for_a_seed(tiny):
    a = compiler.compile_segment(tiny, DOC, fast_config(seed=3))
    b = compiler.compile_segment(tiny, DOC, fast_config(seed=3))
    c = compiler.compile_segment(tiny, DOC, fast_config(seed=4))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a.kv, b.kv))
    assert not torch.equal(a.kv[0][0], c.kv[0][0])


def test_reconstruction_loss_falls_with_training(tiny):
    seg = compiler.compile_segment(tiny, DOC, fast_config(steps=30, kl_weight=0.0, lr=5e-2, ratio=2))
    # A random tiny model cannot recite much, but gradients must reach the buffer and move it.
    assert seg.metrics["final_recon"] < seg.metrics["first_recon"] - 0.1


def test_plain_teacher_uses_only_context_free_instructions(tiny):
    from lcc_cli.prompts import generic_instructions

    agnostic, about = generic_instructions()
    assert len(agnostic) + len(about) >= 100
    ctx_kv, _ = kvcache.prefill(tiny.model, Prompter(tiny.tokenizer).context_ids(DOC))
    targets = compiler.make_teacher_targets(tiny, DOC, ctx_kv, fast_config(teacher="plain", kl_pool=50))
    about_ids = {tuple(Prompter(tiny.tokenizer).query_ids(q)) for q in about}
    assert targets.prompts and not any(tuple(p) in about_ids for p in targets.prompts)
    assert all(lp.shape == (len(r), tiny.model.config.vocab_size) for r, lp in zip(targets.responses, targets.logprobs))


def test_batched_teacher_matches_one_at_a_time(tiny):
    """Left-padded batched decoding must give each row the same tokens as decoding it alone."""
    p = Prompter(tiny.tokenizer)
    ctx_kv, _ = kvcache.prefill(tiny.model, p.context_ids(DOC))
    n = len(p.context_ids(DOC))
    prompts = [p.query_ids("Name three colours."), p.query_ids("Summarise the document in one sentence please.")]
    with torch.no_grad():
        batch, batch_lp = compiler.batched_greedy(tiny.model, ctx_kv, n, prompts, 5, set())
        for i, prompt in enumerate(prompts):
            alone, alone_lp = compiler.batched_greedy(tiny.model, ctx_kv, n, [prompt], 5, set())
            assert alone[0] == batch[i]
            torch.testing.assert_close(alone_lp[0], batch_lp[i], rtol=1e-4, atol=1e-4)


def test_kl_about_share_draws_document_referring_instructions(tiny):
    from lcc_cli.prompts import generic_instructions

    _, about = generic_instructions()
    p = Prompter(tiny.tokenizer)
    ctx_kv, _ = kvcache.prefill(tiny.model, p.context_ids(DOC))
    about_ids = {tuple(p.query_ids(q)) for q in about}
    targets = compiler.make_teacher_targets(tiny, DOC, ctx_kv, fast_config(kl_pool=6, kl_about_share=1.0))
    assert len(targets.prompts) == 6 and all(tuple(q) in about_ids for q in targets.prompts)
    mixed = compiler.make_teacher_targets(tiny, DOC, ctx_kv, fast_config(kl_pool=6, kl_about_share=0.5))
    assert sum(tuple(q) in about_ids for q in mixed.prompts) == 3


def test_cloze_items_cue_a_sentence_start_and_target_its_continuation(tiny):
    p = Prompter(tiny.tokenizer)
    items = compiler.cloze_items(p, DOC, seed=0)
    assert items
    for prompt, target in items:
        cue = tiny.tokenizer.decode(prompt)
        rest = tiny.tokenizer.decode(target[:-1]).strip()
        assert "Continue this sentence" in cue and rest and rest.split()[-1].rstrip(".") in DOC

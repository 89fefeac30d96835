"""The method's guarantees: hard bottleneck, gradient isolation, RoPE positions, determinism."""

from __future__ import annotations

import torch

from conftest import DOC, fast_config, run_opts
from lcc_cli.compile import objective
from lcc_cli.compile.base import slot_count
from lcc_cli.compile.document import assemble
from lcc_cli.compile.optimise import optimise_segment
from lcc_cli.format.cartridge import from_bytes, load_cartridge, to_bytes
from lcc_cli.ingest import Document
from lcc_cli.runtime import cache as kvcache
from lcc_cli.runtime.decode import decode


def _doc(text=DOC):
    return Document(text=text, sha256="0" * 64, name="doc.txt")


def _reader_logits(loaded, buffer, first_position=None, question="Who built it?"):
    ids = loaded.prompter.query_ids(question)
    first = buffer.first_query_position if first_position is None else first_position
    with torch.no_grad():
        cache = kvcache.make_cache(buffer.cache_layers())
        return kvcache.forward(loaded.model, cache, first, input_ids=torch.tensor([ids]))[0]


def test_slot_count_is_ceil_of_tokens_over_ratio():
    assert slot_count(100, 16) == 7
    assert slot_count(16, 16) == 1


def test_base_weights_bit_identical_and_no_lora_left(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    seg = optimise_segment(tiny, DOC, fast_config())
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in tiny.model.named_modules())
    assert seg.metrics["final_loss"] != seg.metrics["first_loss"]  # training did move something


def test_training_reader_sees_only_the_buffer(tiny, monkeypatch):
    """Structural bottleneck: every reader cache built during compile holds K positions, and
    the question sits one past the buffer, as it does at ask time."""
    lengths, positions = [], []
    real = objective.reader_logits

    def spy(model, buf_kv, first_position, rows, keep_from=0):
        lengths.append(buf_kv[0][0].shape[-2])
        positions.append(first_position)
        return real(model, buf_kv, first_position, rows, keep_from)

    monkeypatch.setattr(objective, "reader_logits", spy)
    seg = optimise_segment(tiny, DOC, fast_config())
    assert lengths and set(lengths) == {seg.buffer.slots}
    assert seg.buffer.slots < seg.token_count
    cart = assemble(tiny, _doc(), [seg], fast_config(), {"name": "optimise"})
    # Training keeps the buffer at n..n+K-1; the cartridge stores it moved to 0..K-1. Either
    # way the question starts right after the last buffer position.
    assert set(positions) == {seg.token_count + cart.buffer.first_query_position}
    assert cart.buffer.positions.tolist() == list(range(seg.buffer.slots))


def test_reader_output_independent_of_source_text(compiled, tiny_model_dir, monkeypatch):
    """With a fixed cartridge the answer cannot depend on the document: rewriting the source
    file changes nothing, and the reader's cache holds exactly the buffer."""
    from lcc_cli import api
    from lcc_cli.runtime import decode as decode_module

    path, src = compiled
    lengths = []
    real = decode_module.make_cache
    monkeypatch.setattr(decode_module, "make_cache",
                        lambda kv, batch=1: lengths.append(kv[0][0].shape[-2]) or real(kv, batch))
    (a,) = api.ask(["Who built it?"], [path], run=run_opts(tiny_model_dir))
    original = src.read_text()
    try:
        src.write_text("Something else entirely: the moon is made of basalt and was never built.")
        (b,) = api.ask(["Who built it?"], [path], run=run_opts(tiny_model_dir))
    finally:
        src.write_text(original)
    assert a.text == b.text
    slots = load_cartridge(path).slots
    assert lengths == [slots, slots] and a.kv_positions == slots


def test_cartridge_round_trip_reproduces_compile_time_logits(tiny):
    seg = optimise_segment(tiny, DOC, fast_config())
    live = _reader_logits(tiny, seg.buffer)
    cart = from_bytes(to_bytes(assemble(tiny, _doc(), [seg], fast_config(), {"name": "optimise"})))
    assert cart.buffer.first_query_position == seg.buffer.first_query_position == seg.buffer.slots
    loaded = _reader_logits(tiny, cart.buffer)
    torch.testing.assert_close(loaded, live, rtol=0, atol=0)
    # The test is sensitive to positions: a query one position off reads differently.
    shifted = _reader_logits(tiny, cart.buffer, cart.buffer.first_query_position + 1)
    assert not torch.allclose(shifted, live)


def test_normalising_positions_keeps_the_logits(tiny):
    """The buffer is trained at n..n+K-1 and stored at 0..K-1: RoPE depends only on the
    query-key distance, so moving both by n leaves the reader's logits unchanged."""
    seg = optimise_segment(tiny, DOC, fast_config())
    at_n = seg.buffer.moved(tiny.rope, seg.token_count)
    assert at_n.positions[0] == seg.token_count
    torch.testing.assert_close(_reader_logits(tiny, at_n), _reader_logits(tiny, seg.buffer), rtol=1e-4, atol=1e-4)


def test_compile_is_deterministic_for_a_seed(tiny):
    a = optimise_segment(tiny, DOC, fast_config(seed=3)).buffer
    b = optimise_segment(tiny, DOC, fast_config(seed=3)).buffer
    c = optimise_segment(tiny, DOC, fast_config(seed=4)).buffer
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))
    assert not torch.equal(a.keys[0], c.keys[0])


def test_reconstruction_loss_falls_with_training(tiny):
    seg = optimise_segment(tiny, DOC, fast_config(steps=30, kl_weight=0.0, lr=5e-2, ratio=2))
    # A random tiny model cannot recite much, but gradients must reach the buffer and move it.
    assert seg.metrics["final_recon"] < seg.metrics["first_recon"] - 0.1


def test_plain_teacher_uses_only_context_free_instructions(tiny):
    from lcc_cli.runtime.prompts import generic_instructions

    agnostic, about = generic_instructions()
    assert len(agnostic) + len(about) >= 100
    ctx_kv, _ = kvcache.prefill(tiny.model, tiny.prompter.context_ids(DOC))
    targets = objective.make_teacher_targets(tiny, ctx_kv, fast_config(teacher="plain", kl_pool=50))
    about_ids = {tuple(tiny.prompter.query_ids(q)) for q in about}
    assert targets.prompts and not any(tuple(p) in about_ids for p in targets.prompts)
    assert all(lp.shape == (len(r), tiny.model.config.vocab_size) for r, lp in zip(targets.responses, targets.logprobs))


def test_batched_teacher_matches_one_at_a_time(tiny):
    """Left-padded batched decoding must give each row the same tokens as decoding it alone."""
    p = tiny.prompter
    ctx_kv, _ = kvcache.prefill(tiny.model, p.context_ids(DOC))
    n = len(p.context_ids(DOC))
    prompts = [p.query_ids("Name three colours."), p.query_ids("Summarise the document in one sentence please.")]
    with torch.no_grad():
        batch = decode(tiny.model, ctx_kv, n, prompts, 5, set(), keep_logprobs=True)
        for i, prompt in enumerate(prompts):
            (alone,) = decode(tiny.model, ctx_kv, n, [prompt], 5, set(), keep_logprobs=True)
            assert alone.tokens == batch[i].tokens
            torch.testing.assert_close(alone.logprobs, batch[i].logprobs, rtol=1e-4, atol=1e-4)


def test_kl_about_share_draws_document_referring_instructions(tiny):
    from lcc_cli.runtime.prompts import generic_instructions

    _, about = generic_instructions()
    p = tiny.prompter
    ctx_kv, _ = kvcache.prefill(tiny.model, p.context_ids(DOC))
    about_ids = {tuple(p.query_ids(q)) for q in about}
    targets = objective.make_teacher_targets(tiny, ctx_kv, fast_config(kl_pool=6, kl_about_share=1.0))
    assert len(targets.prompts) == 6 and all(tuple(q) in about_ids for q in targets.prompts)
    mixed = objective.make_teacher_targets(tiny, ctx_kv, fast_config(kl_pool=6, kl_about_share=0.5))
    assert sum(tuple(q) in about_ids for q in mixed.prompts) == 3


def test_cloze_items_cue_a_sentence_start_and_target_its_continuation(tiny):
    items = objective.cloze_items(tiny.prompter, DOC, seed=0)
    assert items
    for prompt, target in items:
        cue = tiny.tokenizer.decode(prompt)
        rest = tiny.tokenizer.decode(target[:-1]).strip()
        assert "Continue this sentence" in cue and rest and rest.split()[-1].rstrip(".") in DOC

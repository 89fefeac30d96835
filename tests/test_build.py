"""The one compile path: long documents, interrupt and resume, executors, plug-in compilers."""

from __future__ import annotations

import pytest
import torch

from conftest import fast_config, run_opts
from lcc_cli import api
from lcc_cli.compile import optimise
from lcc_cli.format.cartridge import load_cartridge, partial_path
from lcc_cli.errors import CartridgeError, Interrupted, OutputExistsError, UsageError
from lcc_cli.progress import Progress

LONG = "\n\n".join(
    f"Paragraph {i}: the tower number {i} was painted red in 18{i}0 by the engineer Ada. It is {i}1 metres tall."
    for i in range(3))


def cfg():
    return fast_config(segment_tokens=80, ratio=4, steps=2)


@pytest.fixture
def long_doc(tmp_path):
    p = tmp_path / "long.txt"
    p.write_text(LONG)
    return p


class StopAt(Progress):
    """A progress sink that presses Ctrl-C when segment `index` starts compiling."""

    def __init__(self, index):
        self.index, self.started = index, 0

    def start(self, task, total, label=""):
        if task == "steps":
            if self.started == self.index:
                raise KeyboardInterrupt
            self.started += 1


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.buffer.keys + a.buffer.values, b.buffer.keys + b.buffer.values))


def test_long_document_becomes_one_multi_segment_cartridge(long_doc, tmp_path, tiny_model_dir):
    out = tmp_path / "long.lcc"
    result = api.compile_file(long_doc, out, cfg(), run=run_opts(tiny_model_dir))
    cart = load_cartridge(out)
    segs = cart.manifest["buffer"]["segments"]
    assert result.segments == len(segs) == 3
    assert [s["index"] for s in segs] == [0, 1, 2]
    assert cart.slots == sum(s["slots"] for s in segs)
    # consecutive layout: each buffer follows the previous one; the question follows the last
    assert [s["position_start"] for s in segs] == [0, segs[0]["slots"], segs[0]["slots"] + segs[1]["slots"]]
    assert cart.buffer.positions.tolist() == list(range(cart.slots))
    assert cart.buffer.first_query_position == cart.slots
    assert not partial_path(out).exists()


def test_interrupt_keeps_finished_segments_and_resume_finishes(long_doc, tmp_path, tiny_model_dir, monkeypatch):
    reference = tmp_path / "ref.lcc"
    api.compile_file(long_doc, reference, cfg(), compiler="none", run=run_opts(tiny_model_dir))

    out = tmp_path / "out.lcc"
    with pytest.raises(Interrupted, match="kept in"):
        api.compile_file(long_doc, out, cfg(), compiler="none", run=run_opts(tiny_model_dir), progress=StopAt(2))
    partial = partial_path(out)
    assert not out.exists() and partial.exists()
    with pytest.raises(CartridgeError, match="unfinished"):
        load_cartridge(partial)
    assert len(load_cartridge(partial, allow_partial=True).manifest["buffer"]["segments"]) == 2
    with pytest.raises(OutputExistsError, match="unfinished compile"):
        api.compile_file(long_doc, out, cfg(), compiler="none", run=run_opts(tiny_model_dir))

    compiled = []
    real = optimise.optimise_segment
    monkeypatch.setattr(optimise, "optimise_segment", lambda *a, **k: compiled.append(1) or real(*a, **k))
    api.compile_file(long_doc, out, cfg(), compiler="none", run=run_opts(tiny_model_dir), resume=True)
    assert len(compiled) == 1  # only the missing segment
    assert not partial.exists()
    assert same(load_cartridge(out), load_cartridge(reference))


def test_resume_refuses_a_partial_from_other_settings(long_doc, tmp_path, tiny_model_dir):
    out = tmp_path / "out.lcc"
    with pytest.raises(Interrupted):
        api.compile_file(long_doc, out, cfg(), run=run_opts(tiny_model_dir), progress=StopAt(1))
    with pytest.raises(UsageError, match="different settings"):
        api.compile_file(long_doc, out, fast_config(segment_tokens=80, ratio=4, steps=3),
                         run=run_opts(tiny_model_dir), resume=True)


def test_force_discards_a_stale_partial(long_doc, tmp_path, tiny_model_dir):
    out = tmp_path / "out.lcc"
    with pytest.raises(Interrupted):
        api.compile_file(long_doc, out, cfg(), run=run_opts(tiny_model_dir), progress=StopAt(1))
    assert partial_path(out).exists()
    with pytest.raises(Interrupted) as info:  # interrupted before any segment of the new run
        api.compile_file(long_doc, out, cfg(), run=run_opts(tiny_model_dir), force=True, progress=StopAt(0))
    assert "kept" not in info.value.message and not partial_path(out).exists()


def test_in_process_and_worker_process_executors_give_the_same_cartridge(long_doc, tmp_path, tiny_model_dir):
    """The same compile through both executors. Floating-point sums depend on the thread
    count, so both sides run one math thread: then the results are bit-identical."""
    one, two = tmp_path / "one.lcc", tmp_path / "two.lcc"
    threads = torch.get_num_threads()
    try:
        api.compile_file(long_doc, one, cfg(), run=run_opts(tiny_model_dir, threads=1))
        api.compile_file(long_doc, two, cfg(), run=run_opts(tiny_model_dir, workers=2, threads=1))
    finally:
        torch.set_num_threads(threads)
    a, b = load_cartridge(one), load_cartridge(two)
    assert a.manifest["buffer"] == b.manifest["buffer"]
    assert same(a, b)


def test_a_new_compiler_plugs_in_without_touching_the_compile_path(long_doc, tmp_path, tiny_model_dir):
    """A stub method registered by name: no optimisation, just the first K context tokens'
    KV. The compile path, the format and the reader take it as they take any other."""
    from lcc_cli.buffer import Buffer
    from lcc_cli.compile.base import CompilerSpec, SegmentResult, register, slot_count
    from lcc_cli.runtime.cache import prefill

    class FirstTokens:
        name = "first-tokens"

        def __init__(self, loaded):
            self.loaded = loaded

        def describe(self):
            return {"name": self.name}

        def compile(self, segment, cfg, progress):
            ids = self.loaded.prompter.context_ids(segment.text)
            k = slot_count(len(ids), cfg.ratio)
            with torch.no_grad():
                kv, _ = prefill(self.loaded.model, ids[:k])
            return SegmentResult(Buffer.from_cache_layers(kv, range(k)), len(ids), {"seconds": 0.0})

    register("first-tokens")(lambda spec, loaded: FirstTokens(loaded))
    out = tmp_path / "stub.lcc"
    result = api.compile_file(long_doc, out, cfg(), compiler=CompilerSpec("first-tokens"), run=run_opts(tiny_model_dir))
    cart = load_cartridge(out)
    assert cart.manifest["compiler"] == {"name": "first-tokens"} and result.segments == 3
    assert cart.slots == sum(-(-s["token_count"] // 4) for s in cart.segments)
    (answer,) = api.ask(["Who painted it?"], [out], run=run_opts(tiny_model_dir))
    assert answer.kv_positions == cart.slots

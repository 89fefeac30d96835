"""Long documents: segments, one cartridge, interrupt and resume, worker processes."""

from __future__ import annotations

import pytest
import torch

from conftest import fast_config
from lcc_cli import build, engine
from lcc_cli.cartridge import load_cartridge
from lcc_cli.errors import CartridgeError, Interrupted, OutputExistsError

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


class StopAt:
    """A progress sink that presses Ctrl-C when segment `index` starts."""

    def __init__(self, index):
        self.index = index

    def status(self, text):
        pass

    def segment(self, index, total, tokens, steps):
        if index == self.index:
            raise KeyboardInterrupt

    def step(self, *a):
        pass


def test_long_document_becomes_one_multi_segment_cartridge(long_doc, tmp_path, tiny_model_dir):
    out = tmp_path / "long.lcc"
    result = engine.compile_file(long_doc, out, cfg(), model=str(tiny_model_dir))
    cart = load_cartridge(out)
    segs = cart.manifest["buffer"]["segments"]
    assert result["segments"] == len(segs) == 3
    assert [s["index"] for s in segs] == [0, 1, 2]
    assert cart.slots == sum(s["slots"] for s in segs)
    assert cart.first_query_position == max(s["position_start"] + s["slots"] for s in segs)
    assert not build.partial_path(out).exists()


def test_interrupt_keeps_finished_segments_and_resume_finishes(long_doc, tmp_path, tiny_model_dir, monkeypatch):
    reference = tmp_path / "ref.lcc"
    engine.compile_file(long_doc, reference, cfg(), model=str(tiny_model_dir))

    out = tmp_path / "out.lcc"
    with pytest.raises(Interrupted, match="kept in"):
        engine.compile_file(long_doc, out, cfg(), model=str(tiny_model_dir), progress=StopAt(2))
    partial = build.partial_path(out)
    assert not out.exists() and partial.exists()
    with pytest.raises(CartridgeError, match="unfinished"):
        load_cartridge(partial)
    assert len(load_cartridge(partial, allow_partial=True).manifest["buffer"]["segments"]) == 2
    with pytest.raises(OutputExistsError, match="unfinished compile"):
        engine.compile_file(long_doc, out, cfg(), model=str(tiny_model_dir))

    compiled = []
    real = build.compile_segment
    monkeypatch.setattr(build, "compile_segment", lambda *a, **k: compiled.append(1) or real(*a, **k))
    engine.compile_file(long_doc, out, cfg(), model=str(tiny_model_dir), resume=True)
    assert len(compiled) == 1  # only the missing segment
    assert not partial.exists()
    a, b = load_cartridge(out), load_cartridge(reference)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a.kv, b.kv))


def test_resume_refuses_a_partial_from_other_settings(long_doc, tmp_path, tiny_model_dir):
    out = tmp_path / "out.lcc"
    with pytest.raises(Interrupted):
        engine.compile_file(long_doc, out, cfg(), model=str(tiny_model_dir), progress=StopAt(1))
    from lcc_cli.errors import UsageError

    with pytest.raises(UsageError, match="different settings"):
        engine.compile_file(long_doc, out, fast_config(segment_tokens=80, ratio=4, steps=3),
                            model=str(tiny_model_dir), resume=True)


def test_force_discards_a_stale_partial(long_doc, tmp_path, tiny_model_dir):
    out = tmp_path / "out.lcc"
    with pytest.raises(Interrupted):
        engine.compile_file(long_doc, out, cfg(), model=str(tiny_model_dir), progress=StopAt(1))
    assert build.partial_path(out).exists()
    with pytest.raises(Interrupted) as info:  # interrupted before any segment of the new run
        engine.compile_file(long_doc, out, cfg(), model=str(tiny_model_dir), force=True, progress=StopAt(0))
    assert "kept" not in info.value.message and not build.partial_path(out).exists()


def test_two_workers_give_the_same_cartridge(long_doc, tmp_path, tiny_model_dir):
    one, two = tmp_path / "one.lcc", tmp_path / "two.lcc"
    engine.compile_file(long_doc, one, cfg(), model=str(tiny_model_dir))
    engine.compile_file(long_doc, two, cfg(), model=str(tiny_model_dir), workers=2)
    a, b = load_cartridge(one), load_cartridge(two)
    assert a.manifest["buffer"] == b.manifest["buffer"]
    assert all(torch.allclose(x[0], y[0], atol=1e-5) for x, y in zip(a.kv, b.kv))

"""Attention biases on buffer entries: read through transformers' AttentionInterface, kept by
every buffer operation, stored and checked by the format, refused by PEFT export."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import DOC, run_opts
from lcc_cli import api
from lcc_cli.buffer import Buffer
from lcc_cli.cli import app
from lcc_cli.format.cartridge import Cartridge, load_cartridge, save_cartridge
from test_hardening import resign


def _logits(loaded, buffer: Buffer, prompt: list[int]) -> torch.Tensor:
    from lcc_cli.runtime.bias import slot_biases
    from lcc_cli.runtime.cache import forward, make_cache

    with torch.no_grad(), slot_biases(loaded.model, buffer.bias):
        return forward(loaded.model, make_cache(buffer.cache_layers()), buffer.first_query_position,
                       input_ids=torch.tensor([prompt]))[0]


def _buffer(loaded, text: str = DOC) -> Buffer:
    from lcc_cli.runtime.cache import prefill

    ids = loaded.prompter.context_ids(text)[:12]
    layers, _ = prefill(loaded.model, ids)
    return Buffer.from_cache_layers(layers, range(len(ids)))


def test_a_bias_of_log_2_reads_like_the_entry_twice(tiny_loaded):
    """exp(s + log 2) = 2 exp(s): biasing entry j by log 2 must equal keeping two copies of
    it, in every layer, for every query head that shares the KV head."""
    buf = _buffer(tiny_loaded)
    j, layers = 5, len(buf.keys)
    bias = [torch.zeros(buf.keys[0].shape[:2]) for _ in range(layers)]
    for b in bias:
        b[:, j] = math.log(2)
    twice = Buffer([torch.cat([k, k[:, j:j + 1]], dim=1) for k in buf.keys],
                   [torch.cat([v, v[:, j:j + 1]], dim=1) for v in buf.values],
                   torch.cat([buf.positions, buf.positions[j:j + 1]]))
    prompt = tiny_loaded.prompter.query_ids("Who designed the lighthouse?")
    biased = _logits(tiny_loaded, Buffer(buf.keys, buf.values, buf.positions, bias), prompt)
    assert torch.allclose(biased, _logits(tiny_loaded, twice, prompt), atol=1e-4)
    plain = _logits(tiny_loaded, buf, prompt)
    assert not torch.allclose(biased, plain, atol=1e-3)
    zero = Buffer(buf.keys, buf.values, buf.positions, [torch.zeros_like(b) for b in bias])
    assert torch.allclose(_logits(tiny_loaded, zero, prompt), plain, atol=1e-5)


def test_buffer_operations_keep_the_bias(tiny_loaded):
    buf = _buffer(tiny_loaded)
    bias = [torch.randn(buf.keys[0].shape[:2]) for _ in buf.keys]
    b = Buffer(buf.keys, buf.values, buf.positions, bias)
    assert torch.equal(b.select(2, 7).bias[1], bias[1][:, 2:7])
    assert b.moved(tiny_loaded.rope, 3).bias is bias
    assert b.to(dtype=torch.bfloat16).bias[0].dtype == torch.float32
    both = Buffer.concat([buf, b])  # a part without biases gets zeros
    assert torch.equal(both.bias[0][:, :buf.slots], torch.zeros_like(bias[0])) and torch.equal(
        both.bias[0][:, buf.slots:], bias[0])
    assert Buffer.concat([buf, buf]).bias is None


@pytest.fixture(scope="module")
def biased(tmp_path_factory, tiny_model_dir):
    """An `am` cartridge with NNLS biases."""
    d = tmp_path_factory.mktemp("biased")
    (d / "doc.txt").write_text(DOC)
    api.compile_file(d / "doc.txt", d / "b.lcc", {"ratio": 4.0, "bias": True}, compiler="am",
                     run=run_opts(tiny_model_dir))
    return d / "b.lcc"


def test_am_fits_biases_that_the_file_keeps_and_the_reader_uses(biased, tiny_model_dir, tmp_path):
    cart = load_cartridge(biased)
    assert cart.manifest["buffer"]["bias"] is True and cart.manifest["compile"]["bias"] is True
    bias = cart.buffer.bias
    assert len(bias) == len(cart.buffer.keys) and bias[0].shape == cart.buffer.keys[0].shape[:2]
    assert all(torch.isfinite(b).all() and b.abs().max() <= 30 for b in bias)
    assert any(b.abs().max() > 1e-3 for b in bias)  # the fit moved them
    fit = cart.manifest["metrics"]["segments"][0]
    assert fit["bias_max"] == pytest.approx(max(float(b.max()) for b in bias), abs=1e-3)
    # the same buffer without its biases answers differently: the reader does read them
    save_cartridge(Cartridge({**cart.manifest, "buffer": {**cart.manifest["buffer"]}}, cart.buffer.without_bias()),
                   tmp_path / "plain.lcc")
    assert "bias" not in load_cartridge(tmp_path / "plain.lcc").manifest["buffer"]
    from lcc_cli.runtime.model import load_model

    loaded = load_model(str(tiny_model_dir))
    prompt = loaded.prompter.query_ids("Who designed the lighthouse?")
    assert not torch.allclose(_logits(loaded, cart.buffer, prompt), _logits(loaded, cart.buffer.without_bias(),
                                                                             prompt), atol=1e-4)
    r = CliRunner().invoke(app, ["verify", str(biased), "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.stdout + r.stderr


@pytest.mark.parametrize("bad", [float("nan"), 1e3])
def test_a_doctored_bias_is_refused(biased, tmp_path, tiny_model_dir, bad):
    def poison(tensors):
        tensors["b"] = tensors["b"].clone()
        tensors["b"][1, 0, 0] = bad  # entry 1, layer 0, KV head 0
        return tensors

    out = resign(biased, tmp_path / "bad.lcc", tensors=poison)
    r = CliRunner().invoke(app, ["verify", str(out), "--model", str(tiny_model_dir)])
    assert r.exit_code == 7 and ("NaN" in r.stdout + r.stderr or "bias" in r.stdout + r.stderr)
    r = CliRunner().invoke(app, ["ask", str(out), "Who?", "--model", str(tiny_model_dir)])
    assert r.exit_code == 5


def test_a_bias_tensor_missing_or_unannounced_is_refused(biased, tmp_path):
    from lcc_cli.errors import CartridgeError

    dropped = resign(biased, tmp_path / "a.lcc", tensors=lambda t: {k: v for k, v in t.items() if k != "b"})
    with pytest.raises(CartridgeError, match="tensor b is missing"):
        load_cartridge(dropped)
    unannounced = resign(biased, tmp_path / "b.lcc", edit=lambda m: m["buffer"].pop("bias"))
    with pytest.raises(CartridgeError, match="tensors"):
        load_cartridge(unannounced)


def test_export_refuses_biases_unless_asked_to_drop_them(biased, tmp_path, tiny_model_dir):
    r = CliRunner().invoke(app, ["export", str(biased), str(tmp_path / "peft")])
    assert r.exit_code == 2 and "--drop-bias" in r.stderr and not (tmp_path / "peft").exists()
    r = CliRunner().invoke(app, ["export", str(biased), str(tmp_path / "peft"), "--drop-bias"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, ["import", str(tmp_path / "peft"), "-o", str(tmp_path / "back.lcc"),
                                 "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.stderr
    back = load_cartridge(tmp_path / "back.lcc")
    assert back.buffer.bias is None and torch.allclose(back.buffer.keys[0].float(),
                                                       load_cartridge(biased).buffer.keys[0].float())


def test_refinement_learns_biases(tiny):
    from lcc_cli.compile.base import CompilerSpec, build_compiler
    from lcc_cli.compile.choice import compile_config
    from lcc_cli.ingest import TextSegment

    compiler = build_compiler(CompilerSpec("truncate"), tiny)
    cfg = compile_config("truncate", "fast", ratio=4.0, steps=6, bias=True, kl_pool=4, kl_per_step=2,
                         response_tokens=8)
    out = compiler.compile(TextSegment(0, DOC), cfg)
    assert out.buffer.bias is not None and any(b.abs().max() > 0 for b in out.buffer.bias)
    assert all(float(b[:, 0].abs().max()) == 0.0 for b in out.buffer.bias)  # the sink's stays as it was
    assert out.metrics["final_recon"] < out.metrics["first_recon"]  # the one item every step reads


def test_nested_bias_contexts_restore_the_outer_biases(tiny_loaded):
    from lcc_cli.runtime.bias import _ATTR, _attention_modules, slot_biases

    buf = _buffer(tiny_loaded)
    outer = [torch.ones(buf.keys[0].shape[:2]) for _ in buf.keys]
    inner = [torch.zeros(buf.keys[0].shape[:2]) for _ in buf.keys]
    modules = _attention_modules(tiny_loaded.model)
    with slot_biases(tiny_loaded.model, outer):
        with slot_biases(tiny_loaded.model, inner):
            assert getattr(modules[0], _ATTR) is inner[0]
        assert getattr(modules[0], _ATTR) is outer[0]
    assert not any(hasattr(m, _ATTR) for m in modules)


def test_a_model_that_cannot_read_biases_is_refused_before_any_work(tmp_path, doc_file, tiny_model_dir, monkeypatch):
    """am --bias on a model whose attention is not lcc's SDPA: refused before compiling, not
    written as a cartridge the model cannot read."""
    from lcc_cli.runtime import model as model_mod

    monkeypatch.setattr(model_mod, "install_bias_attention", lambda net: net.set_attn_implementation("eager"))
    r = CliRunner().invoke(app, ["compile", str(doc_file), "-o", str(tmp_path / "a.lcc"), "--compiler", "am",
                                 "--bias", "--model", str(tiny_model_dir)])
    assert r.exit_code == 6 and "SDPA" in r.stderr and not (tmp_path / "a.lcc").exists(), r.stderr

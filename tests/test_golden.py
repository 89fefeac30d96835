"""The golden cartridges under tests/fixtures/ (scripts/make_golden.py). Never edited: a
format change adds a new golden file and a migration, and these must keep passing."""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _logits(loaded, buffer, question="Who built it?"):
    from lcc_cli.runtime.cache import forward, make_cache

    ids = loaded.prompter.query_ids(question)
    with torch.no_grad():
        return forward(loaded.model, make_cache(buffer.cache_layers()), buffer.first_query_position,
                       input_ids=torch.tensor([ids]))[0]


def test_golden_v1_loads_converted_and_reads_the_same(tiny):
    from safetensors.torch import load_file

    from lcc_cli.buffer import Buffer
    from lcc_cli.format.cartridge import load_cartridge

    path = FIXTURES / "golden-v1.lcc"
    cart = load_cartridge(path)
    m = cart.manifest
    assert m["converted_from"] == 1 and m["format_version"] == 2
    assert m["tensor_sha256"] == "ad2995512443dfe1b2be32db18c55691dd691dd2e3115ebf1e0e95ca9ff4facf"
    assert m["model"]["fingerprint"] == tiny.fingerprint
    assert cart.slots == 12 and cart.buffer.positions.tolist() == list(range(12))
    # v1 stored the keys at positions 89..100 (after the 89-token context) and asked at 101.
    raw = load_file(str(path))
    v1 = Buffer([raw[f"k.{i}"] for i in range(2)], [raw[f"v.{i}"] for i in range(2)], torch.arange(89, 101))
    torch.testing.assert_close(_logits(tiny, cart.buffer), _logits(tiny, v1), rtol=1e-4, atol=1e-4)


def test_golden_v2_loads_and_reads_as_its_own_tensors_say(tiny):
    """golden-v2.lcc (four segments, written by the last lcc that wrote v2): read whole, its
    buffer is exactly the file's k.{i} / v.{i} at positions 0..61, and it re-saves as v3
    with the same keys and values."""
    from safetensors.torch import load_file

    from lcc_cli.format.cartridge import from_bytes, load_cartridge, to_bytes

    path = FIXTURES / "golden-v2.lcc"
    cart = load_cartridge(path)
    m = cart.manifest
    assert m["format_version"] == 2 and m["tensor_sha256"].startswith("fc79d784d39a2d8f")
    assert m["model"]["fingerprint"] == tiny.fingerprint
    assert [s["position_start"] for s in cart.segments] == [0, 14, 31, 45]
    assert cart.buffer.positions.tolist() == list(range(62)) and cart.buffer.first_query_position == 62
    raw = load_file(str(path))
    assert all(torch.equal(cart.buffer.keys[i], raw[f"k.{i}"]) and torch.equal(cart.buffer.values[i], raw[f"v.{i}"])
               for i in range(2))
    again = from_bytes(to_bytes(cart))
    assert again.manifest["format_version"] == 3
    assert all(torch.equal(a, b) for a, b in zip(again.buffer.keys + again.buffer.values,
                                                 cart.buffer.keys + cart.buffer.values))
    torch.testing.assert_close(_logits(tiny, again.buffer), _logits(tiny, cart.buffer), rtol=0, atol=0)

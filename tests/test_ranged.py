"""Format v3: ranged reads by entry, one checksum per block, and the storage kinds."""

from __future__ import annotations

import pytest
import torch

from lcc_cli.buffer import Buffer
from lcc_cli.errors import CartridgeError
from lcc_cli.format import cartridge as fmt
from lcc_cli.format import manifest as mf
from lcc_cli.format import storage as st

LAYERS, HEADS, DIM, ENTRIES, BLOCK = 2, 2, 16, 1000, 64


def _large(tmp_path, storage: str = "float32"):
    """A 1,000-entry cartridge (16 blocks) for the tiny model's shapes, written as lcc writes one."""
    torch.manual_seed(0)
    keys = [torch.randn(HEADS, ENTRIES, DIM) for _ in range(LAYERS)]
    values = [torch.randn(HEADS, ENTRIES, DIM) for _ in range(LAYERS)]
    model = {"id": "tiny", "fingerprint": "0" * 64, "num_layers": LAYERS, "num_kv_heads": HEADS, "head_dim": DIM,
             "hidden_size": 64, "max_positions": 4096, "rope": {"rope_type": "default", "rope_theta": 10000.0},
             "dtype": "float32"}
    m = mf.build(model=model, segments=[{"index": 0, "slots": ENTRIES, "token_count": ENTRIES * 4, "sink": False}],
                 source={"name": "big.txt", "sha256": "0" * 64, "token_count": ENTRIES * 4, "ratio": 4.0},
                 compile={}, compiler={"name": "test"}, metrics={}, version="test", storage_dtype=storage, block=BLOCK)
    path = tmp_path / "big.lcc"
    path.write_bytes(fmt.to_bytes(fmt.Cartridge(m, Buffer(keys, values, torch.arange(ENTRIES))), storage))
    return path, keys, values


def test_entries_10_to_20_read_one_block_and_nothing_else(tmp_path):
    path, keys, values = _large(tmp_path)
    f = fmt.open_cartridge(path)
    opened = f.raw.bytes_read  # the block table, read once at open
    part = f.read(10, 20)
    assert part.positions.tolist() == list(range(10, 20))
    assert all(torch.equal(a, k[:, 10:20]) for a, k in zip(part.keys, keys))
    assert all(torch.equal(a, v[:, 10:20]) for a, v in zip(part.values, values))
    per_entry = 2 * LAYERS * HEADS * DIM * 4
    assert f.raw.bytes_read - opened == BLOCK * per_entry  # block 0 alone: 64 of 1,000 entries
    assert path.stat().st_size > 15 * BLOCK * per_entry


def test_a_corrupted_block_outside_the_range_is_not_read_but_verify_finds_it(tmp_path, capsys):
    from typer.testing import CliRunner

    from lcc_cli.cli import app

    path, keys, _ = _large(tmp_path)
    f = fmt.open_cartridge(path)
    entry = f.raw.header["k"]
    row = (entry["data_offsets"][1] - entry["data_offsets"][0]) // ENTRIES
    data = bytearray(path.read_bytes())
    at = f.raw.body_start + entry["data_offsets"][0] + (5 * BLOCK + 3) * row  # entry 323: block 5
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    f = fmt.open_cartridge(path)
    assert torch.equal(f.read(10, 20).keys[0], keys[0][:, 10:20])  # the damage is elsewhere: never read
    with pytest.raises(CartridgeError, match="block 5"):
        f.read(5 * BLOCK, 5 * BLOCK + 4)
    with pytest.raises(CartridgeError, match="block 5"):
        fmt.load_cartridge(path)
    result = CliRunner().invoke(app, ["verify", str(path), "--no-model"])
    assert result.exit_code == 7 and "block 5" in result.stdout


@pytest.mark.parametrize("storage,bound", [("float32", 0.0), ("bfloat16", 0.01), ("int8", 0.01), ("int4", 0.1)])
def test_each_storage_kind_round_trips_within_its_precision(tmp_path, storage, bound):
    path, keys, values = _large(tmp_path, storage)
    f = fmt.open_cartridge(path)
    whole = f.cartridge().buffer
    for got, want in zip(whole.keys + whole.values, keys + values):
        assert float((got - want).abs().max() / want.abs().max()) <= bound
    part = f.read(100, 230)  # across blocks 1..3: decoded exactly as the whole
    assert all(torch.equal(a, b[:, 100:230]) for a, b in zip(part.keys, whole.keys))
    assert all(torch.equal(a, b[:, 100:230]) for a, b in zip(part.values, whole.values))
    per_token = st.bytes_per_entry(storage, LAYERS, HEADS, DIM, BLOCK)
    assert path.stat().st_size < ENTRIES * per_token * 1.05 + 8192


def test_storage_sizes_for_the_embedded_model():
    """Bytes per entry at SmolLM2-135M's shapes (30 layers, 3 KV heads, head dim 64)."""
    sizes = {s: st.bytes_per_entry(s, 30, 3, 64, 64) for s in st.STORAGE}
    assert sizes["float32"] == 46_080 and sizes["bfloat16"] == 23_040
    assert sizes["int8"] == 11_880 and sizes["int4"] == 6_480

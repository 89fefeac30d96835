"""The .lcc format: round trip, atomic writes, and every kind of damage caught as CartridgeError."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from lcc_cli.format import cartridge as fmt
from lcc_cli.format import fsio
from lcc_cli.errors import CartridgeError, ModelMismatchError, OutputExistsError, UsageError


def test_round_trip_keeps_tensors_and_manifest(compiled):
    path, _ = compiled
    cart = fmt.load_cartridge(path)
    again = fmt.from_bytes(fmt.to_bytes(cart))
    assert again.manifest == cart.manifest
    assert all(torch.equal(a, b) for a, b in zip(cart.buffer.keys + cart.buffer.values,
                                                 again.buffer.keys + again.buffer.values))
    m = cart.manifest
    assert m["format"] == "lcc-cartridge" and m["format_version"] == 3
    assert m["buffer"]["first_query_position"] == m["buffer"]["segments"][0]["position_start"] + cart.slots
    assert len(m["model"]["fingerprint"]) == 64 and len(m["source"]["sha256"]) == 64
    for key in ("steps", "lr", "lora_rank", "seed", "teacher", "recon_weight", "kl_weight"):
        assert key in m["compile"]
    assert "final_recon" in m["metrics"]["segments"][0]


def test_no_pickle_in_the_file(compiled):
    data = compiled[0].read_bytes()
    assert b"\x80\x04" not in data[:16] and data[8:9] == b"{"  # safetensors: length + JSON header


def _damaged(path, tmp_path, mutate):
    data = bytearray(path.read_bytes())
    mutate(data)
    out = tmp_path / "bad.lcc"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("cut", [0, 4, 8, 100, -1000, -1])
def test_truncated_file_is_a_format_error(compiled, tmp_path, cut):
    data = compiled[0].read_bytes()
    bad = tmp_path / "cut.lcc"
    bad.write_bytes(data[:cut] if cut else b"")
    with pytest.raises(CartridgeError):
        fmt.load_cartridge(bad)


def test_flipped_tensor_byte_is_caught(compiled, tmp_path):
    bad = _damaged(compiled[0], tmp_path, lambda d: d.__setitem__(len(d) - 10, d[len(d) - 10] ^ 0xFF))
    with pytest.raises(CartridgeError, match="checksum"):
        fmt.load_cartridge(bad)


def _rewrite_manifest(path, tmp_path, edit):
    """Re-serialise with an edited manifest but the original checksum string."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(meta["lcc_manifest"])
    edit(manifest)
    meta["lcc_manifest"] = json.dumps(manifest, sort_keys=True)
    out = tmp_path / "edited.lcc"
    out.write_bytes(save(tensors, metadata=meta))
    return out


def test_edited_manifest_is_caught(compiled, tmp_path):
    bad = _rewrite_manifest(compiled[0], tmp_path, lambda m: m["source"].__setitem__("name", "other.txt"))
    with pytest.raises(CartridgeError, match="manifest checksum"):
        fmt.load_cartridge(bad)


def test_future_version_is_refused_with_upgrade_hint(compiled, tmp_path):
    bad = _rewrite_manifest(compiled[0], tmp_path, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(CartridgeError, match="version 99") as info:
        fmt.load_cartridge(bad)
    assert "upgrade" in info.value.hint


def test_safetensors_without_manifest_is_not_a_cartridge(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.lcc"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CartridgeError, match="not an lcc cartridge"):
        fmt.load_cartridge(path)


def test_huge_header_length_is_caught_without_allocating(tmp_path):
    path = tmp_path / "huge.lcc"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CartridgeError):
        fmt.load_cartridge(path)


def test_save_refuses_to_overwrite_without_force(compiled, tmp_path):
    cart = fmt.load_cartridge(compiled[0])
    target = tmp_path / "x.lcc"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExistsError):
        fmt.save_cartridge(cart, target)
    assert target.read_bytes() == b"precious"
    fmt.save_cartridge(cart, target, overwrite=True)
    assert fmt.load_cartridge(target).manifest == cart.manifest


def test_save_into_missing_directory_is_a_usage_error(compiled, tmp_path):
    cart = fmt.load_cartridge(compiled[0])
    with pytest.raises(UsageError, match="does not exist"):
        fmt.save_cartridge(cart, tmp_path / "nope" / "x.lcc")


def test_interrupted_write_leaves_no_file(compiled, tmp_path, monkeypatch):
    cart = fmt.load_cartridge(compiled[0])
    target = tmp_path / "x.lcc"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsio.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        fmt.save_cartridge(cart, target)
    assert list(tmp_path.iterdir()) == []


def test_wrong_model_is_refused_unless_forced(compiled, other_model_dir):
    from lcc_cli.format.checks import check_fingerprint
    from lcc_cli.runtime.model import load_model

    cart = fmt.load_cartridge(compiled[0])
    other = load_model(str(other_model_dir))
    with pytest.raises(ModelMismatchError, match=cart.fingerprint[:12]):
        check_fingerprint(cart.manifest["model"], other.model_id, other.fingerprint)
    check_fingerprint(cart.manifest["model"], other.model_id, other.fingerprint, force=True)


def test_combine_lays_cartridges_side_by_side(compiled):
    """Composition (consecutive layout): the second cartridge's buffer follows the first,
    re-rotated, and the question follows both."""
    from lcc_cli.runtime.memory import compose as combine

    cart = fmt.load_cartridge(compiled[0])
    short = fmt.Cartridge(cart.manifest, cart.buffer.select(0, 1))
    buffer = combine([short, cart])
    assert buffer.slots == cart.slots + 1
    assert buffer.positions.tolist() == list(range(cart.slots + 1)) and buffer.first_query_position == cart.slots + 1
    assert torch.equal(buffer.keys[0][:, :1], cart.buffer.keys[0][:, :1])  # the first keeps its place
    assert torch.equal(buffer.values[0][:, 1:], cart.buffer.values[0])  # values never move
    moved = cart.buffer.moved(cart.rope, 1)
    torch.testing.assert_close(buffer.keys[0][:, 1:], moved.keys[0])  # keys re-rotated by one position
    assert not torch.allclose(buffer.keys[0][:, 1:], cart.buffer.keys[0])
    overlap = combine([short, cart], layout="overlap")
    assert overlap.positions.tolist() == [0] + list(range(cart.slots))
    assert overlap.first_query_position == cart.slots

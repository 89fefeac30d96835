"""Fuzz the cartridge loader: no byte string may escape as anything but CartridgeError."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lcc_cli.format.cartridge import from_bytes
from lcc_cli.errors import CartridgeError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def _load(data: bytes) -> None:
    """The loader raises only CartridgeError, and verify (which checks stage by stage)
    reports failures without raising at all."""
    import tempfile
    from pathlib import Path

    from lcc_cli.verify import verify_file

    try:
        from_bytes(data)
    except CartridgeError:
        pass
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.lcc"
        path.write_bytes(data)
        report = verify_file(path)
        assert report.checks and all(c.ok in (True, False, None) for c in report.checks)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    _load(data)


@FUZZ
@given(st.data())
def test_mutated_real_cartridge(compiled, data):
    original = compiled[0].read_bytes()
    buf = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    _load(bytes(buf[:cut]))


@FUZZ
@given(st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8),
    max_size=5), st.binary(max_size=64))
def test_random_headers(header, body):
    raw = json.dumps(header).encode()
    _load(struct.pack("<Q", len(raw)) + raw + body)


@FUZZ
@given(st.dictionaries(st.text(max_size=12), st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12),
    max_size=8))
def test_random_manifests_in_a_valid_container(manifest):
    import torch
    from safetensors.torch import save

    for m in (manifest, {**manifest, "format": "lcc-cartridge", "format_version": 1},
              {**manifest, "format": "lcc-cartridge", "format_version": 2}):
        _load(save({"k.0": torch.zeros(1, 1, 2)}, metadata={"lcc_manifest": json.dumps(m), "lcc_checksum": "x"}))

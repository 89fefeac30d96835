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


VALUES = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True) \
    | st.text(max_size=12) | st.lists(st.integers(-3, 10**6), max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                          st.integers(), max_size=2)


def _paths(obj, prefix=()):
    """Every key path in a manifest (into dicts and lists)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _edited(manifest: dict, data, keep=lambda path: True) -> dict:
    """A copy of `manifest` with 1 to 3 of its fields (at any depth) set to arbitrary values or
    removed."""
    import copy

    edited = copy.deepcopy(manifest)
    paths = sorted((p for p in _paths(manifest) if keep(p)), key=str)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        target = edited
        try:
            for key in path[:-1]:
                target = target[key]
            if isinstance(target, dict) and not isinstance(path[-1], str):
                continue  # an earlier edit made a list a dict: JSON has no such key
            if data.draw(st.booleans()):
                target[path[-1]] = data.draw(VALUES)
            else:  # a field left out is as likely as a wrong one
                del target[path[-1]]
        except (KeyError, IndexError, TypeError):
            pass
    return edited


@FUZZ
@given(st.data())
def test_edited_and_re_signed_manifests_load_cleanly_or_fail_typed(compiled, data):
    """An attacker can edit any manifest field and recompute the (unkeyed) checksums: every
    result must be a clean load or a typed error, never a crash, a hang or a huge allocation."""

    from safetensors import safe_open
    from safetensors.torch import save

    from lcc_cli.errors import LccError
    from lcc_cli.format.cartridge import checksum, tensor_sha256

    with safe_open(str(compiled[0]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edited = _edited(json.loads(meta["lcc_manifest"]), data)
    edited["tensor_sha256"] = tensor_sha256(tensors)
    text = json.dumps(edited, sort_keys=True)
    blob = save(tensors, metadata={"lcc_manifest": text, "lcc_checksum": checksum(text, edited["tensor_sha256"])})
    try:
        from_bytes(blob)
    except LccError:
        pass
    _load(blob)


@FUZZ
@given(st.data())
def test_edited_and_re_signed_compiler_files_load_cleanly_or_fail_typed(trained_compiler_file, tmp_path_factory, data):
    """The same attacker on a compiler file: every edit, re-signed, loads cleanly or fails
    with CompilerFileError from load, inspect and the compiler's own checks, and what inspect
    accepts renders as `lcc inspect` prints it."""

    from safetensors import safe_open
    from safetensors.torch import save

    from lcc_cli.api import inspect
    from lcc_cli.cli.render import compiler_rows
    from lcc_cli.errors import LccError
    from lcc_cli.format.cartridge import checksum, tensor_sha256
    from lcc_cli.format.compiler_file import load_compiler

    with safe_open(str(trained_compiler_file), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edited = _edited(json.loads(meta["lcc_compiler"]), data,
                     keep=lambda p: p[0] != "training" or len(p) < 3)  # not deep into the history
    edited["tensor_sha256"] = tensor_sha256(tensors)
    text = json.dumps(edited, sort_keys=True)
    path = tmp_path_factory.mktemp("fuzz") / "c.safetensors"
    path.write_bytes(save(tensors, metadata={"lcc_compiler": text,
                                             "lcc_checksum": checksum(text, edited["tensor_sha256"])}))
    try:
        load_compiler(path)
    except LccError:
        pass
    try:
        info = inspect(path)
    except LccError:
        return
    list(compiler_rows(info))  # what `lcc inspect` prints must render from anything inspect accepts


@FUZZ
@given(st.dictionaries(st.sampled_from(["peft_type", "task_type", "num_virtual_tokens", "num_layers",
                                        "num_attention_heads", "token_dim", "num_frozen_tokens"]), VALUES,
                       max_size=7))
def test_random_adapter_configs_import_cleanly_or_fail_typed(tiny_loaded, compiled, tmp_path_factory, config):
    """An adapter directory with any config beside real weights: a typed error or a buffer."""
    import shutil

    from lcc_cli.errors import LccError
    from lcc_cli.export.peft import export_peft, read_peft
    from lcc_cli.format.cartridge import load_cartridge

    d = tmp_path_factory.mktemp("adapter")
    export_peft(load_cartridge(compiled[0]), d / "a")
    (d / "a" / "adapter_config.json").write_text(json.dumps(config))
    try:
        read_peft(d / "a", tiny_loaded.facts)
    except LccError:
        pass
    shutil.rmtree(d)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_edited_lcc_manifests_in_an_adapter_import_cleanly_or_fail_typed(tiny_loaded, compiled, tmp_path_factory,
                                                                        data):
    """The adapter's lcc_manifest.json (provenance import keeps, and the model it checks) with
    fields changed or removed: import writes a cartridge that loads, or fails typed."""
    import shutil
    from unittest import mock

    from lcc_cli import api
    from lcc_cli.errors import LccError
    from lcc_cli.export.peft import export_peft
    from lcc_cli.format.cartridge import load_cartridge

    d = tmp_path_factory.mktemp("adapter")
    export_peft(load_cartridge(compiled[0]), d / "a")
    manifest = json.loads((d / "a" / "lcc_manifest.json").read_text())
    (d / "a" / "lcc_manifest.json").write_text(json.dumps(_edited(manifest, data)))
    with mock.patch.object(api, "load", lambda run: tiny_loaded):  # the model loaded once, not per example
        try:
            api.import_adapter(d / "a", d / "o.lcc")
        except LccError:
            pass
        else:
            load_cartridge(d / "o.lcc")
    shutil.rmtree(d)

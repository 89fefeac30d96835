"""Shared fixtures: a tiny random Llama with a tiny tokenizer, saved as a real model
directory (so tests go through the same loading code as users), and a temp LCC_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CORPUS = (
    "The lighthouse stands on a granite spur at the edge of the bay. It was completed in 1868 by the "
    "engineer Ada Pellinger. The tower is 41 metres tall and painted in red and white bands. "
    "Question Answer Document Repeat the document word for word. Name three colours. "
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-\n"
)
DOC = ("The lighthouse stands on a granite spur at the edge of the bay. It was completed in 1868 "
       "by the engineer Ada Pellinger. The tower is 41 metres tall.")


@pytest.fixture(autouse=True)
def lcc_home(tmp_path, monkeypatch):
    home = tmp_path / "lcc-home"
    monkeypatch.setenv("LCC_HOME", str(home))
    monkeypatch.delenv("LCC_MODEL", raising=False)
    return home


def build_tiny_model(directory: Path, seed: int = 0, layers: int = 2, arch: str = "llama") -> Path:
    """Write a random 2-layer Llama (hidden 64) and a byte-level BPE tokenizer to `directory`
    (`arch="qwen3"`: the same shapes as a Qwen3, whose attention normalises queries and keys;
    `arch="qwen2"`: a Qwen2, whose query projection has a bias)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_theta=10000.0, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      bos_token_id=None, tie_word_embeddings=True)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          rope_theta=10000.0, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                          bos_token_id=None, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                          rope_theta=10000.0, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                          bos_token_id=None, tie_word_embeddings=True)
        model = Qwen3ForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Same shapes as tiny_model_dir, different weights: a different model."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-b"), seed=1)


@pytest.fixture
def tiny(tiny_model_dir):
    from lcc_cli.runtime.model import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture
def doc_file(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


def run_opts(model_dir, **extra):
    from lcc_cli.api import RunOptions

    return RunOptions(model=str(model_dir), **extra)


def fast_config(**overrides):
    from lcc_cli.config import CompileConfig

    # a compiled buffer (not an indexed cartridge): what most tests exercise
    base = dict(ratio=8, steps=3, lr=1e-2, kl_pool=4, kl_per_step=2, response_tokens=4, segment_tokens=256,
                index=False)
    base.update(overrides)
    return CompileConfig(**base)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, tiny_model_dir):
    """One cartridge compiled from DOC with the tiny model, shared by read-only tests."""
    from lcc_cli.api import RunOptions, compile_file

    d = tmp_path_factory.mktemp("compiled")
    src = d / "doc.txt"
    src.write_text(DOC)
    old = os.environ.get("LCC_HOME")
    os.environ["LCC_HOME"] = str(d / "home")
    try:
        compile_file(src, d / "doc.lcc", fast_config(), run=RunOptions(model=str(tiny_model_dir)))
    finally:
        if old is None:
            os.environ.pop("LCC_HOME", None)
        else:
            os.environ["LCC_HOME"] = old
    return d / "doc.lcc", src


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny model loaded once for read-only tests."""
    from lcc_cli.runtime.model import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def trained_compiler_file(tmp_path_factory, tiny_model_dir):
    """A compiler trained for one step on the tiny model, shared by read-only tests."""
    import json as _json

    from lcc_cli.api import train_compiler
    from lcc_cli.config import TrainConfig

    d = tmp_path_factory.mktemp("compiler-file")
    rows = [{"context": DOC, "questions": [{"q": "Who built it?", "answers": ["Ada"]}]}] * 6
    (d / "t.jsonl").write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    old = os.environ.get("LCC_HOME")
    os.environ["LCC_HOME"] = str(d / "home")
    try:
        train_compiler([d / "t.jsonl"], d / "c.safetensors",
                       TrainConfig(steps=1, batch=2, lora_rank=4, lora_alpha=4, response_tokens=4, top_k=8,
                                   heldout=1, heldout_long=0, recon_tokens=20, segment_tokens=64),
                       run=run_opts(tiny_model_dir))
    finally:
        os.environ.pop("LCC_HOME") if old is None else os.environ.__setitem__("LCC_HOME", old)
    return d / "c.safetensors"

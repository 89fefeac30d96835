"""Data-parallel training on Ray Train: 2 CPU workers give the losses of one process with
the same global batch."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_opts
from lcc_cli import api
from lcc_cli.format.compiler_file import load_compiler
from test_pretrained import ROWS, small

pytest.importorskip("ray.train.torch")


def test_two_ray_workers_train_like_one_process(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LCC_HOME", str(tmp_path / "home"))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    cfg = small(steps=3, batch=3, long_batch=1, checkpoint_every=3)
    threads = torch.get_num_threads()
    try:
        one = api.train_compiler([data], tmp_path / "one.safetensors", cfg, run=run_opts(tiny_model_dir, threads=1))
    finally:
        torch.set_num_threads(threads)
    two = api.train_compiler([data], tmp_path / "two.safetensors", cfg,
                             run=run_opts(tiny_model_dir, threads=1, backend="ray", workers=2))
    assert two.steps == one.steps == 3 and two.tokens == one.tokens
    # The same documents, ratios and targets on every step; only the order in which the
    # gradient is summed differs (two halves all-reduced instead of one running sum), which
    # moves float32 results by about 1e-6 relative per step: 1e-4 leaves a wide margin and
    # still fails for any difference in the data, the scaling or the averaging (>= 1e-2).
    for a, b in zip(one.history, two.history):
        for key in ("recon", "qa", "kl", "heldout_qa_kl"):
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    ta, tb = load_compiler(tmp_path / "one.safetensors").tensors, load_compiler(tmp_path / "two.safetensors").tensors
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k].float(), tb[k].float(), rtol=1e-2, atol=1e-4), k
    # and its checkpoints resume in one process
    resumed = api.train_compiler([data], tmp_path / "two.safetensors", small(steps=3, batch=3, long_batch=1,
                                                                              checkpoint_every=3),
                                 run=run_opts(tiny_model_dir, threads=1), resume=True, force=True)
    assert resumed.steps == 3

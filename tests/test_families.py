"""Model families (lcc_cli/families/): each family says where queries are read, and a tiny
random model of each goes through compile -> indexed ask -> serve as the Llama does."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from typer.testing import CliRunner

from conftest import DOC, build_tiny_model
from lcc_cli.cli import app
from lcc_cli.families import family_of


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def family_dir(request, tmp_path_factory):
    return request.param, build_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), arch=request.param)


def test_each_family_reads_queries_where_its_attention_scores_them(family_dir):
    from lcc_cli.runtime.model import load_model

    arch, folder = family_dir
    loaded = load_model(str(folder))
    family = loaded.family
    assert family is family_of(loaded.model.config) and family.name == arch
    layer = family.layers(loaded.model)[0]
    # Qwen3 normalises each head's queries before RoPE: its scores use q_norm's output
    assert family.query_module(layer) is (layer.self_attn.q_norm if arch == "qwen3" else layer.self_attn.q_proj)
    with family.capture_queries(loaded.model) as captured, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[5, 6, 7]]))
    assert len(captured) == loaded.facts.num_layers
    assert captured[0].reshape(1, 3, -1).shape[-1] == loaded.model.config.num_attention_heads * loaded.facts.head_dim
    assert not any(h for m in loaded.model.modules() for h in m._forward_hooks.values())  # hooks removed


def test_an_unknown_model_type_reads_as_llama():
    class Config:
        model_type = "some-new-llama-like"

    assert family_of(Config()).name == "llama"


def test_a_tiny_model_of_each_family_compiles_asks_by_pages_and_serves(family_dir, tmp_path):
    from test_serve import Running

    from lcc_cli.runtime.model import load_model

    arch, folder = family_dir
    filler = " ".join(f"Boat number {i} is painted blue and sails at noon." for i in range(6))
    (tmp_path / "doc.txt").write_text(filler + " " + DOC)  # past the floor: the question chooses its pages
    served = tmp_path / "served"
    served.mkdir()
    cart = served / "doc.lcc"
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "doc.txt"), "-o", str(cart), "--model", str(folder),
                                 "--ratio", "4", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["index"]["pages"] == 9
    r = CliRunner().invoke(app, ["ask", str(cart), "Who is the engineer Ada Pellinger?", "--model", str(folder),
                                 "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0, r.stderr
    asked = json.loads(r.stdout)
    assert asked["mode"] == "indexed" and any("Ada Pellinger" in p["text"] for p in asked["pages"])
    assert len(asked["pages"]) < 9
    server = Running(load_model(str(folder)), [served])
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "doc", "max_tokens": 4, "messages": [{"role": "user", "content": "Who is the engineer Ada Pellinger?"}]})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert [p["text"] for p in body["lcc"]["pages"]] == [p["text"] for p in asked["pages"]]
        assert body["choices"][0]["message"]["content"] == asked["answer"]  # the same read, the same answer
    finally:
        server.stop()

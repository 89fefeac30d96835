"""Portable cartridges: v1 -> v2 conversion, PEFT export and import, many questions per process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import run_opts
from lcc_cli.cli import app
from lcc_cli.format.cartridge import from_bytes, load_cartridge, to_bytes

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden-v1.lcc"
QUESTION = "Who built it?"
runner = CliRunner()


def _logits(loaded, buffer, first=None):
    from lcc_cli.runtime.cache import forward, make_cache

    ids = loaded.prompter.query_ids(QUESTION)
    with torch.no_grad():
        return forward(loaded.model, make_cache(buffer.cache_layers()),
                       buffer.first_query_position if first is None else first, input_ids=torch.tensor([ids]))[0]


def test_v1_v2_peft_and_import_read_the_same(tiny, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lcc_cli import api
    from lcc_cli.buffer import Buffer

    raw = load_file(str(GOLDEN))  # v1: keys at positions 89..100, question at 101
    v1 = Buffer([raw[f"k.{i}"] for i in range(2)], [raw[f"v.{i}"] for i in range(2)], torch.arange(89, 101))
    reference = _logits(tiny, v1)

    converted = load_cartridge(GOLDEN)  # v1 converted on load
    v2 = from_bytes(to_bytes(converted))  # saved in today's format (v3), laid out as v2 defined
    assert v2.manifest["format_version"] == 3 and v2.buffer.positions.tolist() == list(range(12))
    torch.testing.assert_close(_logits(tiny, v2.buffer), reference, rtol=1e-4, atol=1e-4)

    (tmp_path / "v2.lcc").write_bytes(to_bytes(converted))
    api.export_cartridge(tmp_path / "v2.lcc", "peft", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "CARTRIDGE" and config["task_type"] == "CAUSAL_LM"
    assert config["num_virtual_tokens"] == 12
    assert json.loads((tmp_path / "adapter" / "lcc_manifest.json").read_text())["model"]["fingerprint"] == tiny.fingerprint

    # Plain transformers + PEFT, no lcc code on this path: the adapter is a KV prefix at 0..11.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        via_peft = peft_model(input_ids=torch.tensor([tiny.prompter.query_ids(QUESTION)])).logits[0]
    torch.testing.assert_close(via_peft, _logits(tiny, v2.buffer), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_peft, reference, rtol=1e-4, atol=1e-4)

    api.import_adapter(tmp_path / "adapter", tmp_path / "back.lcc", run=run_opts(tiny_model_dir))
    back = load_cartridge(tmp_path / "back.lcc")
    assert back.manifest["model"]["fingerprint"] == tiny.fingerprint
    assert back.manifest["source"]["sha256"] == converted.manifest["source"]["sha256"]  # provenance kept
    assert all(torch.equal(a, b) for a, b in zip(back.buffer.keys + back.buffer.values,
                                                 v2.buffer.keys + v2.buffer.values))


def test_rotation_off_by_one_changes_the_logits(tiny):
    cart = load_cartridge(GOLDEN)
    right = _logits(tiny, cart.buffer)
    moved = cart.buffer.moved(cart.rope, 1)  # every key one position later...
    torch.testing.assert_close(_logits(tiny, moved), right, rtol=1e-4, atol=1e-4)  # ...with the question too: same
    assert not torch.allclose(_logits(tiny, moved, first=cart.slots), right, atol=1e-4)  # question left behind


def test_importing_an_adapter_made_by_peft_itself(tiny, tiny_model_dir, tmp_path):
    """A Cartridge trained elsewhere (here: PEFT's own prefill initialiser) imports, and lcc's
    reader reads it as PEFT does."""
    from peft import CartridgeConfig, PeftModel, get_peft_model
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text
    from transformers import AutoModelForCausalLM

    from lcc_cli import api

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    initialize_kv_prefix_from_text(model, tiny.tokenizer, text="The tower is 41 metres tall.", use_chat_template=False)
    model.save_pretrained(tmp_path / "theirs")
    api.import_adapter(tmp_path / "theirs", tmp_path / "theirs.lcc", run=run_opts(tiny_model_dir))
    cart = load_cartridge(tmp_path / "theirs.lcc")
    assert cart.slots == 8 and cart.manifest["compiler"]["name"] == "imported"
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "theirs").eval()
    with torch.no_grad():
        theirs = fresh(input_ids=torch.tensor([tiny.prompter.query_ids(QUESTION)])).logits[0]
    torch.testing.assert_close(_logits(tiny, cart.buffer), theirs, rtol=1e-5, atol=1e-5)


def test_import_refuses_what_is_not_a_cartridge_adapter(tmp_path, tiny_model_dir):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["import", str(tmp_path / "lora"), "-o", str(tmp_path / "x.lcc"),
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 5 and "not a PEFT Cartridge" in result.stderr
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text('{"peft_type": "CARTRIDGE"}')
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    result = runner.invoke(app, ["import", str(tmp_path / "pickled"), "-o", str(tmp_path / "x.lcc"),
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 5 and "never pickled" in result.stderr
    assert not (tmp_path / "x.lcc").exists()


def test_questions_file_gives_the_answers_of_separate_asks(compiled, tiny_model_dir, tmp_path):
    path, _ = compiled
    qs = ["Who built it?", "When was it completed?", "How tall is the tower?"]
    (tmp_path / "q.txt").write_text("\n".join(qs) + "\n\n")
    result = runner.invoke(app, ["ask", str(path), "--questions", str(tmp_path / "q.txt"), "--model",
                                 str(tiny_model_dir), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in rows] == qs
    for q, row in zip(qs, rows):
        alone = json.loads(runner.invoke(app, ["ask", str(path), q, "--model", str(tiny_model_dir), "--json",
                                               "--max-new-tokens", "6"]).stdout)
        assert alone["answer"] == row["answer"] and row["mode"] == "cartridge"
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"q": q}) for q in qs))
    again = runner.invoke(app, ["ask", str(path), "-q", str(tmp_path / "q.jsonl"), "--model", str(tiny_model_dir),
                                "--max-new-tokens", "6"])
    assert [json.loads(line)["answer"] for line in again.stdout.splitlines()] == [r["answer"] for r in rows]


def test_question_from_stdin_and_chat(compiled, tiny_model_dir):
    path, _ = compiled
    piped = runner.invoke(app, ["ask", str(path), "-", "--model", str(tiny_model_dir), "--json",
                                "--max-new-tokens", "4"], input="Who built it?\n")
    direct = runner.invoke(app, ["ask", str(path), "Who built it?\n", "--model", str(tiny_model_dir), "--json",
                                 "--max-new-tokens", "4"])
    assert piped.exit_code == 0 and json.loads(piped.stdout)["answer"] == json.loads(direct.stdout)["answer"]
    chat = runner.invoke(app, ["chat", str(path), "--model", str(tiny_model_dir), "--max-new-tokens", "4"],
                         input="Who built it?\n\nWhen?\nexit\n")
    assert chat.exit_code == 0 and chat.stdout.count("> ") == 4 and "ready (cartridge)" in chat.stderr


@pytest.mark.parametrize("layout", ["consecutive", "overlap"])
def test_two_v2_cartridges_compose_in_the_chosen_layout(compiled, layout):
    from lcc_cli.runtime.memory import compose as combine

    cart = load_cartridge(compiled[0])
    buffer = combine([cart, cart], layout=layout)
    k = cart.slots
    expected = list(range(2 * k)) if layout == "consecutive" else list(range(k)) * 2
    assert buffer.positions.tolist() == expected
    assert buffer.first_query_position == max(expected) + 1
    second = buffer.keys[0][:, k:]
    if layout == "consecutive":
        torch.testing.assert_close(second, cart.buffer.moved(cart.rope, k).keys[0])
    else:
        assert torch.equal(second, cart.buffer.keys[0])

"""End to end on the real embedded SmolLM2-135M-Instruct: de-quantise, compile a few steps, ask.

Slow-ish (about a minute on 2 CPU cores) but part of the default suite: it is the one test
that proves the product works on the model users get.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lcc_cli.cli import app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "harbor.md"


@pytest.mark.slow
def test_real_model_compile_then_ask(tmp_path):
    runner = CliRunner()
    out = tmp_path / "harbor.lcc"
    result = runner.invoke(app, ["compile", str(EXAMPLE), "--ratio", "16", "--steps", "3", "--no-index", "-o",
                                 str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == "smollm2-135m"
    assert summary["slots"] == -(-summary["tokens"] // 16)
    # The shipped compiler matches the embedded model, so `auto` starts from it.
    assert summary["compiler"]["name"] == "pretrained"
    assert summary["compiler"]["file"] == "compiler-smollm2-135m.safetensors"

    verify = runner.invoke(app, ["verify", str(out), "--source", str(EXAMPLE), "--probe", "--json"])
    assert verify.exit_code == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert [c["name"] for c in report["checks"]][-2:] == ["source", "probe"]
    assert 0.0 <= report["probe"]["fidelity"] <= 1.0 and report["probe"]["tokens"] > 200

    answer = runner.invoke(app, ["ask", str(out), "Who designed the lighthouse?", "--json"])
    payload = json.loads(answer.stdout)
    assert answer.exit_code == 0 and payload["answer"].strip()
    # the buffer, and the shipped reading prefix's entries before it (read before every document)
    assert payload["prefix"].startswith("reading-prefix-smollm2-135m")
    assert payload["kv_positions"] == summary["slots"] + _prefix_slots()

    full = json.loads(runner.invoke(app, ["ask", "--context", str(EXAMPLE), "When was the lighthouse completed?",
                                          "--json"]).stdout)
    assert "1868" in full["answer"]  # the real model reads the document: the baseline works


@pytest.mark.slow
def test_real_model_default_compile_is_indexed_and_reads_the_right_page(tmp_path):
    """The default compile (pages, int8): verify passes, and a question reads the page that
    holds its answer and answers from it."""
    runner = CliRunner()
    out = tmp_path / "harbor.lcc"
    result = runner.invoke(app, ["compile", str(EXAMPLE), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["index"]["pages"] >= 8 and summary["index"]["dtype"] == "int8"
    assert summary["index"]["bytes_per_token"] < 13_000
    verify = runner.invoke(app, ["verify", str(out), "--json"])
    assert verify.exit_code == 0, verify.stdout
    answer = json.loads(runner.invoke(app, ["ask", str(out), "Who designed the lighthouse?", "--ratio", "8",
                                            "--json"]).stdout)
    assert answer["mode"] == "indexed" and answer["answer"].strip()
    assert any("Ada Pellinger" in p["text"] for p in answer["pages"])
    assert answer["prefix"].startswith("reading-prefix-smollm2-135m")  # the shipped prefix, pinned to this model
    prefix_slots = _prefix_slots()
    # the prefix, the header, a few pages, the end of the turn: not the document
    assert answer["kv_positions"] - prefix_slots < 80


def _prefix_slots() -> int:
    from lcc_cli.format.prefix_file import read_prefix_manifest
    from lcc_cli.runtime.prefix import shipped_prefix

    return read_prefix_manifest(shipped_prefix())["entries"]

"""Flags that do nothing are refused, and manifests record what happened (issue 31, items 7-8)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import DOC
from lcc_cli.cli import app
from lcc_cli.format.cartridge import load_cartridge

runner = CliRunner()


def _one_line(result, code, fragment):
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lcc: error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("compiler,extra", [("truncate", []), ("none", ["--steps", "1"]), ("pretrained", [])])
def test_bias_is_refused_where_no_biases_would_be_made(doc_file, tiny_model_dir, tmp_path, trained_compiler_file,
                                                       compiler, extra):
    choice = str(trained_compiler_file) if compiler == "pretrained" else compiler
    out = tmp_path / "x.lcc"
    result = runner.invoke(app, ["compile", str(doc_file), "--compiler", choice, "--bias", "-o", str(out),
                                 "--model", str(tiny_model_dir), "--ratio", "4", *extra])
    _one_line(result, 2, "--bias")
    assert not out.exists()


def test_bias_is_kept_where_it_is_made(doc_file, tiny_model_dir, tmp_path):
    for args in (["--compiler", "am"], ["--compiler", "truncate", "--steps", "1"]):
        out = tmp_path / f"{args[1]}.lcc"
        result = runner.invoke(app, ["compile", str(doc_file), *args, "--bias", "-o", str(out), "--model",
                                     str(tiny_model_dir), "--ratio", "4"])
        assert result.exit_code == 0, result.stderr
        m = load_cartridge(out).manifest
        assert m["compile"]["bias"] is True and m["buffer"]["bias"] is True


def test_export_without_biases_and_import_record_that_they_are_gone(tmp_path, tiny_model_dir):
    (tmp_path / "doc.txt").write_text(DOC)
    biased = tmp_path / "b.lcc"
    assert runner.invoke(app, ["compile", str(tmp_path / "doc.txt"), "--compiler", "am", "--bias", "--ratio", "4",
                               "-o", str(biased), "--model", str(tiny_model_dir)]).exit_code == 0
    assert runner.invoke(app, ["export", str(biased), str(tmp_path / "peft"), "--drop-bias"]).exit_code == 0
    exported = json.loads((tmp_path / "peft" / "lcc_manifest.json").read_text())
    assert exported["compile"]["bias"] is False and exported["compiler"]["biases_dropped"] is True
    back = tmp_path / "back.lcc"
    result = runner.invoke(app, ["import", str(tmp_path / "peft"), "-o", str(back), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.stderr
    m = load_cartridge(back).manifest
    assert m["compile"]["bias"] is False and "bias" not in m["buffer"]


def test_self_check_time_is_reported_beside_the_compile_time(doc_file, tiny_model_dir, tmp_path):
    out = tmp_path / "c.lcc"
    result = runner.invoke(app, ["compile", str(doc_file), "--compiler", "am", "--ratio", "4", "--self-check", "2",
                                 "-o", str(out), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.stderr
    m = load_cartridge(out).manifest
    assert m["metrics"]["self_check"]["seconds"] > 0
    assert "of self-check" in result.stdout
    shown = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert "self-check" in shown.stdout and "s more" in shown.stdout

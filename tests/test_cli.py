"""The command line: every error row gives its exit code, one stderr line and no traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lcc_cli.cli import app

runner = CliRunner()
FAST = ["--steps", "2", "--ratio", "8"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_error(result, code, fragment=""):
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lcc: error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("compile", "ask", "inspect", "verify"):
        assert command in result.stdout


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from lcc_cli.cli import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_compile_inspect_verify_ask(tiny_model_dir, doc_file, tmp_path):
    out = tmp_path / "doc.lcc"
    result = run("compile", doc_file, "-o", out, "--model", tiny_model_dir, "--no-index", *FAST)
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and "wrote" in result.stdout

    info = run("inspect", out, "--json")
    manifest = json.loads(info.stdout)["manifest"]
    assert manifest["source"]["name"] == "doc.txt" and manifest["compile"]["steps"] == 2
    assert "segment 0" in run("inspect", out).stdout

    ok = run("verify", out, "--model", tiny_model_dir, "--source", doc_file, "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True

    answer = run("ask", out, "Who built it?", "--model", tiny_model_dir, "--json", "--max-new-tokens", "4")
    payload = json.loads(answer.stdout)
    assert answer.exit_code == 0 and payload["mode"] == "cartridge"
    assert payload["kv_positions"] == manifest["buffer"]["total_slots"]

    full = json.loads(run("ask", "--context", doc_file, "Who?", "--model", tiny_model_dir, "--json").stdout)
    assert full["mode"] == "context" and full["prompt_tokens"] > manifest["source"]["token_count"]


def test_composed_cartridges(compiled, tiny_model_dir):
    path, _ = compiled
    result = run("ask", path, path, "Who?", "--model", tiny_model_dir, "--json", "--max-new-tokens", "2")
    single = json.loads(run("ask", path, "Who?", "--model", tiny_model_dir, "--json",
                            "--max-new-tokens", "2").stdout)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["kv_positions"] == 2 * single["kv_positions"]


# --- error rows: one test each -------------------------------------------------------------

def test_missing_source(tmp_path, tiny_model_dir):
    assert_error(run("compile", tmp_path / "nope.txt", "--model", tiny_model_dir), 3, "no such file")


def test_empty_source(tmp_path, tiny_model_dir):
    (tmp_path / "e.txt").write_text("  \n")
    assert_error(run("compile", tmp_path / "e.txt", "--model", tiny_model_dir), 3, "empty")


def test_binary_source(tmp_path, tiny_model_dir):
    (tmp_path / "b.txt").write_bytes(b"\x00\x01\x02binary\x00" * 10)
    assert_error(run("compile", tmp_path / "b.txt", "--model", tiny_model_dir), 3, "binary")


def test_unknown_file_type(tmp_path, tiny_model_dir):
    (tmp_path / "x.docx").write_text("hello")
    assert_error(run("compile", tmp_path / "x.docx", "--model", tiny_model_dir), 3, "unsupported file type")


def test_ratio_below_one(doc_file, tiny_model_dir):
    assert_error(run("compile", doc_file, "--ratio", "0.5", "--model", tiny_model_dir), 2, "--ratio")


def test_ratio_above_segment_length(doc_file, tiny_model_dir, tmp_path):
    result = run("compile", doc_file, "--ratio", "100000", "-o", tmp_path / "o.lcc", "--model", tiny_model_dir)
    assert_error(result, 2, "larger than the segment")
    assert not (tmp_path / "o.lcc").exists()


def test_output_in_missing_directory(doc_file, tiny_model_dir, tmp_path):
    assert_error(run("compile", doc_file, "-o", tmp_path / "no" / "o.lcc", "--model", tiny_model_dir), 2,
                 "does not exist")


def test_output_exists_without_force(doc_file, tiny_model_dir, tmp_path):
    (tmp_path / "o.lcc").write_text("keep me")
    assert_error(run("compile", doc_file, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 9, "exists")
    assert (tmp_path / "o.lcc").read_text() == "keep me"


def test_missing_model(doc_file, tmp_path):
    assert_error(run("compile", doc_file, "--model", tmp_path / "no-model", "-o", tmp_path / "o.lcc"), 4,
                 "model not found")


def test_ask_not_a_cartridge(tmp_path, tiny_model_dir):
    (tmp_path / "x.lcc").write_text("this is not a cartridge at all")
    assert_error(run("ask", tmp_path / "x.lcc", "q?", "--model", tiny_model_dir), 5)


def test_ask_truncated_cartridge(compiled, tmp_path, tiny_model_dir):
    (tmp_path / "t.lcc").write_bytes(compiled[0].read_bytes()[:-100])
    assert_error(run("ask", tmp_path / "t.lcc", "q?", "--model", tiny_model_dir), 5)


def test_ask_wrong_model(compiled, other_model_dir):
    assert_error(run("ask", compiled[0], "q?", "--model", other_model_dir), 6, "was made for model")


def test_ask_empty_question(compiled, tiny_model_dir):
    assert_error(run("ask", compiled[0], "  ", "--model", tiny_model_dir), 2, "empty")


def test_inspect_garbage(tmp_path):
    (tmp_path / "g.lcc").write_bytes(b"\xff" * 64)
    assert_error(run("inspect", tmp_path / "g.lcc"), 5)


def test_verify_tampered_fails_with_7_and_names_the_check(compiled, tmp_path):
    data = bytearray(compiled[0].read_bytes())
    data[-5] ^= 0x01
    (tmp_path / "t.lcc").write_bytes(bytes(data))
    result = run("verify", tmp_path / "t.lcc", "--no-model")
    assert_error(result, 7, "checksum")
    assert "FAIL" in result.stdout


def test_verify_wrong_model_fails(compiled, other_model_dir):
    result = run("verify", compiled[0], "--model", other_model_dir)
    assert_error(result, 7, "fingerprint")


def test_verify_wrong_source_fails(compiled, tmp_path):
    (tmp_path / "other.txt").write_text("another document")
    assert_error(run("verify", compiled[0], "--no-model", "--source", tmp_path / "other.txt"), 7, "source")


@pytest.mark.parametrize("command", ["compile", "ask", "inspect", "verify"])
def test_subcommand_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_verify_probe_reports_fidelity(compiled, tiny_model_dir):
    path, src = compiled
    result = run("verify", path, "--model", tiny_model_dir, "--source", src, "--probe", "--json")
    assert result.exit_code == 0, result.stderr
    probe = json.loads(result.stdout)["probe"]
    assert 0.0 <= probe["fidelity"] <= 1.0 and probe["tokens"] > 10 and probe["segments"] == 1


def test_verify_probe_needs_source(compiled):
    assert_error(run("verify", compiled[0], "--probe", "--no-model"), 2, "--probe")


def _corrupt_variants(path, tmp_path):
    """(name, file) for each kind of damaged cartridge in the bad-input table."""
    from test_cartridge import _rewrite_manifest

    data = path.read_bytes()
    variants = {}
    for cut in (7, 64, len(data) // 2, len(data) - 1):
        variants[f"truncated-{cut}"] = data[:cut]
    flipped = bytearray(data)
    flipped[-3] ^= 0x10
    variants["flipped-byte"] = bytes(flipped)
    variants["not-safetensors"] = b"PK\x03\x04" + b"zip archive, not a cartridge" * 10
    out = {}
    for name, blob in variants.items():
        p = tmp_path / f"{name}.lcc"
        p.write_bytes(blob)
        out[name] = p
    out["manifest-edited"] = _rewrite_manifest(path, tmp_path, lambda m: m["buffer"].__setitem__("first_query_position", 1))
    (tmp_path / "edited.lcc").rename(tmp_path / "manifest-edited.lcc")
    out["manifest-edited"] = tmp_path / "manifest-edited.lcc"
    out["future-version"] = _rewrite_manifest(path, tmp_path, lambda m: m.__setitem__("format_version", 4))
    return out


def test_every_damaged_cartridge_exits_5_on_ask_inspect_and_7_on_verify(compiled, tmp_path, tiny_model_dir):
    for name, path in _corrupt_variants(compiled[0], tmp_path).items():
        assert_error(run("ask", path, "q?", "--model", tiny_model_dir), 5)
        assert_error(run("inspect", path), 5)
        assert_error(run("verify", path, "--no-model"), 7)


def test_output_on_read_only_path(doc_file, tiny_model_dir, tmp_path):
    import os

    if os.geteuid() == 0:
        target = "/sys/lcc-test.lcc"  # sysfs refuses new files even to root
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "o.lcc"
    assert_error(run("compile", doc_file, "-o", target, "--model", tiny_model_dir), 2, "not writable")


def test_source_over_size_limit(tmp_path, tiny_model_dir):
    (tmp_path / "big.txt").write_text("word " * 500)
    assert_error(run("compile", tmp_path / "big.txt", "--max-bytes", "100", "--model", tiny_model_dir), 3, "limit")


def test_scanned_and_encrypted_pdfs(tmp_path, tiny_model_dir):
    from pdfs import blank_pdf, encrypted_pdf

    (tmp_path / "scan.pdf").write_bytes(blank_pdf())
    (tmp_path / "lock.pdf").write_bytes(encrypted_pdf(["secret"]))
    assert_error(run("compile", tmp_path / "scan.pdf", "--model", tiny_model_dir), 3, "no extractable text")
    assert_error(run("compile", tmp_path / "lock.pdf", "--model", tiny_model_dir), 3, "encrypted")


def test_non_utf8_text(tmp_path, tiny_model_dir):
    (tmp_path / "l1.txt").write_bytes("caf\xe9".encode("latin-1") * 20)
    assert_error(run("compile", tmp_path / "l1.txt", "--model", tiny_model_dir), 3, "UTF-8")


def test_ask_partial_file_is_refused(tmp_path, tiny_model_dir, compiled):
    from lcc_cli.format.cartridge import from_bytes, load_cartridge, to_bytes

    cart = load_cartridge(compiled[0])
    cart.manifest["partial"] = True
    (tmp_path / "x.lcc.partial").write_bytes(to_bytes(cart))
    with pytest.raises(Exception, match="unfinished"):
        from_bytes((tmp_path / "x.lcc.partial").read_bytes())
    assert_error(run("ask", tmp_path / "x.lcc.partial", "q?", "--model", tiny_model_dir), 5, "unfinished")


@pytest.mark.parametrize("exc,code,fragment", [(KeyboardInterrupt, 130, "interrupted"),
                                               (MemoryError, 8, "out of memory"),
                                               (RuntimeError("boom"), 1, "unexpected RuntimeError")])
def test_interrupt_memory_and_unexpected_rows(doc_file, tmp_path, monkeypatch, exc, code, fragment):
    from lcc_cli import api

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(api, "compile_file", fail)
    assert_error(run("compile", doc_file, "-o", tmp_path / "o.lcc"), code, fragment)


def test_no_space_left_is_exit_8(compiled, tmp_path, monkeypatch):
    import errno

    from lcc_cli.format import cartridge, fsio

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    cart = cartridge.load_cartridge(compiled[0])
    monkeypatch.setattr(fsio.os, "link", full_disk)
    from lcc_cli.errors import ResourceError

    with pytest.raises(ResourceError):
        cartridge.save_cartridge(cart, tmp_path / "o.lcc")
    assert list(tmp_path.iterdir()) == []


def test_a_batch_of_questions_over_a_document_answers_like_one_at_a_time(tiny):
    """The document's context turn is prefilled once for the batch: the same KV and
    positions as each question reading it in its own prompt."""
    from conftest import DOC
    from lcc_cli.config import AskConfig
    from lcc_cli.runtime.reading import Row, View, answer_rows

    qs = ["Who designed the lighthouse?", "When?"]
    cfg = AskConfig(max_new_tokens=8)
    view = View.text(tiny.prompter.context_ids(DOC))
    one = [answer_rows(tiny, [Row(view, tiny.prompter.query_ids(q), q)], cfg)[0] for q in qs]
    many = answer_rows(tiny, [Row(view, tiny.prompter.query_ids(q), q) for q in qs], cfg, batch=True)
    assert [a.text for a in many] == [a.text for a in one]
    assert [a.prompt_tokens for a in many] == [a.prompt_tokens for a in one]

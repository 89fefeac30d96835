"""Untrusted cartridges, hostile documents and bad flags: every example from the attack
report, each asserting its exit code, one stderr line and no traceback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import fast_config, run_opts
from lcc_cli.cli import app
from lcc_cli.format import cartridge as fmt

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_error(result, code, fragment=""):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lcc: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def resign(path: Path, out: Path, edit=None, tensors=None, key: str = "lcc_manifest") -> Path:
    """Rewrite a cartridge (or, with key="lcc_compiler", a compiler file) with an edited
    manifest and/or tensors and *valid* checksums: what an attacker can do, since the
    checksums are unkeyed."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(meta[key])
    if edit:
        edit(manifest)
    if tensors:
        data = tensors(data)
    if fmt.BLOCK_TABLE in data and manifest.get("format_version") == 3:  # v3: block table and digests recomputed
        out.write_bytes(fmt.seal(manifest, fmt.reblock(manifest, data)))
        return out
    manifest["tensor_sha256"] = fmt.tensor_sha256(data)
    text = json.dumps(manifest, sort_keys=True)
    out.write_bytes(save(data, metadata={key: text, "lcc_checksum": fmt.checksum(text, manifest["tensor_sha256"])}))
    return out


def max_rss_mb(args: list[str]) -> tuple[int, float, str]:
    """Run the CLI in a child process; return its exit code, peak memory (MB) and stderr."""
    # VmHWM is this process's own high-water mark. ru_maxrss is not: Linux carries the mark of
    # the memory replaced at exec into it, and a child started from a pytest that has grown to
    # 1 GB then reports 1 GB whatever it does.
    code = ("import resource, sys; from lcc_cli.cli import app\n"
            "def peak():\n"
            "    try:\n"
            "        with open('/proc/self/status') as f:\n"
            "            return next(int(l.split()[1]) for l in f if l.startswith('VmHWM:'))\n"
            "    except (OSError, StopIteration):\n"
            "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('PEAK', peak(), file=sys.stderr); raise\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK"))
    return proc.returncode, peak / 1024, proc.stderr


# 1. a re-signed manifest that lies about sizes ---------------------------------------------

def test_a_billion_layers_is_refused_before_anything_is_allocated(compiled, tmp_path):
    bad = resign(compiled[0], tmp_path / "layers.lcc", lambda m: m["model"].__setitem__("num_layers", 10**9))
    code, peak, err = max_rss_mb(["inspect", str(bad)])
    assert code == 5 and "num_layers" in err and peak < 1000
    assert_error(run("verify", bad, "--no-model"), 7, "num_layers")


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: m["buffer"].__setitem__("total_slots", 10**12), "total_slots"),
    (lambda m: m["model"].__setitem__("num_kv_heads", 0), "num_kv_heads"),
    (lambda m: m["model"].__setitem__("num_layers", 0), "num_layers"),
    (lambda m: m["model"].__setitem__("head_dim", 7), "head_dim"),
    (lambda m: m["buffer"]["segments"].append(dict(m["buffer"]["segments"][0])), "slots"),
])
def test_lying_counts_are_typed_errors(compiled, tmp_path, edit, fragment):
    bad = resign(compiled[0], tmp_path / "bad.lcc", edit)
    assert_error(run("inspect", bad), 5, fragment)
    assert_error(run("verify", bad, "--no-model"), 7)


# 2. terminal injection -----------------------------------------------------------------------

HOSTILE = "evil\x1b]0;pwned\x07\x1b[2J\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\[link=http://x]click[/link][blink]b[/x]"


def test_escape_sequences_and_markup_in_a_cartridge_are_shown_as_data(compiled, tmp_path, tiny_model_dir):
    def edit(m):
        m["model"]["id"] = HOSTILE
        m["source"]["name"] = HOSTILE

    bad = resign(compiled[0], tmp_path / "hostile.lcc", edit)
    shown = runner.invoke(app, ["inspect", str(bad)], env={"COLUMNS": "400"})
    assert shown.exit_code == 0 and "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "[link=http://x]" in shown.stdout  # the markup is printed, not interpreted
    as_json = run("inspect", bad, "--json")
    assert json.loads(as_json.stdout)["manifest"]["model"]["id"] == HOSTILE and "\x1b" not in as_json.stdout
    checked = run("verify", bad, "--model", tiny_model_dir)  # fingerprint still matches: only names are hostile
    assert checked.exit_code == 0 and "\x1b" not in checked.stdout + checked.stderr


def test_hostile_names_in_error_messages_are_escaped(compiled, tmp_path, other_model_dir):
    bad = resign(compiled[0], tmp_path / "hostile.lcc", lambda m: m["model"].__setitem__("id", HOSTILE))
    result = run("ask", bad, "q?", "--model", other_model_dir)
    assert_error(result, 6, "was made for model")
    assert "\x1b" not in result.stderr and "\\x1b" in result.stderr


# 3. non-finite and absurd values ---------------------------------------------------------------

@pytest.mark.parametrize("poison,fragment", [
    (lambda t: torch.full_like(t, float("nan")), "NaN"),
    (lambda t: t.index_put_((torch.tensor([0]),), torch.tensor(float("inf"))), "NaN or infinite"),
    (lambda t: t * 1e30, "beyond any real KV cache"),
])
def test_non_finite_or_huge_values_fail_verify_and_ask(compiled, tmp_path, tiny_model_dir, poison, fragment):
    bad = resign(compiled[0], tmp_path / "bad.lcc", tensors=lambda d: {k: poison(v.clone()) if k in ("v", "v.0") else v
                                                                         for k, v in d.items()})
    assert_error(run("verify", bad, "--no-model"), 7, fragment)
    assert_error(run("ask", bad, "Who?", "--model", tiny_model_dir), 5, fragment)


# 4. no-clobber -------------------------------------------------------------------------------

def test_a_file_that_appears_during_the_compile_is_not_overwritten(doc_file, tmp_path, tiny_model_dir):
    from lcc_cli import api
    from lcc_cli.errors import OutputExistsError
    from lcc_cli.progress import Progress

    out = tmp_path / "o.lcc"

    class Appear(Progress):
        def start(self, task, total, label=""):
            if task == "steps" and not out.exists():
                out.write_text("someone else's file")

    with pytest.raises(OutputExistsError, match="appeared"):
        api.compile_file(doc_file, out, fast_config(steps=1), run=run_opts(tiny_model_dir), progress=Appear())
    assert out.read_text() == "someone else's file"


def test_force_never_replaces_the_input_or_a_device(doc_file, tmp_path, tiny_model_dir):
    before = doc_file.read_bytes()
    assert_error(run("compile", doc_file, "-o", doc_file, "--force", "--model", tiny_model_dir, "--steps", "1",
                     "--ratio", "8"), 2, "input of this command")
    assert doc_file.read_bytes() == before
    assert_error(run("compile", doc_file, "-o", "/dev/null", "--force", "--model", tiny_model_dir), 2,
                 "not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# 5. header first ---------------------------------------------------------------------------

def test_a_sparse_4gb_file_is_judged_by_its_first_bytes(tmp_path):
    sparse = tmp_path / "sparse.lcc"
    with open(sparse, "wb") as f:
        f.write((2**40).to_bytes(8, "little"))
        f.truncate(4 * 1024**3)
    code, peak, err = max_rss_mb(["inspect", str(sparse)])
    assert code == 5 and "bad header length" in err and peak < 1000
    assert_error(run("verify", sparse, "--no-model"), 7, "header")


# 6. inputs that used to end in "unexpected" ------------------------------------------------------

def test_deeply_nested_json_everywhere(compiled, tmp_path, tiny_model_dir):
    deep = "[" * 100_000 + "]" * 100_000
    raw = json.dumps({"__metadata__": {"lcc_manifest": "x"}}).encode()
    header = raw.replace(b'"x"', json.dumps(deep).encode())
    (tmp_path / "deep-manifest.lcc").write_bytes(len(header).to_bytes(8, "little") + header)
    assert_error(run("inspect", tmp_path / "deep-manifest.lcc"), 5, "nested too deeply")
    header = deep.encode()
    (tmp_path / "deep-header.lcc").write_bytes(len(header).to_bytes(8, "little") + header)
    assert_error(run("inspect", tmp_path / "deep-header.lcc"), 5)
    (tmp_path / "deep.jsonl").write_text(deep + "\n")
    assert_error(run("eval", tmp_path / "deep.jsonl", "--model", tiny_model_dir, "--out", tmp_path / "o"), 3, "line 1")


def test_a_lone_surrogate_in_the_question(compiled, tiny_model_dir):
    assert_error(run("ask", compiled[0], "who\udcff?", "--model", tiny_model_dir), 2, "not valid text")


def test_zero_layer_cartridge_in_verify(compiled, tmp_path):
    bad = resign(compiled[0], tmp_path / "zero.lcc", lambda m: m["model"].__setitem__("num_layers", 0))
    assert_error(run("verify", bad, "--no-model", "--json"), 7, "num_layers")


def test_probe_on_odd_compile_settings_is_a_failed_check(compiled, tmp_path, tiny_model_dir):
    bad = resign(compiled[0], tmp_path / "odd.lcc", lambda m: m["compile"].__setitem__("segment_tokens", "many"))
    result = run("verify", bad, "--model", tiny_model_dir, "--source", compiled[1], "--probe")
    assert_error(result, 7, "probe")


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "-1"),
                                        ("--max-new-tokens", "100000000")])
def test_bad_ask_flags(compiled, tiny_model_dir, flag, value):
    assert_error(run("ask", compiled[0], "q?", flag, value, "--model", tiny_model_dir), 2, flag)


@pytest.mark.parametrize("flag,value", [("--ratio", "nan"), ("--lr", "nan"), ("--ratio", "inf"), ("--steps", "-1")])
def test_bad_compile_flags_fail_before_any_work(doc_file, tmp_path, tiny_model_dir, flag, value):
    assert_error(run("compile", doc_file, "-o", tmp_path / "o.lcc", flag, value, "--model", tiny_model_dir), 2, flag)
    assert not (tmp_path / "o.lcc").exists()


def test_bad_train_flags(tmp_path, tiny_model_dir):
    (tmp_path / "d.jsonl").write_text('{"context": "text"}\n')
    assert_error(run("train-compiler", tmp_path / "d.jsonl", "-o", tmp_path / "c", "--lr", "nan", "--model",
                     tiny_model_dir), 2, "--lr")


@pytest.mark.parametrize("row,fragment", [
    (b'{"context": "x", "questions": [{"q": "a", "answers": "not a list"}]}', "answers"),
    (b'{"context": "x", "questions": [{"q": "a", "answers": [1]}]}', "answers"),
    (b'{"id": {"no": 1}, "context": "x", "questions": [{"q": "a", "answers": ["b"]}]}', "id"),
    (b'{"context": "x", "questions": []}', "questions"),
    (b'{"context": "caf\xe9", "questions": []}', "UTF-8"),
])
def test_bad_eval_rows_fail_up_front(tmp_path, tiny_model_dir, row, fragment):
    (tmp_path / "d.jsonl").write_bytes(row + b"\n")
    assert_error(run("eval", tmp_path / "d.jsonl", "--model", tiny_model_dir, "--out", tmp_path / "o"), 3, fragment)
    assert not (tmp_path / "o" / "cartridges").exists()  # nothing was compiled


def test_a_utf8_bom_is_not_a_bad_row(tmp_path):
    from lcc_cli.eval.data import load_dataset

    row = {"id": "a", "context": "text", "questions": [{"q": "q", "answers": ["a"]}]}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode())
    assert load_dataset(tmp_path / "bom.jsonl")[0]["id"] == "a"


# 7. the model's window -----------------------------------------------------------------------

def test_a_question_longer_than_the_window_is_refused_with_numbers(compiled, tiny_model_dir):
    result = run("ask", compiled[0], "why " * 5000, "--model", tiny_model_dir)
    assert_error(result, 2, "4096-position window")


# 8. splitting is linear ----------------------------------------------------------------------

def test_splitting_one_huge_word_tokenizes_once_per_piece():
    from lcc_cli.ingest import split_text

    calls = []

    def spans(s):
        calls.append(len(s))
        return [(i, i + 4) for i in range(0, len(s), 4)]  # four characters a token

    word = "QUJD" * 250_000  # one 1 MB "word" (base64-like): 250,000 tokens
    pieces = split_text(word, spans, 1000)
    assert "".join(pieces) == word and len(pieces) == 250
    assert len(calls) <= len(pieces) + 1  # one pass over the text, then one per piece: linear


# 9. positions are checked ----------------------------------------------------------------------

def test_position_lies_are_refused(compiled, tmp_path):
    def lie(m):
        m["buffer"]["segments"][0]["position_start"] = 5
        m["buffer"]["first_query_position"] = 5 + m["buffer"]["total_slots"]

    bad = resign(compiled[0], tmp_path / "lie.lcc", lie)
    assert_error(run("verify", bad, "--no-model"), 7, "layout puts it at 0")
    golden = ROOT / "tests" / "fixtures" / "golden-v1.lcc"
    def v1_lie(m):
        m["buffer"]["segments"][0]["position_start"] = 0
        m["buffer"]["first_query_position"] = m["buffer"]["total_slots"]

    v1 = resign(golden, tmp_path / "v1.lcc", v1_lie)
    assert_error(run("inspect", v1), 5, "right after its")
    no_rope = resign(compiled[0], tmp_path / "rope.lcc", lambda m: m["model"].pop("rope"))
    assert_error(run("inspect", no_rope), 5, "rope")
    no_theta = resign(golden, tmp_path / "theta.lcc", lambda m: m["model"].pop("rope_theta"))
    assert_error(run("inspect", no_theta), 5, "rope_theta")


def test_a_rope_the_model_does_not_have_is_refused(compiled, tmp_path, tiny_model_dir):
    bad = resign(compiled[0], tmp_path / "rope.lcc", lambda m: m["model"]["rope"].__setitem__("rope_theta", 500000.0))
    assert_error(run("ask", bad, "q?", "--model", tiny_model_dir, "--force"), 6, "rope_theta")


# 10. a forgotten question ----------------------------------------------------------------------

def test_ask_with_only_a_cartridge_is_a_usage_error(compiled, tiny_model_dir):
    assert_error(run("ask", compiled[0], "--model", tiny_model_dir), 2, "question is missing")


# 11. finishing needs no second copy of the disk space --------------------------------------------

def test_finishing_on_a_full_disk_frees_the_partial_first(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    from lcc_cli import api
    from lcc_cli.format import fsio

    long = tmp_path / "long.txt"
    long.write_text("\n\n".join(f"Paragraph {i}: the tower number {i} was painted red in 18{i}0 by the engineer "
                                f"Ada. It is {i}1 metres tall." for i in range(3)))
    out = tmp_path / "o.lcc"
    real, calls = fsio.os.link, []

    def link(src, dst):
        calls.append(dst)
        if len(calls) == 1 and (tmp_path / "o.lcc.partial").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fsio.os, "link", link)
    api.compile_file(long, out, fast_config(segment_tokens=80, ratio=4, steps=1), run=run_opts(tiny_model_dir))
    assert out.exists() and not (tmp_path / "o.lcc.partial").exists() and len(calls) == 2


# 12. misleading messages -------------------------------------------------------------------------

def test_directories_fifos_and_devices_are_named_for_what_they_are(tmp_path, tiny_model_dir, compiled):
    os.mkfifo(tmp_path / "fifo.lcc")
    (tmp_path / "dir.lcc").mkdir()
    assert_error(run("inspect", tmp_path / "dir.lcc"), 5, "not a regular file")
    assert_error(run("inspect", tmp_path / "fifo.lcc"), 5, "not a regular file")
    assert_error(run("inspect", "/dev/zero"), 5, "not a regular file")
    assert_error(run("verify", compiled[0], "--no-model", "--source", tmp_path / "fifo.lcc"), 7, "not a regular file")


def test_a_header_entry_that_is_not_an_object(tmp_path):
    header = json.dumps({"k.0": 5}).encode()
    (tmp_path / "e.lcc").write_bytes(len(header).to_bytes(8, "little") + header)
    assert_error(run("inspect", tmp_path / "e.lcc"), 5, "is not an object")


def test_compile_reads_stdin(tmp_path, tiny_model_dir):
    from conftest import DOC

    result = run("compile", "-", "-o", tmp_path / "s.lcc", "--model", tiny_model_dir, "--steps", "1", "--ratio", "8",
                 "--compiler", "none", "--json", input=DOC)
    assert result.exit_code == 0, result.stderr
    assert fmt.load_cartridge(tmp_path / "s.lcc").manifest["source"]["name"] == "stdin"


def test_a_huge_document_needs_yes(tmp_path, tiny_model_dir):
    big = tmp_path / "big.txt"
    big.write_text("The tower is tall and red. " * 40_000)
    assert_error(run("compile", big, "-o", tmp_path / "b.lcc", "--model", tiny_model_dir, "--compiler", "none",
                     "--segment-tokens", "512"), 2, "--yes")
    assert not (tmp_path / "b.lcc").exists()


# 13. a busy machine ----------------------------------------------------------------------------

def test_auto_threads_leave_the_cores_other_programs_use(monkeypatch):
    from lcc_cli.progress import Progress
    from lcc_cli.runtime import threads as th

    monkeypatch.setattr(th, "cpu_count", lambda: 2)
    monkeypatch.setattr(th.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    clock = {"busy": 0, "total": 0, "own": 0}
    monkeypatch.setattr(th, "_busy_jiffies", lambda: (clock["busy"], clock["total"]))
    monkeypatch.setattr(th, "_own_jiffies", lambda: clock["own"])
    try:
        auto = th.AutoThreads(Progress(), every=0)
        clock.update(busy=200, total=200, own=100)  # both cores busy, half of it ours: one core is someone else's
        auto.advance("steps")
        assert torch.get_num_threads() == 1 and auto.threads == 1
        clock.update(busy=300, total=400, own=200)  # the other program stopped
        auto.advance("steps")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

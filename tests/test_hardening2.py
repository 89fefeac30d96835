"""Hardening, round 2: the surfaces added after the first round (batch folders, export and
import, compiler files, training and eval inputs). Each case asserts its exit code, one
stderr line, no traceback, and that inputs and earlier outputs are intact."""

from __future__ import annotations

import hashlib

import torch
import json
import shutil
from pathlib import Path

from conftest import DOC
from test_hardening import assert_error, run


def _digests(*paths: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# 1. batch output names ------------------------------------------------------------------------

def test_batch_output_names_never_collide(tmp_path, tiny_model_dir):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    sources = [tmp_path / "x" / "doc.txt", tmp_path / "y" / "doc.txt", tmp_path / "doc-2.txt"]
    for i, s in enumerate(sources):
        s.write_text(DOC + f" Copy {i}.")
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.lcc").write_bytes(b"an earlier output, not named by this batch")
    before = _digests(*sources, out / "earlier.lcc")
    result = run("compile", *sources, "-o", f"{out}/", "--force", "--steps", "1", "--ratio", "8", "--compiler", "none",
                 "--model", tiny_model_dir, "--json")
    assert result.exit_code == 0, result.stderr
    docs = json.loads(result.stdout)["documents"]
    names = [Path(d["output"]).name for d in docs]
    assert names == ["doc.lcc", "doc-2.lcc", "doc-2-2.lcc"] and all(d["status"] == "done" for d in docs)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["earlier.lcc"])
    assert _digests(*sources, out / "earlier.lcc") == before
    # each cartridge holds its own source
    from lcc_cli.format.cartridge import load_cartridge

    for d in docs:
        sha = hashlib.sha256(Path(d["source"]).read_bytes()).hexdigest()
        assert load_cartridge(Path(d["output"])).manifest["source"]["sha256"] == sha


# 2. inputs are never outputs -------------------------------------------------------------------

def test_import_refuses_to_overwrite_its_own_adapter(compiled, tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    assert run("export", compiled[0], "--to", "peft", adapter).exit_code == 0
    files = sorted(adapter.iterdir())
    before = _digests(*files)
    result = run("import", adapter, "-o", adapter / "adapter_model.safetensors", "--force", "--model", tiny_model_dir)
    assert_error(result, 2, "input")
    assert _digests(*files) == before


def test_export_refuses_to_overwrite_the_cartridge_it_reads(compiled, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cart = adapter / "adapter_model.safetensors"  # a cartridge that happens to sit where the export writes
    shutil.copy(compiled[0], cart)
    before = _digests(cart)
    assert_error(run("export", cart, "--to", "peft", adapter, "--force"), 2, "input")
    assert _digests(cart) == before and sorted(p.name for p in adapter.iterdir()) == ["adapter_model.safetensors"]


# 3. export writes all three files or none ------------------------------------------------------

def test_export_force_checks_every_target_before_writing(compiled, tmp_path):
    adapter = tmp_path / "adapter"
    assert run("export", compiled[0], "--to", "peft", adapter).exit_code == 0
    (adapter / "lcc_manifest.json").unlink()
    (adapter / "lcc_manifest.json").mkdir()  # cannot be replaced by a file
    kept = _digests(adapter / "adapter_config.json", adapter / "adapter_model.safetensors")
    assert_error(run("export", compiled[0], "--to", "peft", adapter, "--force"), 2, "lcc_manifest.json")
    assert _digests(adapter / "adapter_config.json", adapter / "adapter_model.safetensors") == kept
    assert not [p for p in adapter.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_export_into_a_new_directory_leaves_no_staging_folder(compiled, tmp_path):
    assert run("export", compiled[0], "--to", "peft", tmp_path / "new").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lcc_manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


# 6 and 11. adapters: oversized JSON, impossible shapes -------------------------------------------

def _adapter(compiled, tmp_path) -> Path:
    adapter = tmp_path / "adapter"
    assert run("export", compiled[0], "--to", "peft", adapter).exit_code == 0
    return adapter


def test_an_oversized_adapter_config_is_refused_unread(compiled, tmp_path, tiny_model_dir):
    from test_hardening import max_rss_mb

    adapter = _adapter(compiled, tmp_path)
    with open(adapter / "adapter_config.json", "r+b") as f:
        f.truncate(200 << 20)  # sparse: 200 MB on paper
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, "bytes")
    code, peak, err = max_rss_mb(["import", str(adapter), "-o", str(tmp_path / "o.lcc"), "--model", str(tiny_model_dir)])
    assert code == 5 and peak < 1000, (code, peak, err)  # torch alone is a few hundred MB; 200 MB read is more
    assert not (tmp_path / "o.lcc").exists()


def test_an_adapters_lcc_manifest_that_is_huge_or_incomplete_is_refused(compiled, tmp_path, tiny_model_dir):
    """lcc_manifest.json is optional, but one that is there is read and trusted for provenance:
    too large, or missing the model it was made for, is exit 5, never dropped or exit 1."""
    adapter = _adapter(compiled, tmp_path)
    original = (adapter / "lcc_manifest.json").read_bytes()
    manifest = json.loads(original)
    manifest["model"].pop("id")
    manifest["model"]["fingerprint"] = "0" * 64  # another model: the check that once read model['id']
    (adapter / "lcc_manifest.json").write_text(json.dumps(manifest))
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, "model.id")
    (adapter / "lcc_manifest.json").write_bytes(original)
    with open(adapter / "lcc_manifest.json", "r+b") as f:
        f.truncate(200 << 20)
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, "bytes")
    assert not (tmp_path / "o.lcc").exists()


def test_import_checks_the_adapter_before_loading_a_model(compiled, tmp_path):
    """The adapter's own files are judged first: with a model path that does not exist, the
    error is still the adapter's (a model load would have failed on the path)."""
    adapter = _adapter(compiled, tmp_path)
    _edit_config(adapter, peft_type="LORA")
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tmp_path / "no-model"), 5, "LORA")


def _edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_adapter_shapes_that_cannot_be_served_are_refused(compiled, tmp_path, tiny_model_dir):
    adapter = _adapter(compiled, tmp_path)
    for changes, fragment in (({"num_virtual_tokens": 10**6}, "window"), ({"num_virtual_tokens": 2.5}, "integer"),
                              ({"token_dim": 63}, "divisible")):
        original = (adapter / "adapter_config.json").read_text()
        _edit_config(adapter, **changes)
        assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, fragment)
        (adapter / "adapter_config.json").write_text(original)
    assert not (tmp_path / "o.lcc").exists()


# 4, 9 and 10. compiler files: counts, fields and values checked before use ---------------------

def _resign_compiler(src: Path, out: Path, edit=None, tensors=None) -> Path:
    from test_hardening import resign

    return resign(src, out, edit, tensors, key="lcc_compiler")


def _set(path, value):
    def edit(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        if value is _DROP:
            node.pop(path[-1])
        else:
            node[path[-1]] = value
    return edit


_DROP = object()


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def trained_compiler(tmp_path_factory, tiny_model_dir):
    import os

    from conftest import run_opts
    from lcc_cli import api
    from test_pretrained import ROWS, small

    d = tmp_path_factory.mktemp("compiler")
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    old = os.environ.get("LCC_HOME")
    os.environ["LCC_HOME"] = str(d / "home")
    try:
        api.train_compiler([d / "train.jsonl"], d / "c.safetensors", small(steps=1), run=run_opts(tiny_model_dir))
    finally:
        os.environ.pop("LCC_HOME") if old is None else os.environ.__setitem__("LCC_HOME", old)
    return d / "c.safetensors"


@pytest.mark.parametrize("edit, fragment", [
    (_set(["compiler", "lora_rank"], 10**6), "lora_rank"),
    (_set(["compiler", "lora_alpha"], float("nan")), "lora_alpha"),
    (_set(["model", "id"], _DROP), "model id"),
    (_set(["training"], "a string"), "training"),
    (_set(["compiler"], ["a", "list"]), "compiler settings"),
])
def test_a_lying_compiler_file_is_refused_before_anything_is_built(trained_compiler, tmp_path, tiny_model_dir,
                                                                   edit, fragment):
    from test_hardening import max_rss_mb

    bad = _resign_compiler(trained_compiler, tmp_path / "bad.safetensors", edit)
    assert_error(run("inspect", bad), 5, fragment)
    code, peak, _ = max_rss_mb(["inspect", str(bad)])
    assert code == 5 and peak < 1000  # a rank of 10^6 once allocated 3.2 GB before failing
    doc = tmp_path / "d.txt"
    doc.write_text(DOC)
    assert_error(run("compile", doc, "-o", tmp_path / "o.lcc", "--compiler", bad, "--steps", "0",
                     "--model", tiny_model_dir), 5, fragment)
    assert not (tmp_path / "o.lcc").exists()


@pytest.mark.parametrize("edit", [
    _set(["training", "tokens"], _DROP),
    _set(["training", "objective"], ["a", "list"]),
    _set(["training", "data"], "a string"),
])
def test_a_compiler_with_odd_training_notes_still_inspects(trained_compiler, tmp_path, edit):
    """The training table only describes the run: a field missing or of another type shows as
    '?' in `lcc inspect` (exit 0), never an unexpected error."""
    odd = _resign_compiler(trained_compiler, tmp_path / "odd.safetensors", edit)
    r = run("inspect", odd)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "objective" in r.output


def test_a_compiler_whose_targets_name_no_module_is_refused(trained_compiler, tmp_path, tiny_model_dir):
    def rename(tensors):
        return {k.replace("q_proj", "nope_proj"): v for k, v in tensors.items()}

    bad = _resign_compiler(trained_compiler, tmp_path / "bad.safetensors",
                           _set(["compiler", "lora_targets"], ["nope_proj", "k_proj", "v_proj", "o_proj"]), rename)
    doc = tmp_path / "d.txt"
    doc.write_text(DOC)
    assert_error(run("compile", doc, "-o", tmp_path / "o.lcc", "--compiler", bad, "--steps", "0",
                     "--model", tiny_model_dir), 5, "nope_proj")


def test_huge_compiler_weights_never_write_an_unusable_cartridge(trained_compiler, tmp_path, tiny_model_dir):
    bad = _resign_compiler(trained_compiler, tmp_path / "huge.safetensors",
                           tensors=lambda t: {k: (v * 1e30 if k.startswith("lora.") and "lora_B" in k else v)
                                              for k, v in t.items()})
    doc = tmp_path / "d.txt"
    doc.write_text(DOC)
    assert_error(run("compile", doc, "-o", tmp_path / "o.lcc", "--compiler", bad, "--steps", "0",
                     "--model", tiny_model_dir), 5, "huge.safetensors")
    assert not list(tmp_path.glob("o.lcc*"))


def test_lora_targets_naming_no_module_fail_before_work(tmp_path, tiny_model_dir):
    doc = tmp_path / "d.txt"
    doc.write_text(DOC)
    (tmp_path / "c.toml").write_text('[compile]\nlora_targets = ["nope_proj"]\nsteps = 1\n')
    (tmp_path / "d.jsonl").write_text(json.dumps({"context": DOC, "questions": [{"q": "a", "answers": ["b"]}]}) + "\n")
    result = run("eval", tmp_path / "d.jsonl", "--config", tmp_path / "c.toml", "--compiler", "none",
                 "--out", tmp_path / "out", "--model", tiny_model_dir)
    assert_error(result, 2, "nope_proj")
    assert not (tmp_path / "out" / "docs").exists() or not list((tmp_path / "out" / "docs").iterdir())


# 5, 7 and 8. long inputs are refused by their length in characters, before tokenising ----------

def test_an_enormous_question_is_refused_before_tokenising(compiled, tmp_path, tiny_model_dir):
    from test_hardening import max_rss_mb

    (tmp_path / "q.txt").write_text("short question\n" + "why " * 2_000_000 + "\n")
    code, peak, err = max_rss_mb(["ask", str(compiled[0]), "--questions", str(tmp_path / "q.txt"),
                                  "--model", str(tiny_model_dir)])
    assert code == 2 and "question 2 of q.txt" in err and "characters" in err and "Traceback" not in err
    assert peak < 1500
    result = run("ask", compiled[0], "-", "--model", tiny_model_dir, input="why " * 100_000)
    assert_error(result, 2, "characters")


def test_two_questions_are_both_checked_before_the_first_answer(compiled, tmp_path, tiny_model_dir):
    (tmp_path / "q.txt").write_text("Who built it?\n" + "why " * 5000 + "\n")
    result = run("ask", compiled[0], "--questions", tmp_path / "q.txt", "--model", tiny_model_dir)
    assert_error(result, 2, "window")
    assert result.stdout.strip() == ""


def test_an_eval_row_with_a_huge_context_names_its_line(tmp_path, tiny_model_dir):
    from test_hardening import max_rss_mb

    rows = [{"context": "x", "questions": [{"q": "a", "answers": ["b"]}]},
            {"context": "word " * 2_000_000, "questions": [{"q": "a", "answers": ["b"]}]}]  # 10 MB
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert_error(run("eval", tmp_path / "d.jsonl", "--out", tmp_path / "out", "--model", tiny_model_dir), 3,
                 "line 2")
    code, peak, err = max_rss_mb(["eval", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "out"),
                                  "--model", str(tiny_model_dir)])
    assert code == 3 and peak < 1200, (code, peak, err)  # tokenised, 10 MB cost about 2 GB


def test_a_huge_training_context_is_cut_at_load():
    """train-compiler keeps at most a few segments of a document: a 10 MB context is cut in
    characters when read, before anything tokenises it."""
    import tempfile

    from lcc_cli.training.data import MAX_CONTEXT_CHARS, read_training_data

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        path.write_text(json.dumps({"context": "word " * 2_000_000, "questions": [{"q": "x" * 50_000}]}) + "\n")
        (row,), _ = read_training_data([path])
    assert len(row.text) <= MAX_CONTEXT_CHARS < 10_000_000 and len(row.questions[0]["q"]) <= 2000


def test_a_million_eval_methods_are_refused_at_once(tmp_path, tiny_model_dir):
    (tmp_path / "d.jsonl").write_text(json.dumps({"context": "x", "questions": [{"q": "a", "answers": ["b"]}]}) + "\n")
    (tmp_path / "m.toml").write_text("".join(f'[[eval.methods]]\nlabel = "m{i}"\n' for i in range(1000)))
    assert_error(run("eval", tmp_path / "d.jsonl", "--config", tmp_path / "m.toml", "--out", tmp_path / "out",
                     "--model", tiny_model_dir), 2, "at most 64")
    (tmp_path / "m.toml").write_text("".join(f'[[eval.methods]]\nlabel = "m{i}"\n' for i in range(10**6)))
    assert_error(run("eval", tmp_path / "d.jsonl", "--config", tmp_path / "m.toml", "--out", tmp_path / "out",
                     "--model", tiny_model_dir), 2, "bytes")  # by its size, unparsed (parsing took a minute)


# smaller things: messages that say what is wrong ------------------------------------------------

def test_adapter_files_that_are_not_files_are_named_for_what_they_are(compiled, tmp_path, tiny_model_dir):
    import os

    adapter = _adapter(compiled, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.unlink()
    os.symlink("/dev/zero", weights)
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, "not a regular file")
    weights.unlink()
    os.symlink(weights, weights)  # a loop
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, "cannot read")
    weights.unlink()
    os.symlink(tmp_path / "gone", weights)
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, "dangling")


def test_an_adapter_without_peft_type_says_so(compiled, tmp_path, tiny_model_dir):
    adapter = _adapter(compiled, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.pop("peft_type")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_error(run("import", adapter, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 5, "names no peft_type")


def test_a_bad_toml_value_names_the_file_not_a_flag(tmp_path, tiny_model_dir):
    (tmp_path / "d.jsonl").write_text(json.dumps({"context": "x", "questions": [{"q": "a", "answers": ["b"]}]}) + "\n")
    (tmp_path / "bad.toml").write_text('[eval]\nratios = "eight"\n')
    result = run("eval", tmp_path / "d.jsonl", "--config", tmp_path / "bad.toml", "--out", tmp_path / "o",
                 "--model", tiny_model_dir)
    assert_error(result, 2, "bad.toml")
    assert "--ratios" not in result.stderr
    (tmp_path / "bad.toml").write_text('[compile]\nnope = 1\n')
    result = run("eval", tmp_path / "d.jsonl", "--config", tmp_path / "bad.toml", "--out", tmp_path / "o",
                 "--model", tiny_model_dir)
    assert_error(result, 2, "nope")
    assert "::" not in result.stderr


def test_a_dangling_symlink_as_output_is_named(tmp_path, tiny_model_dir):
    import os

    doc = tmp_path / "d.txt"
    doc.write_text(DOC)
    os.symlink(tmp_path / "nowhere", tmp_path / "o.lcc")
    assert_error(run("compile", doc, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 2, "dangling")


def test_binary_questions_on_stdin_are_not_utf8(compiled, tiny_model_dir):
    result = run("ask", compiled[0], "--questions", "-", "--model", tiny_model_dir, input=b'{"q": "\xff\xfe"}\n')
    assert_error(result, 3, "UTF-8")


def test_a_pickled_model_is_refused_without_advice_to_unpickle(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    for f in model.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    doc = tmp_path / "d.txt"
    doc.write_text(DOC)
    result = run("compile", doc, "-o", tmp_path / "o.lcc", "--model", model)
    assert_error(result, 4, "safetensors")
    assert "weights_only" not in result.stderr


def test_a_folder_that_cannot_be_listed_is_reported_in_the_batch_summary(tmp_path, tiny_model_dir, monkeypatch):
    import os

    (tmp_path / "lib" / "ok").mkdir(parents=True)
    (tmp_path / "lib" / "locked").mkdir()
    (tmp_path / "lib" / "ok" / "a.txt").write_text(DOC)
    (tmp_path / "lib" / "locked" / "b.txt").write_text(DOC)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root reads every folder; this is what a user sees
    result = run("compile", tmp_path / "lib", "-o", f"{tmp_path / 'out'}/", "--steps", "1", "--compiler", "none",
                 "--model", tiny_model_dir, "--json")
    assert result.exit_code == 10, result.stderr
    docs = json.loads(result.stdout)["documents"]
    assert [d["status"] for d in docs] == ["failed", "done"]
    assert docs[0]["source"].endswith("locked") and "Permission denied" in docs[0]["reason"]


def test_tampered_checkpoints_are_damaged_not_unexpected(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from test_pretrained import ROWS

    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    args = ["train-compiler", data, "-o", tmp_path / "c.safetensors", "--steps", "2", "--batch", "2",
            "--lora-rank", "4", "--checkpoint-every", "1", "--stop-after", "1", "--model", tiny_model_dir]
    env_home = tmp_path / "home"
    import os

    os.environ["LCC_HOME"] = str(env_home)
    try:
        assert run(*args).exit_code == 0
        ckpt = tmp_path / "c.safetensors.ckpt"
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_file(str(ckpt / "state.safetensors"))
        for name, change in (("schedule a string", lambda s, t: s.__setitem__("scheduler", "x")),
                             ("optimiser tensor of the wrong shape",
                              lambda s, t: t.__setitem__(next(k for k in t if k.startswith("adam.")), torch.zeros(3))),
                             ("no slot bias", lambda s, t: t.pop("slot_bias"))):
            s, t = json.loads(json.dumps(state)), dict(tensors)
            change(s, t)
            (ckpt / "state.json").write_text(json.dumps(s))
            save_file(t, str(ckpt / "state.safetensors"), metadata={"step": str(s["step"])})
            assert_error(run(*args[:-4], "--stop-after", "2", "--resume", "--force", "--model", tiny_model_dir), 2,
                         "damaged")
    finally:
        os.environ.pop("LCC_HOME")


def test_lcc_home_that_is_a_file_and_a_method_compiler_that_is_a_number(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "home").write_text("a file")
    monkeypatch.setenv("LCC_HOME", str(tmp_path / "home"))
    doc = tmp_path / "d.txt"
    doc.write_text(DOC)
    assert_error(run("compile", doc, "-o", tmp_path / "o.lcc", "--model", tiny_model_dir), 2, "not a directory")
    monkeypatch.delenv("LCC_HOME")
    (tmp_path / "d.jsonl").write_text(json.dumps({"context": "x", "questions": [{"q": "a", "answers": ["b"]}]}) + "\n")
    (tmp_path / "m.toml").write_text('[[eval.methods]]\nlabel = "x"\ncompiler = 5\n')
    assert_error(run("eval", tmp_path / "d.jsonl", "--config", tmp_path / "m.toml", "--out", tmp_path / "o",
                     "--model", tiny_model_dir), 2, "compiler must be text")


def test_lcc_home_that_cannot_be_written_costs_only_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    """LCC_HOME below a file (what an unwritable folder looks like to root, who runs CI): the
    teacher cache cannot be written, and training finishes (saying so on a terminal) instead of
    exit 1."""
    from test_pretrained import ROWS

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("LCC_HOME", str(tmp_path / "afile" / "home"))
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    r = run("train-compiler", data, "-o", tmp_path / "c.safetensors", "--steps", "1", "--batch", "2",
            "--lora-rank", "4", "--model", tiny_model_dir)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and (tmp_path / "c.safetensors").is_file()


def test_chat_and_questions_on_stdin_refuse_an_enormous_line_by_its_length(compiled, tiny_model_dir):
    """chat says so and goes on to the next question; `--questions -` refuses the file."""
    line = "why " * 100_000
    result = run("chat", compiled[0], "--model", tiny_model_dir, "--max-new-tokens", "2",
                 input=line + "\nWho built it?\n")
    assert result.exit_code == 0 and "characters" in result.stderr and "Traceback" not in result.output
    assert result.stdout.strip()  # the second question was answered
    assert_error(run("ask", compiled[0], "--questions", "-", "--model", tiny_model_dir, input="short?\n" + line + "\n"),
                 2, "characters")

"""The Python API (`import lcc`), used as a user would, with the tiny model."""

from __future__ import annotations

import json

import pytest

import lcc
from conftest import DOC

FILLER = " ".join(f"Boat number {i} is painted blue and sails at noon." for i in range(6))
TEXT = FILLER + " " + DOC
QUESTION = "Who is the engineer Ada Pellinger?"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lcc.load_model(str(tiny_model_dir))


def test_every_public_name_is_documented():
    assert lcc.__all__ and all(getattr(lcc, name).__doc__ for name in lcc.__all__
                               if callable(getattr(lcc, name)) and not name.startswith("_"))


def test_compile_a_text_in_memory_save_it_and_ask_it(model, tmp_path):
    cart = model.compile(text=TEXT, ratio=4)
    assert cart.indexed and cart.pages == 9 and cart.path is None
    reader = model.reader(cart, budget=24)
    answer = reader.ask(QUESTION, max_new_tokens=4)
    assert isinstance(answer, lcc.Answer) and isinstance(answer.text, str)
    assert answer.pages and all(isinstance(p, lcc.Page) for p in answer.pages)
    assert any("Ada Pellinger" in p.text for p in answer.pages) and answer.seconds_to_first_token > 0
    saved = cart.save(tmp_path / "doc.lcc")
    again = model.reader(saved, budget=24).ask(QUESTION, max_new_tokens=4)
    assert again.text == answer.text and [(p.page, p.text) for p in again.pages] == [(p.page, p.text) for p in
                                                                                      answer.pages]
    assert again.pages[0].cartridge == "doc.lcc"
    assert lcc.inspect(saved)["manifest"]["source"]["token_count"] == cart.tokens


def test_compile_a_file_and_bytes_with_a_progress_callback(model, tmp_path):
    (tmp_path / "d.md").write_text(TEXT)
    seen = []
    cart = model.compile(tmp_path / "d.md", output=tmp_path / "d.lcc", progress=lambda *e: seen.append(e))
    assert cart.path == tmp_path / "d.lcc" and cart.path.is_file()
    assert ("windows", 1, 1) in seen  # the document's encoding, counted
    from_bytes = model.compile(data=TEXT.encode(), name="d.md")
    assert from_bytes.manifest["source"]["sha256"] == cart.manifest["source"]["sha256"]
    with pytest.raises(lcc.OutputExistsError):
        model.compile(tmp_path / "d.md", output=tmp_path / "d.lcc")
    with pytest.raises(lcc.UsageError):
        model.compile(text=TEXT, data=b"x")
    with pytest.raises(lcc.UsageError, match="ratio"):
        model.compile(text=TEXT, ratio=0)


def test_many_questions_a_stream_and_a_library(model, tmp_path):
    library = tmp_path / "lib"
    library.mkdir()
    model.compile(text=TEXT, output=library / "harbor.lcc", ratio=4)
    model.compile(text="The old mill grinds wheat. The miller is Rosa Hild. " + FILLER, output=library / "mill.lcc")
    lcc.index(library, model=model)
    reader = model.reader(library, budget=24)
    assert reader.mode == "library"
    many = reader.ask_many([QUESTION, "Who is the miller Rosa Hild?"], max_new_tokens=3)
    assert [p.cartridge for p in many[1].pages] == ["mill.lcc"]
    pieces = list(reader.stream(QUESTION, max_new_tokens=4))
    assert "".join(pieces).strip() == reader.last.text.strip()
    assert reader.last.to_dict("library")["pages"][0]["cartridge"] == "harbor.lcc"


def test_verify_and_typed_errors(model, tmp_path):
    cart = model.compile(text=TEXT, output=tmp_path / "d.lcc")
    report = lcc.verify_cartridge(cart.path, model=model)
    assert report.ok and "page-kv" in [c.name for c in report.checks]
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True
    (tmp_path / "bad.lcc").write_bytes(b"not a cartridge")
    with pytest.raises(lcc.CartridgeError) as caught:
        model.reader(tmp_path / "bad.lcc")
    assert caught.value.exit_code == 5
    with pytest.raises(lcc.UsageError):
        model.reader(cart).ask("   ")


def test_the_readme_python_example_runs(tiny_model_dir, monkeypatch, tmp_path):
    """The README's Python example, as written, with LCC_MODEL pointing at the tiny model."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("LCC_MODEL", str(tiny_model_dir))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    import lcc_cli.api

    lcc_cli.api._models.clear()
    exec(compile(code, "README.md", "exec"), {})

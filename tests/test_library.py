"""Libraries (issue 30): a folder of indexed cartridges, its SQLite FTS5 index, asked as one."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import run_opts
from lcc_cli import api
from lcc_cli.cli import app
from lcc_cli.config import ReadConfig
from lcc_cli.library.index import INDEX_NAME, Library

DOCS = {
    "harbor": "The lighthouse stands on a granite spur at the edge of the bay. It was completed in 1868 by the "
              "engineer Ada Pellinger. The tower is 41 metres tall.",
    "quarry": "The granite quarry ships stone by rail to the city. It opened in 1902 under the mason Tomas Reyes. "
              "Its deepest pit is 80 metres.",
    "mill": "The old mill grinds wheat for the village bakery. Its wheel turns on the river Aske. The miller is "
            "Rosa Hild.",
}


def _library(tmp_path, tiny_model_dir, docs=DOCS) -> Path:
    sources = []
    for name, text in docs.items():
        (tmp_path / f"{name}.txt").write_text(text)
        sources.append(tmp_path / f"{name}.txt")
    folder = tmp_path / "lib"
    api.compile_paths(sources, folder, {"ratio": 4.0, "index": True, "gist": False}, compiler="truncate",
                      run=run_opts(tiny_model_dir))
    return folder


def _ask(folder, tiny_model_dir, question, budget=12):
    r = CliRunner().invoke(app, ["ask", str(folder), question, "--model", str(tiny_model_dir), "--budget",
                                 str(budget), "--json", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_a_compiled_folder_is_a_library_asked_as_one(tmp_path, tiny_model_dir):
    folder = _library(tmp_path, tiny_model_dir)
    assert (folder / INDEX_NAME).is_file()  # compile -o DIR/ --index keeps the index
    lib = Library(folder)
    assert {c["name"] for c in lib.cartridges()} == {"harbor.lcc", "quarry.lcc", "mill.lcc"}
    got = _ask(folder, tiny_model_dir, "Who is the miller Rosa Hild?")
    assert got["mode"] == "library"
    # the best page, its part that the budget holds
    assert [(p["cartridge"], p["source"]) for p in got["pages"]] == [("mill.lcc", "mill.txt")]
    assert "The miller is Rosa Hild.".startswith(got["pages"][0]["text"]) and "miller" in got["pages"][0]["text"]
    got = _ask(folder, tiny_model_dir, "Which mason, Tomas Reyes, opened the quarry?", budget=30)
    assert all(p["cartridge"] == "quarry.lcc" for p in got["pages"]) and got["pages"]


def test_updates_go_by_checksum_and_removed_cartridges_leave(tmp_path, tiny_model_dir):
    folder = _library(tmp_path, tiny_model_dir)
    lib = Library(folder)
    assert lib.refresh().added == []  # nothing changed
    mill = folder / "mill.lcc"
    st = mill.stat()
    os.utime(mill, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: not re-indexed
    assert lib.refresh().replaced == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "mill.txt").write_text("The new mill saws timber. Its sawyer is Ines Dorn.")
    api.compile_file(other / "mill.txt", other / "mill.lcc", {"ratio": 4.0, "index": True, "gist": False},
                     compiler="truncate", run=run_opts(tiny_model_dir))
    shutil.copy(other / "mill.lcc", mill)
    result = lib.refresh()
    assert result.replaced == ["mill.lcc"]
    assert lib.search("sawyer Ines Dorn")[0].cartridge == "mill.lcc"
    assert not lib.search("Rosa Hild")
    (folder / "quarry.lcc").unlink()
    assert lib.refresh().removed == ["quarry.lcc"] and not lib.search("Tomas Reyes")
    assert lib.db.execute("SELECT count(*) FROM page_text").fetchone()[0] == \
        lib.db.execute("SELECT count(*) FROM pages").fetchone()[0]  # no text left behind


def test_a_page_is_never_read_from_a_cartridge_changed_since_it_was_indexed(tmp_path, tiny_model_dir, tiny_loaded):
    from lcc_cli.runtime.memory.library import LibraryMemory

    folder = _library(tmp_path, tiny_model_dir)
    lib = Library(folder)
    lib.refresh()
    memory = LibraryMemory(tiny_loaded, lib, ReadConfig(budget=12))
    other = tmp_path / "other"
    other.mkdir()
    (other / "mill.txt").write_text("The new mill saws timber. The miller now is Ines Dorn.")
    api.compile_file(other / "mill.txt", other / "mill.lcc", {"ratio": 4.0, "index": True, "gist": False},
                     compiler="truncate", run=run_opts(tiny_model_dir))
    st = (folder / "mill.lcc").stat()
    (folder / "mill.lcc").write_bytes((other / "mill.lcc").read_bytes())  # in place: same inode
    os.utime(folder / "mill.lcc", ns=(st.st_atime_ns, st.st_mtime_ns))  # and its old time stamp
    memory.view("Who is the miller?")
    pages = memory.read_pages("Who is the miller?")
    # re-indexed, then read (the page's part that the budget holds)
    assert len(pages) == 1 and "The miller now is Ines Dorn.".startswith(pages[0].text) and "now" in pages[0].text


def test_an_interrupted_update_leaves_the_old_index(tmp_path, tiny_model_dir, monkeypatch):
    folder = _library(tmp_path, tiny_model_dir)
    lib = Library(folder)
    before = lib.cartridges()
    shutil.copy(folder / "harbor.lcc", folder / "harbor-copy.lcc")
    real = Library._put

    def interrupted(self, name, cart, st):
        real(self, name, cart, st)
        raise KeyboardInterrupt  # Ctrl-C after the rows are written, before the commit

    monkeypatch.setattr(Library, "_put", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lib.refresh()
    monkeypatch.setattr(Library, "_put", real)
    again = Library(folder)
    assert again.cartridges() == before
    assert again.refresh().added == ["harbor-copy.lcc"]


def test_a_damaged_index_is_rebuilt_from_the_cartridges(tmp_path, tiny_model_dir):
    folder = _library(tmp_path, tiny_model_dir)
    for suffix in ("-wal", "-shm"):
        Path(str(folder / INDEX_NAME) + suffix).unlink(missing_ok=True)
    (folder / INDEX_NAME).write_bytes(b"this is not a database" * 100)
    lib = Library(folder)
    assert lib.refresh().added == ["harbor.lcc", "mill.lcc", "quarry.lcc"]
    r = CliRunner().invoke(app, ["index", str(folder), "--json", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0 and json.loads(r.stdout)["cartridges"] == 3


def test_two_processes_indexing_at_once_agree(tmp_path, tiny_model_dir):
    folder = _library(tmp_path, tiny_model_dir)
    for suffix in ("", "-wal", "-shm"):
        Path(str(folder / INDEX_NAME) + suffix).unlink(missing_ok=True)
    for i in range(4):
        shutil.copy(folder / "harbor.lcc", folder / f"copy-{i}.lcc")
    cmd = [sys.executable, "-m", "lcc_cli", "index", str(folder), "--json", "--model", str(tiny_model_dir)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lib = Library(folder)
    assert len(lib.cartridges()) == 7
    pages = lib.db.execute("SELECT count(*) FROM pages").fetchone()[0]
    assert pages == sum(c["pages"] for c in lib.cartridges())
    assert lib.db.execute("SELECT count(*) FROM page_text").fetchone()[0] == pages


def test_a_folder_with_no_indexed_cartridge_says_so(tmp_path, tiny_model_dir, compiled):
    folder = tmp_path / "plain"
    folder.mkdir()
    shutil.copy(compiled[0], folder / "plain.lcc")
    r = CliRunner().invoke(app, ["index", str(folder), "--model", str(tiny_model_dir)])
    assert r.exit_code == 0 and "skipped plain.lcc" in r.stderr and "not an indexed" in r.stderr
    r = CliRunner().invoke(app, ["ask", str(folder), "q?", "--model", str(tiny_model_dir)])
    assert r.exit_code == 2 and "no indexed cartridges" in r.stderr


def test_chat_and_questions_files_read_the_library_too(tmp_path, tiny_model_dir):
    folder = _library(tmp_path, tiny_model_dir)
    chat = CliRunner().invoke(app, ["chat", str(folder), "--model", str(tiny_model_dir), "--max-new-tokens", "3",
                                    "--budget", "12", "--show-pages"], input="Who is the miller Rosa Hild?\nexit\n")
    assert chat.exit_code == 0 and "ready (library)" in chat.stderr and "mill.lcc" in chat.stdout
    (tmp_path / "qs.txt").write_text("Who is the miller Rosa Hild?\nWhich mason, Tomas Reyes?\n")
    r = CliRunner().invoke(app, ["ask", str(folder), "--questions", str(tmp_path / "qs.txt"), "--model",
                                 str(tiny_model_dir), "--max-new-tokens", "3", "--budget", "12"])
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["pages"][0]["cartridge"] for row in rows] == ["mill.lcc", "quarry.lcc"]


def test_of_two_pages_that_match_alike_the_one_whose_document_is_about_the_question_wins(tmp_path, tiny_model_dir):
    same = "The keeper lit the lamp at dusk."
    folder = _library(tmp_path, tiny_model_dir, {
        "a_bakery": f"The bakery sells rye bread every morning. {same}",
        "b_lighthouse": f"The lighthouse tower guards the harbour rocks. {same} The tower lamp burned oil."})
    lib = Library(folder)
    hits = [h for h in lib.search("Which keeper lit the tower lamp at dusk?") if h.text == same]
    assert [h.cartridge for h in hits] == ["b_lighthouse.lcc", "a_bakery.lcc"]
    # each cartridge's whole text leaves with it
    (folder / "b_lighthouse.lcc").unlink()
    lib.refresh()
    assert lib.db.execute("SELECT count(*) FROM cartridge_text").fetchone()[0] == 1
    assert {h.cartridge for h in lib.search("Which keeper lit the tower lamp at dusk?")} == {"a_bakery.lcc"}


def _open_index_at(folder: str, start: float, out) -> None:
    while time.time() < start:
        pass
    try:
        Library(folder).db
        out.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
        out.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_opening_a_new_index_at_once_both_wait_their_turn(tmp_path):
    # SQLite answers "locked" at once (no busy handler) when two connections switch a new
    # file to WAL together: before the fix about half of these rounds failed
    ctx = multiprocessing.get_context("fork")
    results = []
    for i in range(20):
        folder = tmp_path / f"lib{i}"
        folder.mkdir()
        out, start = ctx.Queue(), time.time() + 0.2
        procs = [ctx.Process(target=_open_index_at, args=(str(folder), start, out)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        results += [out.get(timeout=5) for _ in procs]
    assert results == ["ok"] * 40, [r for r in results if r != "ok"][:3]

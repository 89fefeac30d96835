"""Hardening round 4 (issue 39): pages that cannot lie, a library index that is never trusted,
a server that never 500s."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from conftest import DOC, run_opts
from lcc_cli import api
from lcc_cli.cli import app
from lcc_cli.format import cartridge as fmt
from lcc_cli.library.index import INDEX_NAME, Library

FILLER = " ".join(f"Boat number {i} is painted blue and sails at noon." for i in range(6))
DOCS = {"harbor": FILLER + " " + DOC, "mill": "The old mill grinds wheat for the village bakery. Its wheel turns on "
                                              "the river Aske. The miller is Rosa Hild. " + FILLER}
QUESTION = "Who is the engineer Ada Pellinger?"


@pytest.fixture
def library(tmp_path, tiny_model_dir) -> Path:
    sources = []
    for name, text in DOCS.items():
        (tmp_path / f"{name}.txt").write_text(text)
        sources.append(tmp_path / f"{name}.txt")
    folder = tmp_path / "lib"
    api.compile_paths(sources, folder, {"ratio": 4.0}, run=run_opts(tiny_model_dir))
    return folder


def _ask(target, tiny_model_dir, question=QUESTION, *extra):
    r = CliRunner().invoke(app, ["ask", str(target), question, "--model", str(tiny_model_dir), "--json",
                                 "--max-new-tokens", "3", "--budget", "12", *extra])
    return r


def _edit(path: Path, out: Path, edit) -> Path:
    """`path` with `edit(manifest, tensors)` applied and every checksum recomputed, as anyone can."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        manifest = json.loads(f.metadata()["lcc_manifest"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(manifest, tensors)
    out.write_bytes(fmt.seal(manifest, fmt.reblock(manifest, tensors)))
    return out


# --- 1. the server never compares tensors to find a job ------------------------------------------


def test_twelve_concurrent_library_requests_all_answer(library, tiny_model_dir):
    from test_serve import Running

    server = Running(api.load(run_opts(tiny_model_dir)), [library])
    try:
        codes = []

        def ask():
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
                "model": "library", "max_tokens": 3, "messages": [{"role": "user", "content": QUESTION}]})
            codes.append(r.status_code)

        threads = [threading.Thread(target=ask) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 12
    finally:
        server.stop()


def test_cancelling_a_job_never_compares_its_tensors(tiny):
    import asyncio

    from lcc_cli.runtime.reading import View
    from lcc_cli.serve.engine import Engine, Job
    from lcc_cli.buffer import Buffer

    engine = Engine(tiny)
    try:
        def job():
            buffer = Buffer([torch.zeros(2, 3, 16)], [torch.zeros(2, 3, 16)], torch.arange(3))
            return Job((), View(buffer), [1, 2], 2, 0.0, 0, None, asyncio.new_event_loop(), None)

        waiting, other = job(), job()
        with engine._cv:  # two jobs queued, neither taken (the engine thread waits on this lock)
            engine._pending += [waiting, other]
        engine.cancel(other)  # dataclass equality would compare the buffers: "ambiguous" RuntimeError
        assert engine._pending == [waiting]
        with engine._cv:
            engine._pending.clear()
    finally:
        engine.stop()


# --- 2. the library index only chooses --------------------------------------------------------


def test_an_index_row_pointing_at_another_page_is_not_read_or_shown(library, tiny_model_dir):
    want = json.loads(_ask(library, tiny_model_dir).stdout)["pages"]
    db = sqlite3.connect(library / INDEX_NAME)
    # every row of harbor's pages now claims the entries and text of its first page
    first = db.execute("SELECT p.start, p.entries FROM pages p JOIN cartridges c ON c.id = p.cartridge "
                       "WHERE c.name = 'harbor.lcc' ORDER BY p.number LIMIT 1").fetchone()
    db.execute("UPDATE pages SET start = ?, entries = ? WHERE cartridge = (SELECT id FROM cartridges WHERE name = "
               "'harbor.lcc')", first)
    db.execute("UPDATE page_text SET text = 'engineer Bob Smithers ' || text WHERE rowid IN (SELECT p.id FROM pages p "
               "JOIN cartridges c ON c.id = p.cartridge WHERE c.name = 'harbor.lcc')")
    db.commit()
    db.close()
    got = json.loads(_ask(library, tiny_model_dir).stdout)["pages"]
    assert got == want and "Bob Smithers" not in json.dumps(got)  # read and shown from the cartridge
    rows = Library(library).db.execute("SELECT count(*) FROM page_text WHERE text LIKE '%Smithers%'").fetchone()[0]
    assert rows == 0  # the rows that disagreed were indexed again


def test_index_rows_of_the_wrong_type_are_never_used(library, tiny_model_dir):
    db = sqlite3.connect(library / INDEX_NAME)
    db.execute("UPDATE pages SET entries = 'many', start = -5")
    db.commit()
    db.close()
    r = _ask(library, tiny_model_dir)
    assert r.exit_code == 0, r.stderr
    assert any("Ada Pellinger" in p["text"] for p in json.loads(r.stdout)["pages"])


# --- 3. no writing through a link --------------------------------------------------------------


def test_lcc_never_writes_through_a_linked_index(library, tiny_model_dir, tmp_path):
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE pages(keep TEXT)")
    db.execute("INSERT INTO pages VALUES ('precious')")
    db.commit()
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(library / INDEX_NAME) + suffix).unlink(missing_ok=True)
    (library / INDEX_NAME).symlink_to(other)
    before = other.read_bytes()
    for args in (["index", str(library)], ["ask", str(library), QUESTION]):
        r = CliRunner().invoke(app, [*args, "--model", str(tiny_model_dir)])
        assert r.exit_code == 5 and "symbolic link" in r.stderr and "--rebuild" in r.stderr
        assert "Traceback" not in r.stderr
    assert other.read_bytes() == before
    r = CliRunner().invoke(app, ["index", str(library), "--rebuild", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.stderr
    assert not (library / INDEX_NAME).is_symlink() and other.read_bytes() == before


# --- 4. a damaged index is rebuilt, and --rebuild always works ---------------------------------------


@pytest.mark.parametrize("damage", ["DROP TABLE pages", "DROP TABLE page_text", "DELETE FROM meta"])
def test_a_damaged_index_is_rebuilt_from_the_cartridges(library, tiny_model_dir, damage):
    db = sqlite3.connect(library / INDEX_NAME)
    db.execute(damage)
    db.commit()
    db.close()
    r = _ask(library, tiny_model_dir)
    assert r.exit_code == 0, r.stderr
    assert any("Ada Pellinger" in p["text"] for p in json.loads(r.stdout)["pages"])
    db = sqlite3.connect(library / INDEX_NAME)
    db.execute(damage)
    db.commit()
    db.close()
    r = CliRunner().invoke(app, ["index", str(library), "--rebuild", "--model", str(tiny_model_dir), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["cartridges"] == 2, r.stderr


# --- 5. one lying cartridge never takes the library down -------------------------------------------


@pytest.mark.parametrize("lie", ["shape", "ids"])
def test_a_cartridge_the_model_cannot_read_is_skipped_not_served(library, tiny_model_dir, lie):
    def edit(m, t):
        if lie == "shape":
            m["model"]["rope"]["rope_theta"] = 500000.0  # not the model's; its fingerprint still the model's
        else:
            t["index.token_ids"] = t["index.token_ids"].clone()
            t["index.token_ids"][-20:] = 10_000  # past the tiny vocabulary

    liar = library / "liar.lcc"
    _edit(library / "harbor.lcc", liar, edit)
    r = CliRunner().invoke(app, ["index", str(library), "--model", str(tiny_model_dir)])
    assert r.exit_code == 0 and "skipped liar.lcc" in r.stderr
    r = _ask(library, tiny_model_dir)
    assert r.exit_code == 0, r.stderr
    assert all(p["cartridge"] != "liar.lcc" for p in json.loads(r.stdout)["pages"])
    alone = _ask(liar, tiny_model_dir)
    assert alone.exit_code == (6 if lie == "shape" else 5) and "Traceback" not in alone.stderr


# --- 6. verify checks what a page says against what it stores -------------------------------------


def _special(m, t):
    t["index.token_ids"] = t["index.token_ids"].clone()
    page = m["index"]["pages"][2]
    t["index.token_ids"][page["start"]] = 1  # <eos>: a special token inside a page


def _swap(m, t):
    a, b = m["index"]["pages"][1], m["index"]["pages"][2]
    n = min(a["entries"], b["entries"])
    for key in ("k", "v", "v.scale"):
        x = t[key].clone()
        x[a["start"]:a["start"] + n], x[b["start"]:b["start"] + n] = t[key][b["start"]:b["start"] + n], \
            t[key][a["start"]:a["start"] + n]
        t[key] = x


def _retext(m, t):
    m["index"]["pages"][7]["text"] = m["index"]["pages"][7]["text"].replace("Ada Pellinger", "Bob Smithers")


def _reids(m, t):
    t["index.token_ids"] = t["index.token_ids"].clone()
    p = m["index"]["pages"][1]
    t["index.token_ids"][p["start"]:p["start"] + 3] = t["index.token_ids"][p["start"] + 3:p["start"] + 6].clone()


def _scale(m, t):
    t["v.scale"] = -t["v.scale"]


def _no_pages(m, t):
    m["index"]["pages"] = []


@pytest.mark.parametrize("edit, check", [(_retext, "page-text"), (_reids, "page-text"), (_special, "tokens"),
                                         (_swap, "page-kv"), (_scale, "values"), (_no_pages, "index")])
def test_verify_finds_a_page_that_lies(library, tiny_model_dir, tmp_path, edit, check):
    good = CliRunner().invoke(app, ["verify", str(library / "harbor.lcc"), "--model", str(tiny_model_dir), "--json"])
    assert good.exit_code == 0, good.stdout
    names = [c["name"] for c in json.loads(good.stdout)["checks"]]
    assert {"index", "tokens", "page-text", "page-kv"} <= set(names)
    bad = _edit(library / "harbor.lcc", tmp_path / "bad.lcc", edit)
    r = CliRunner().invoke(app, ["verify", str(bad), "--model", str(tiny_model_dir), "--json"])
    assert r.exit_code == 7, r.stdout
    failed = [c for c in json.loads(r.stdout)["checks"] if c["ok"] is False]
    assert failed[0]["name"] == check


# --- 9. a question that matches no page ------------------------------------------------------------


def test_a_library_question_that_matches_no_page_is_answered_without_it(library, tiny_model_dir):
    r = _ask(library, tiny_model_dir, "zzz qqq?")
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["pages"] == [] and got["answer"] is not None
    shown = CliRunner().invoke(app, ["ask", str(library), "zzz qqq?", "--model", str(tiny_model_dir),
                                     "--max-new-tokens", "2", "--show-pages"])
    assert shown.exit_code == 0 and "no page" in shown.stderr


# --- 10. gist cartridges: the budget is the pages' and a cut page shows its own tokens -------------


def test_a_gist_does_not_take_the_pages_budget_and_a_cut_page_shows_its_tokens(tmp_path, tiny_model_dir):
    (tmp_path / "d.txt").write_text(DOCS["harbor"])
    cart = tmp_path / "d.lcc"
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "d.txt"), "-o", str(cart), "--index", "--gist",
                                 "--compiler", "truncate", "--model", str(tiny_model_dir), "--json"])
    assert r.exit_code == 0, r.stderr
    budget = json.loads(r.stdout)["index"]["budget"]
    got = json.loads(CliRunner().invoke(app, ["ask", str(cart), QUESTION, "--model", str(tiny_model_dir), "--json",
                                              "--max-new-tokens", "2"]).stdout)
    assert got["pages"] and sum(p["entries"] for p in got["pages"]) <= max(budget, 64)
    cut = json.loads(CliRunner().invoke(app, ["ask", str(cart), QUESTION, "--model", str(tiny_model_dir), "--json",
                                              "--max-new-tokens", "2", "--budget", "4", "--floor", "0"]).stdout)
    (page,) = cut["pages"]
    assert page["entries"] == 4 and "Ada Pellinger".startswith(page["text"].split()[-1]) or \
        page["text"] in "It was completed in 1868 by the engineer Ada Pellinger."


# --- 8. chat as a REPL: Ctrl-C cancels the answer, commands ---------------------------------------


def test_ctrl_c_in_chat_cancels_the_answer_and_the_session_goes_on(library, tiny_model_dir, monkeypatch):
    from lcc_cli.workflows.asking import Reader

    real, calls = Reader.ask, []

    def ask(self, question, cfg=None, on_text=None):
        calls.append(question)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first answer is written
        return real(self, question, cfg, on_text)

    monkeypatch.setattr(Reader, "ask", ask)
    r = CliRunner().invoke(app, ["chat", str(library), "--model", str(tiny_model_dir), "--max-new-tokens", "2"],
                           input=f"{QUESTION}\n{QUESTION}\n/quit\n")
    assert r.exit_code == 0, r.stderr
    assert "(cancelled)" in r.stderr and len(calls) == 2


def test_chat_commands_show_pages_change_the_budget_and_explain_themselves(library, tiny_model_dir):
    r = CliRunner().invoke(app, ["chat", str(library), "--model", str(tiny_model_dir), "--max-new-tokens", "2"],
                           input=f"/help\n/pages\n/budget 12\n{QUESTION}\n/pages\n/budget x\n/nope\n")
    assert r.exit_code == 0, r.stderr
    assert "/budget N" in r.stdout and "nothing asked yet" in r.stderr
    assert "now reads 12 entries" in r.stderr and "whole number" in r.stderr and "unknown command" in r.stderr
    assert "[harbor.lcc p" in r.stdout and "Ada Pellinger" in r.stdout  # /pages after the answer


# --- 7. progress a user can see ------------------------------------------------------------------


def test_a_batch_of_indexed_documents_reports_each_ones_seconds(library, tiny_model_dir, tmp_path):
    for name, text in DOCS.items():
        (tmp_path / f"{name}.txt").write_text(text)
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "harbor.txt"), str(tmp_path / "mill.txt"), "-o",
                                 str(tmp_path / "out") + "/", "--model", str(tiny_model_dir), "--json"])
    assert r.exit_code == 0, r.stderr
    items = json.loads(r.stdout)["documents"]
    assert [i["status"] for i in items] == ["done", "done"] and all(i["seconds"] > 0 for i in items)

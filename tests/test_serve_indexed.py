"""`lcc serve` with indexed cartridges and a library: per-request pages, named in the response."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from conftest import run_opts
from lcc_cli import api
from lcc_cli.config import AskConfig, ReadConfig
from lcc_cli.format.cartridge import open_cartridge

QUESTION = "When was the lighthouse completed by Ada Pellinger?"
TEXTS = {
    "harbor": "The lighthouse stands on a granite spur at the edge of the bay. It was completed in 1868 by the "
              "engineer Ada Pellinger. The tower is 41 metres tall.",
    "mill": "The old mill grinds wheat for the village bakery. Its wheel turns on the river Aske. The miller is "
            "Rosa Hild.",
}


def _indexed(folder, tmp_path, tiny_model_dir, name, text):
    (tmp_path / f"{name}.txt").write_text(text)
    api.compile_file(tmp_path / f"{name}.txt", folder / f"{name}.lcc", {"ratio": 4.0, "index": True, "gist": False},
                     compiler="truncate", run=run_opts(tiny_model_dir), force=True)
    return folder / f"{name}.lcc"


@pytest.fixture
def server(tmp_path, tiny_model_dir):
    from test_serve import Running

    folder = tmp_path / "served"
    folder.mkdir()
    for name, text in TEXTS.items():
        _indexed(folder, tmp_path, tiny_model_dir, name, text)
    loaded = api.load(run_opts(tiny_model_dir))
    # three-sentence documents are under the floor (a read of one would take all of it): these
    # tests are about the pages a question chooses, so the server reads without a floor
    running = Running(loaded, [folder], read=ReadConfig(floor=0))
    yield running, folder, loaded
    running.stop()


def _chat(server, model, question, **extra):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": question}], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_an_indexed_cartridge_reads_the_pages_its_question_chose(server):
    running, folder, loaded = server
    got = _chat(running, "harbor", QUESTION)
    assert [p["text"] for p in got["lcc"]["pages"]] == ["It was completed in 1868 by the engineer Ada Pellinger."]
    want = api.ask([QUESTION], [folder / "harbor.lcc"], cfg=AskConfig(max_new_tokens=8), loaded=loaded,
                   read=ReadConfig(floor=0))[0]
    assert got["choices"][0]["message"]["content"] == want.text
    models = httpx.get(running.url + "/v1/models", timeout=30).json()["data"]
    card = next(m for m in models if m["id"] == "harbor")["lcc"]
    assert card["indexed"] is True and card["pages"] == 3
    library = next(m for m in models if m["id"] == "library")["lcc"]
    assert library["library"] is True and library["cartridges"] == 2 and library["pages"] == 6
    plain = _chat(running, loaded.model_id, QUESTION)
    assert "lcc" not in plain  # no pages: the plain model read none


def test_streaming_names_the_pages_on_its_last_chunk(server):
    running, _, _ = server
    with httpx.stream("POST", running.url + "/v1/chat/completions", timeout=60,
                      json={"model": "library", "max_tokens": 4, "stream": True,
                            "messages": [{"role": "user", "content": "Who is the miller Rosa Hild?"}]}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    import json

    last = json.loads(lines[-1][6:])
    assert last["choices"][0]["finish_reason"] and last["lcc"]["pages"][0]["cartridge"] == "mill.lcc"


def test_the_library_sees_a_new_cartridge_and_never_a_replaced_one(server, tmp_path, tiny_model_dir):
    running, folder, _ = server
    got = _chat(running, "library", "Who is the miller Rosa Hild?")
    # the best page (the part of it that the budget holds)
    assert [p["cartridge"] for p in got["lcc"]["pages"]] == ["mill.lcc"]
    assert "The miller is Rosa Hild.".startswith(got["lcc"]["pages"][0]["text"])
    _indexed(folder, tmp_path, tiny_model_dir, "quarry", "The quarry opened in 1902 under the mason Tomas Reyes.")
    got = _chat(running, "library", "Which mason is Tomas Reyes?")  # dropped in: indexed on this request
    assert got["lcc"]["pages"][0]["cartridge"] == "quarry.lcc"
    other = tmp_path / "other"
    other.mkdir()
    _indexed(other, tmp_path, tiny_model_dir, "mill", "The new mill saws timber. The miller now is Ines Dorn.")
    shutil.copyfile(other / "mill.lcc", folder / "mill.lcc")  # replaced under the running server
    got = _chat(running, "library", "Who is the miller now?")
    texts = [p["text"] for p in got["lcc"]["pages"]]
    # the page read is the new file's page (its number, size and text), never the old one's
    new_pages = open_cartridge(folder / "mill.lcc").manifest["index"]["pages"]
    read = got["lcc"]["pages"]
    assert [p["cartridge"] for p in read] == ["mill.lcc"] and not any("Rosa" in t for t in texts)
    assert new_pages[read[0]["page"]]["text"] == "The miller now is Ines Dorn."
    assert read[0]["page_entries"] == new_pages[read[0]["page"]]["entries"]
    assert new_pages[read[0]["page"]]["text"].startswith(read[0]["text"])


def test_requests_that_chose_different_pages_decode_in_one_batch(server, monkeypatch):
    running, folder, loaded = server
    engine = running.engine
    questions = [QUESTION, "How tall is the tower, 41 metres?", "What stands on the granite spur at the bay?"]
    want = {q: api.ask([q], [folder / "harbor.lcc"], cfg=AskConfig(max_new_tokens=8), loaded=loaded,
                       read=ReadConfig(floor=0))[0].text for q in questions}
    gate, real = threading.Event(), engine._run
    monkeypatch.setattr(engine, "_run", lambda group: (gate.wait(30), real(group)))
    before = list(engine.batch_sizes)
    got = {}
    threads = [threading.Thread(target=lambda q=q: got.__setitem__(q, _chat(running, "harbor", q)))
               for q in questions]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while engine.load() < len(questions) and time.time() < deadline:
        time.sleep(0.02)
    gate.set()
    for t in threads:
        t.join()
    assert len({tuple(p["text"] for p in g["lcc"]["pages"]) for g in got.values()}) == 3  # three different page sets
    assert {q: g["choices"][0]["message"]["content"] for q, g in got.items()} == want
    sizes = engine.batch_sizes[len(before):]
    assert max(sizes) >= 2, sizes


def test_a_request_reads_with_its_own_budget_through_the_openai_client(tmp_path, tiny_model_dir):
    from openai import BadRequestError, OpenAI
    from test_serve import Running

    folder = tmp_path / "served"
    folder.mkdir()
    filler = " ".join(f"Boat number {i} is painted blue and sails at noon." for i in range(12))
    _indexed(folder, tmp_path, tiny_model_dir, "harbor", filler + " " + TEXTS["harbor"] + " " + filler)
    server = Running(api.load(run_opts(tiny_model_dir)), [folder])
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        ask = {"model": "harbor", "max_tokens": 3, "messages": [{"role": "user", "content": QUESTION}]}
        wide = client.chat.completions.create(**ask, extra_body={"lcc": {"budget": 64}}).model_extra["lcc"]
        narrow = client.chat.completions.create(**ask, extra_body={"lcc": {"budget": 24}})
        narrow = narrow.model_extra["lcc"]
        assert wide["read"]["budget"] == 64 and wide["read"]["entries"] == sum(p["entries"] for p in wide["pages"])
        assert 40 < wide["read"]["entries"] <= 64 and narrow["read"]["entries"] < wide["read"]["entries"]
        plain = client.chat.completions.create(**ask, extra_body={"lcc": {"prefix": False, "pages": False}})
        assert "pages" not in plain.model_extra["lcc"] and plain.model_extra["lcc"]["prefix"] is None
        for bad in ({"budget": "64"}, {"budget": 0}, {"budget": 8, "ratio": 4}, {"bogus": 1}, {"selector": "magic"}):
            with pytest.raises(BadRequestError):
                client.chat.completions.create(**ask, extra_body={"lcc": bad})
    finally:
        server.stop()

"""Indexed cartridges (issue 29): the document's own KV in pages, each question reading its own."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import DOC, run_opts
from lcc_cli import api
from lcc_cli.cli import app
from lcc_cli.config import ReadConfig
from lcc_cli.retrieval import chunks_of
from lcc_cli.format.cartridge import load_cartridge, open_cartridge
from lcc_cli.runtime.memory import open_memory
from lcc_cli.runtime.memory.paged import Paged, Source

TEXT = ("The lighthouse stands on a granite spur at the edge of the bay. It was completed in 1868 by the engineer "
        "Ada Pellinger. The tower is 41 metres tall and painted in red and white bands.\n\n"
        "The harbour has a stone quay. Fishing boats leave it at dawn. The ferry crosses the bay twice a day.")


def _compile(tmp_path, tiny_model_dir, name="doc", text=TEXT, **settings):
    src = tmp_path / f"{name}.txt"
    src.write_text(text)
    out = tmp_path / f"{name}.lcc"
    # float32 and key summaries unless a test asks otherwise: exact comparisons, every selector
    settings = {"ratio": 4.0, "index": True, "gist": False, "kv_dtype": "float32", "key_summaries": True, **settings}
    api.compile_file(src, out, settings, compiler="truncate", run=run_opts(tiny_model_dir))
    return out


def _logits(loaded, buffer, question="Who designed the lighthouse?"):
    from lcc_cli.runtime.cache import forward, make_cache

    ids = loaded.prompter.query_ids(question)
    with torch.no_grad():
        return forward(loaded.model, make_cache(buffer.cache_layers()), buffer.first_query_position,
                       input_ids=torch.tensor([ids]))[0]


def _document_logits(loaded, text, question="Who designed the lighthouse?"):
    from lcc_cli.runtime.cache import forward, make_cache

    ids = loaded.prompter.context_ids(text) + loaded.prompter.query_ids(question)
    with torch.no_grad():
        return forward(loaded.model, make_cache(None), 0, input_ids=torch.tensor([ids]))[0, -len(
            loaded.prompter.query_ids(question)):]


@pytest.fixture
def indexed(tmp_path, tiny_model_dir):
    return _compile(tmp_path, tiny_model_dir)


def test_pages_cover_the_document_and_carry_their_text(indexed, tiny_loaded):
    f = open_cartridge(indexed)
    m = f.manifest
    index = m["index"]
    assert m["buffer"]["layout"] == "indexed" and not m["buffer"]["segments"]
    assert len(index["windows"]) == 1 and index["windows"][0]["position_start"] == 0
    ids = tiny_loaded.prompter.context_ids(TEXT)
    assert m["buffer"]["total_slots"] == len(ids) == m["source"]["token_count"]
    pages = index["pages"]
    (h0, h1), (t0, t1) = index["always"]
    assert h0 == 0 and t1 == len(ids)
    # pages tile the document's tokens, in order, between the header and the end of the turn
    assert pages[0]["start"] == h1 and pages[-1]["start"] + pages[-1]["entries"] == t0
    assert all(a["start"] + a["entries"] == b["start"] for a, b in zip(pages, pages[1:]))
    assert [p["text"] for p in pages[:2]] == ["The lighthouse stands on a granite spur at the edge of the bay.",
                                              "It was completed in 1868 by the engineer Ada Pellinger."]
    assert f.index["index.token_ids"].tolist() == ids
    assert tuple(f.index["index.key_mean"].shape) == (len(pages), 2, 2, 16)


def _kv(memory, question, loaded):
    """What a question reads, as KV: its view with any re-encoded tokens encoded (as the
    reading engine encodes them, in the question's pass), in position order."""
    return memory.view(question).settled(loaded).buffer


def test_at_a_budget_of_the_whole_document_it_answers_as_the_document_in_the_prompt(indexed, tiny_loaded):
    """Every page chosen, re-laid consecutively: the pages tile the document, so each entry is
    back at the position it was encoded at, and the question reads exactly the KV that the
    document in the prompt gives (exact re-rotation, nothing lost)."""
    memory = open_memory([open_cartridge(indexed)], tiny_loaded, read=ReadConfig(budget=10_000))
    view = _kv(memory, "Who designed the lighthouse?", tiny_loaded)
    assert view.positions.tolist() == list(range(view.slots))
    torch.testing.assert_close(_logits(tiny_loaded, view), _document_logits(tiny_loaded, TEXT), rtol=1e-4, atol=1e-4)
    # EPIC repair re-encodes each page's first tokens after the pages before it: with every
    # page in place that is the very context they were encoded in, so nothing changes
    repaired = open_memory([open_cartridge(indexed)], tiny_loaded, read=ReadConfig(budget=10_000, repair=4))
    torch.testing.assert_close(_kv(repaired, "Who designed the lighthouse?", tiny_loaded).keys[1], view.keys[1],
                               rtol=1e-4, atol=1e-4)


def _repaired_page_by_page(loaded, buffer, key, first_page, repair, ids):
    """EPIC as the paper runs it, one page after another: the reference for the one-pass repair."""
    from lcc_cli.buffer import Buffer
    from lcc_cli.runtime.cache import cache_layers, forward, make_cache

    keys, values, at = [k.clone() for k in buffer.keys], [v.clone() for v in buffer.values], first_page
    for page, n in key:
        r = min(repair, n)
        prefix = Buffer([k[:, :at] for k in keys], [v[:, :at] for v in values], buffer.positions[:at])
        cache = make_cache(prefix.cache_layers())
        with torch.no_grad():
            forward(loaded.model, cache, int(buffer.positions[at]),
                    input_ids=torch.tensor([ids[page.start:page.start + r].tolist()]))
        for layer, (k, v) in enumerate(cache_layers(cache)):
            keys[layer][:, at:at + r], values[layer][:, at:at + r] = k[0, :, -r:], v[0, :, -r:]
        at += n
    return keys, values


@pytest.mark.parametrize("repair", [2, 256])
def test_repair_reencodes_each_page_after_the_pages_before_it(indexed, tiny_loaded, repair):
    """Two pages that were not neighbours, read together: the one-pass repair gives what
    re-encoding page after page gives, and repairing whole pages gives their text prefilled."""
    question = "When did Ada Pellinger complete it? Does the harbour have a stone quay?"
    plain = open_memory([open_cartridge(indexed)], tiny_loaded, read=ReadConfig(budget=44, reencode=0))
    key = plain.choose(question)
    assert len(key) == 2 and key[0][0].start + key[0][1] < key[1][0].start
    view = _kv(plain, question, tiny_loaded)
    ids = open_cartridge(indexed).index["index.token_ids"]
    (h0, h1), _ = open_cartridge(indexed).manifest["index"]["always"]
    repaired = _kv(open_memory([open_cartridge(indexed)], tiny_loaded,
                               read=ReadConfig(budget=44, repair=repair, reencode=0)), question, tiny_loaded)
    keys, values = _repaired_page_by_page(tiny_loaded, view, key, h1 - h0, repair, ids)
    for got, want in zip(repaired.keys + repaired.values, keys + values):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(repaired.keys[1], view.keys[1])  # the repair changed something
    if repair >= max(n for _, n in key):
        from lcc_cli.runtime.cache import prefill

        text = ids[h0:h1].tolist() + [t for page, n in key for t in ids[page.start:page.start + n].tolist()]
        layers, _ = prefill(tiny_loaded.model, text)
        torch.testing.assert_close(repaired.keys[1][:, :len(text)], layers[1][0][0], rtol=1e-4, atol=1e-4)


def test_a_short_read_is_reencoded_whole_and_a_long_one_is_read_as_stored(indexed, tiny_loaded):
    question = "When did Ada Pellinger complete it? Does the harbour have a stone quay?"

    def view(**read):
        return _kv(open_memory([open_cartridge(indexed)], tiny_loaded, read=ReadConfig(budget=44, **read)), question,
                   tiny_loaded)

    whole = view(repair=256, reencode=0)
    for got, want in zip(view().keys + view().values, whole.keys + whole.values):  # 44 entries <= 64: re-encoded
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stored = view(reencode=0)
    assert not torch.allclose(view(reencode=43).keys[1], whole.keys[1])  # 44 > 43: as stored
    torch.testing.assert_close(view(reencode=43).keys[1], stored.keys[1])
    shown = open_memory([open_cartridge(indexed)], tiny_loaded, read=ReadConfig(budget=44)).read_pages(question)
    assert [p.reencoded for p in shown] == [p.entries for p in shown] == [22, 22]
    plain = open_memory([open_cartridge(indexed)], tiny_loaded, read=ReadConfig(budget=44, reencode=0, repair=3))
    assert [p.reencoded for p in plain.read_pages(question)] == [3, 3]


def test_a_question_reads_its_own_pages_and_no_others(tmp_path, tiny_model_dir, tiny_loaded):
    filler = " ".join(f"Boat number {i} is painted blue and sails at noon." for i in range(25))
    path = _compile(tmp_path, tiny_model_dir, text=filler + " " + TEXT + " " + filler)
    f = open_cartridge(path)
    opened = f.raw.bytes_read
    memory = open_memory([f], tiny_loaded, read=ReadConfig(budget=22))
    question = "When was the lighthouse completed by Ada Pellinger?"
    view = _kv(memory, question, tiny_loaded)
    pages = memory.read_pages(question)
    assert [p.text for p in pages] == ["It was completed in 1868 by the engineer Ada Pellinger."]
    (h0, h1), (t0, t1) = f.manifest["index"]["always"]
    assert view.slots == (h1 - h0) + pages[0].entries + (t1 - t0)
    # consecutive positions: header, the page, the end of the turn, then the question
    assert view.positions.tolist() == list(range(view.slots))
    # only the blocks holding the header, the page and the end were read, each once
    block = f.manifest["buffer"]["block_entries"]
    per_entry = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in f.raw.header.items()
                    if k in ("k", "v")) // f.entries
    start = pages[0].start
    touched = {e // block for e in (*range(h0, h1), *range(start, start + pages[0].entries), *range(t0, t1))}
    assert f.entries > 10 * block and f.raw.bytes_read - opened <= len(touched) * block * per_entry
    # the same pages for questions with the same words: one key, one batch
    assert memory.key("Who completed it, Ada Pellinger?") == memory.key("Ada Pellinger completed it when?")


def test_gaps_keep_each_page_where_it_was_encoded(indexed, tiny_loaded):
    memory = open_memory([open_cartridge(indexed)], tiny_loaded, read=ReadConfig(budget=20, layout="gaps"))
    view = _kv(memory, "When was the lighthouse completed by Ada Pellinger?", tiny_loaded)
    page = memory.read_pages("When was the lighthouse completed by Ada Pellinger?")[0]
    start = open_cartridge(indexed).manifest["index"]["pages"][page.page]["start"]
    assert start in view.positions.tolist() and view.positions.tolist() != list(range(view.slots))


def test_selection_across_cartridges_is_one_ranking(tmp_path, tiny_model_dir, tiny_loaded):
    a = _compile(tmp_path, tiny_model_dir, "a", "The harbour has a stone quay. Fishing boats leave it at dawn.")
    b = _compile(tmp_path, tiny_model_dir, "b", TEXT)
    result = CliRunner().invoke(app, ["ask", str(a), str(b), "Who is the engineer Ada Pellinger?", "--model",
                                      str(tiny_model_dir), "--budget", "24", "--json", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["mode"] == "indexed"
    assert [(p["cartridge"], p["text"]) for p in payload["pages"]] == [
        ("b.lcc", "It was completed in 1868 by the engineer Ada Pellinger.")]
    shown = CliRunner().invoke(app, ["ask", str(b), "Who is the engineer Ada Pellinger?", "--model",
                                     str(tiny_model_dir), "--budget", "24", "--show-pages", "--max-new-tokens", "4"])
    assert shown.exit_code == 0 and "b.lcc p1" in shown.stdout and "Pellinger" in shown.stdout


def test_an_indexed_and_a_plain_cartridge_are_not_mixed(indexed, compiled, tiny_model_dir):
    result = CliRunner().invoke(app, ["ask", str(indexed), str(compiled[0]), "q?", "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "not indexed" in result.stderr


@pytest.mark.parametrize("mode", ["overlap", "prefix"])
def test_a_document_past_the_window_is_encoded_window_by_window(tmp_path, tiny_model_dir, tiny_loaded, mode):
    text = " ".join([TEXT] * 6)
    path = _compile(tmp_path, tiny_model_dir, text=text, window_tokens=256, window_overlap=32, window_mode=mode)
    f = open_cartridge(path)
    windows = f.manifest["index"]["windows"]
    assert len(windows) > 2
    assert all(w["position_start"] + w["entries"] <= 256 for w in windows)
    assert windows[1]["position_start"] > 0  # after the header (and the overlap) it re-read
    pages = f.manifest["index"]["pages"]
    assert all(any(w["entry_start"] <= p["start"] and p["start"] + p["entries"] <= w["entry_start"] + w["entries"]
                   for w in windows) for p in pages)  # no page spans two windows
    assert len(pages) == len(chunks_of(text))  # windows end where sentences start: none is cut in two
    memory = open_memory([f], tiny_loaded, read=ReadConfig(budget=40))
    view = _kv(memory, "When was the lighthouse completed?", tiny_loaded)
    assert view.positions.tolist() == list(range(view.slots))
    assert torch.isfinite(_logits(tiny_loaded, view)).all()


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_quantised_pages_read_close_to_the_float_ones(tmp_path, tiny_model_dir, tiny_loaded, kv):
    plain = open_memory([open_cartridge(_compile(tmp_path, tiny_model_dir, "f"))], tiny_loaded,
                        read=ReadConfig(budget=10_000))
    small = open_cartridge(_compile(tmp_path, tiny_model_dir, kv, kv_dtype=kv))
    assert small.manifest["buffer"]["dtype"] == kv
    quant = open_memory([small], tiny_loaded, read=ReadConfig(budget=10_000))
    a, b = _kv(plain, "q", tiny_loaded), _kv(quant, "q", tiny_loaded)
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert float((x - y).abs().max() / x.abs().max()) < (0.01 if kv == "int8" else 0.1)
    info = api.inspect(small.raw.path)
    assert info["bytes_per_token"] < (tmp_path / "f.lcc").stat().st_size / open_cartridge(
        tmp_path / "f.lcc").entries


def test_the_attention_selector_and_fusion_rank_every_page(indexed, tiny_loaded):
    for selector in ("attention", "fusion"):
        memory = Paged(tiny_loaded, [Source("doc", open_cartridge(indexed))], ReadConfig(budget=30, selector=selector))
        scores = memory.selector.score(memory, "Who designed the lighthouse?", memory.pages)
        assert len(scores) == len(memory.pages) and all(s > 0 for s in scores)
        assert 0 < sum(p.entries for p in memory.read_pages("Who designed the lighthouse?")) <= 30


def test_verify_checks_the_index_and_inspect_reports_bytes_per_token(indexed):
    result = CliRunner().invoke(app, ["verify", str(indexed), "--no-model"])
    assert result.exit_code == 0, result.stdout
    shown = CliRunner().invoke(app, ["inspect", str(indexed)])
    assert shown.exit_code == 0 and "bytes per document token" in shown.stdout and "pages" in shown.stdout


def test_a_gist_is_read_beside_the_pages(tmp_path, tiny_model_dir, tiny_loaded):
    path = _compile(tmp_path, tiny_model_dir, "g", gist=True)
    cart = load_cartridge(path)
    gist = sum(s["slots"] for s in cart.segments)
    assert gist > 0 and cart.manifest["index"]["always"][0][0] == gist
    memory = open_memory([open_cartridge(path)], tiny_loaded, read=ReadConfig(budget=22))  # the pages' budget
    view = _kv(memory, "When was it completed by Ada Pellinger?", tiny_loaded)
    assert torch.equal(view.values[0][:, :gist], cart.buffer.values[0][:, :gist])  # the gist comes first
    without = open_memory([open_cartridge(path)], tiny_loaded, read=ReadConfig(budget=22, gist=False))
    assert _kv(without, "When was it completed by Ada Pellinger?", tiny_loaded).slots == view.slots - gist


def test_batch_compile_in_worker_processes_and_resume_make_indexed_cartridges(tmp_path, tiny_model_dir, tiny_loaded):
    """Gist segments compile in workers; the driver adds the pages. A resumed compile (its
    partial file holds the finished gist segments) ends in the same cartridge."""
    docs = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(TEXT + (" More text." * 30 if name == "b" else ""))
        docs.append(tmp_path / f"{name}.txt")
    settings = {"ratio": 4.0, "index": True, "gist": True, "segment_tokens": 64}
    result = api.compile_paths(docs, tmp_path / "out", settings, compiler="am",
                               run=run_opts(tiny_model_dir, workers=2))
    assert [i.status for i in result.items] == ["done", "done"]
    for name in ("a", "b"):
        cart = load_cartridge(tmp_path / "out" / f"{name}.lcc")
        assert cart.manifest["buffer"]["layout"] == "indexed" and len(cart.segments) >= 1
    whole = load_cartridge(tmp_path / "out" / "b.lcc")
    assert len(whole.segments) > 1
    # interrupted after the first gist segment, then resumed: the same cartridge
    from test_build import StopAt

    from lcc_cli.errors import Interrupted
    from lcc_cli.format.cartridge import partial_path

    target = tmp_path / "resumed.lcc"
    steps = {**settings, "steps": 1}
    reference = load_cartridge(api.compile_file(docs[1], tmp_path / "ref.lcc", steps, compiler="truncate",
                                                run=run_opts(tiny_model_dir)).path)
    with pytest.raises(Interrupted):
        api.compile_file(docs[1], target, steps, compiler="truncate", run=run_opts(tiny_model_dir), progress=StopAt(1))
    assert partial_path(target).exists() and not target.exists()
    api.compile_file(docs[1], target, steps, compiler="truncate", run=run_opts(tiny_model_dir), resume=True)
    again = load_cartridge(target)
    gist = sum(seg["slots"] for seg in reference.segments)
    for x, y in zip(again.buffer.keys + again.buffer.values, reference.buffer.keys + reference.buffer.values):
        assert torch.equal(x[:, gist:], y[:, gist:])  # the pages: the same prefill, bit for bit
        torch.testing.assert_close(x[:, :gist], y[:, :gist], rtol=0, atol=1e-5)  # the gist, re-laid: float rounding
    assert again.manifest["index"] == reference.manifest["index"]


def test_the_default_indexed_cartridge_is_int8_without_key_summaries(tmp_path, tiny_model_dir, tiny_loaded):
    (tmp_path / "d.txt").write_text(TEXT)
    result = CliRunner().invoke(app, ["compile", str(tmp_path / "d.txt"), "-o", str(tmp_path / "d.lcc"), "--model",
                                      str(tiny_model_dir), "--ratio", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    f = open_cartridge(tmp_path / "d.lcc")
    assert f.manifest["buffer"]["layout"] == "indexed" and f.manifest["buffer"]["dtype"] == "int8"
    assert not f.manifest["buffer"]["segments"] and "index.key_mean" not in f.index
    memory = open_memory([f], tiny_loaded, read=ReadConfig(selector="attention"))
    with pytest.raises(Exception, match="key summaries"):
        memory.view("q")
    named = CliRunner().invoke(app, ["compile", str(tmp_path / "d.txt"), "-o", str(tmp_path / "am.lcc"), "--model",
                                     str(tiny_model_dir), "--ratio", "4", "--compiler", "am"])
    assert named.exit_code == 0 and "index" not in load_cartridge(tmp_path / "am.lcc").manifest  # a compiler asked for



@pytest.mark.parametrize("edit,fragment", [
    (lambda m, t: m["index"].__setitem__("always", []), "index.always"),
    (lambda m, t: m["source"].__setitem__("ratio", "x"), "source.ratio"),
    (lambda m, t: m["index"]["pages"][0].__setitem__("entries", 10**6), "index pages"),
    (lambda m, t: m["buffer"].__setitem__("layout", "consecutive"), "segments|index"),
    (lambda m, t: t.__setitem__("index.extra", torch.zeros(0, 10**6, 10**6)), "not one lcc knows"),
    (lambda m, t: t.__setitem__("index.key_mean", t["index.key_mean"][:1]), "index.key_mean"),
])
def test_a_lying_index_is_refused_before_it_is_used(indexed, tmp_path, edit, fragment):
    """Re-signed (the checksums are unkeyed): every index field and tensor is checked."""
    from safetensors import safe_open

    from lcc_cli.errors import CartridgeError
    from lcc_cli.format import cartridge as fmt

    with safe_open(str(indexed), "pt") as f:
        manifest = json.loads(f.metadata()["lcc_manifest"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(manifest, tensors)
    bad = tmp_path / "bad.lcc"
    bad.write_bytes(fmt.seal(manifest, fmt.reblock(manifest, tensors)))
    with pytest.raises(CartridgeError, match=fragment):
        open_cartridge(bad)


def test_a_page_cut_at_the_budget_shows_only_the_part_read(tmp_path, tiny_model_dir, tiny_loaded):
    path = _compile(tmp_path, tiny_model_dir)
    memory = open_memory([open_cartridge(path)], tiny_loaded, read=ReadConfig(budget=4, floor=0))
    page = memory.read_pages("When was the lighthouse completed by Ada Pellinger?")[0]
    assert page.entries == 4 < page.page_entries
    whole = "It was completed in 1868 by the engineer Ada Pellinger."
    assert page.text and whole.startswith(page.text.strip()) and len(page.text) < len(whole)
    result = CliRunner().invoke(app, ["ask", str(path), "When was the lighthouse completed by Ada Pellinger?",
                                      "--model", str(tiny_model_dir), "--budget", "4", "--floor", "0", "--show-pages",
                                      "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.stderr
    assert f"first 4 of {page.page_entries} entries" in result.output


def test_a_read_never_starves_below_its_floor(tmp_path, tiny_model_dir, tiny_loaded):
    """The best page alone over the budget is read whole up to the floor (a page cut mid-word
    answered "Ada P.P.P.P."), cut only past it; a document under the floor is read whole."""
    filler = " ".join(f"Boat number {i} is painted blue and sails at noon." for i in range(25))
    path = _compile(tmp_path, tiny_model_dir, text=filler + " " + TEXT)
    q = "When was the lighthouse completed by Ada Pellinger?"

    def read(**cfg):
        return open_memory([open_cartridge(path)], tiny_loaded, read=ReadConfig(budget=4, **cfg)).read_pages(q)

    (page,) = read()
    assert page.entries == page.page_entries == 22 and "Ada Pellinger" in page.text  # whole: 22 <= 64
    assert [p.entries for p in read(floor=10)] == [10]  # past the floor: cut there, not at the budget
    assert [p.entries for p in read(floor=0)] == [4]
    short = _compile(tmp_path, tiny_model_dir, "short", text="The tower is tall. It was completed in 1868 by Ada "
                                                           "Pellinger. Boats sail at noon.")  # under the floor
    whole = open_memory([open_cartridge(short)], tiny_loaded, read=ReadConfig(budget=4)).read_pages(q)
    assert len(whole) == len(open_cartridge(short).manifest["index"]["pages"])


def test_retrieval_reads_with_the_same_floor():
    from lcc_cli.retrieval import retrieve

    count = lambda t: len(t.split())  # noqa: E731
    text = "Alpha beta gamma delta epsilon zeta. " + " ".join(f"Filler sentence number {i} here." for i in range(20))
    assert retrieve(text, "gamma delta", 3, count) == "Alpha beta"  # cut at the budget (the old way)
    assert retrieve(text, "gamma delta", 3, count, floor=10) == "Alpha beta gamma delta epsilon zeta."
    assert retrieve(text, "gamma delta", 3, count, floor=4) == "Alpha beta gamma"
    assert retrieve("One two. Three four.", "x", 1, count, floor=10) == "One two. Three four."


def test_the_manifest_records_what_ran_and_what_was_stored(tmp_path, tiny_model_dir):
    # pages alone: no compiler ran, so none is named; the default storage is recorded as int8
    src = tmp_path / "doc.txt"
    src.write_text(TEXT)
    api.compile_file(src, tmp_path / "pages.lcc", {"ratio": 4.0}, run=run_opts(tiny_model_dir))
    m = open_cartridge(tmp_path / "pages.lcc").manifest
    assert m["compiler"]["name"] == "pages" and m["compile"]["kv_dtype"] == "int8" == m["buffer"]["dtype"]
    # with a gist, the compiler that made it is named
    api.compile_file(src, tmp_path / "gist.lcc", {"ratio": 4.0, "index": True, "gist": True}, compiler="truncate",
                     run=run_opts(tiny_model_dir))
    assert open_cartridge(tmp_path / "gist.lcc").manifest["compiler"]["name"] == "truncate"


def test_a_degenerate_repeat_ends_the_answer_and_a_run_of_one_token_does_not():
    from lcc_cli.runtime.decode import looping

    p, dot, ada = 5, 6, 7
    assert looping([ada, p, dot, p, dot, p, dot, p, dot], 4)  # "Ada P.P.P.P."
    assert not looping([ada, p, dot, p, dot, p, dot], 4)
    assert not looping([dot] * 12, 4)  # "............" may be text (and is the pinned greedy answer)
    assert looping([1, 2, 3] * 4, 4) and looping([1, 2, 3, 4] * 4, 4)
    assert looping([9, 1, 2, 3, 4, 5] * 3, 4) and not looping([9, 1, 2, 3, 4, 5] * 2, 4)  # a longer loop, 3 times
    assert not looping(list(range(30)), 4)


def test_the_answer_format_puts_its_words_after_the_question(tiny_loaded):
    p = tiny_loaded.prompter
    assert p.query_ids("Who?", "words") == p.query_ids("Who? Answer in a few words.")
    assert p.query_ids("Who?", "plain") == p.query_ids("Who?")


def test_the_dense_baseline_reads_the_nearest_sentences():
    from lcc_cli.runtime.dense import DenseEncoder

    encoder = DenseEncoder.shared()
    text = "Boats leave the harbour at dawn. The lighthouse was designed by the engineer Ada Pellinger. " \
           "The ferry crosses the bay twice a day."
    count = lambda t: len(t.split())  # noqa: E731
    assert encoder.retrieve(text, "Who designed the lighthouse?", 10, count) == \
        "The lighthouse was designed by the engineer Ada Pellinger."

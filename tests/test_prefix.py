"""The reading prefix (runtime/prefix.py, training/prefix.py): trained as data with the model
frozen, read before every context turn by the one reading engine, refused for another model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import DOC
from lcc_cli.cli import app
from lcc_cli.config import AskConfig, PrefixConfig, ReadConfig

PARAGRAPHS = [
    ("Harbour", "The lighthouse stands on a granite spur at the edge of the bay. It was completed in 1868 by the "
                "engineer Ada Pellinger. The tower is 41 metres tall.",
     [("Who designed the lighthouse?", "Ada Pellinger"), ("How tall is the tower?", "41 metres")]),
    ("Mill", "The old mill stands by the river. The miller is Ines Dorn. It saws timber every day.",
     [("Who is the miller?", "Ines Dorn"), ("What does the mill saw?", "timber")]),
    ("Quay", "The harbour has a stone quay. Fishing boats leave it at dawn and return at noon.",
     [("When do the boats leave?", "at dawn"), ("What is the quay made of?", "stone")]),
]
TINY = dict(steps=4, warmup=0, lr=1e-2, qa_rows=2, kl_rows=2, validate_every=2, validate_questions=2, checkpoint_every=2,
            heldout_articles=1, response_tokens=4, answer_tokens=4, long_documents=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix-data") / "train.jsonl"
    path.write_text("".join(json.dumps({"id": t, "title": t, "context": c,
                                        "questions": [{"q": q, "answers": [a]} for q, a in qs]}) + "\n"
                            for t, c, qs in PARAGRAPHS))
    return path


@pytest.fixture(scope="module")
def trained(data, tiny_model_dir, tmp_path_factory):
    from lcc_cli.runtime.model import load_model
    from lcc_cli.training.prefix import train_prefix

    loaded = load_model(str(tiny_model_dir))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = tmp_path_factory.mktemp("prefix") / "tiny.prefix"
    result = train_prefix(loaded, [data], out, PrefixConfig(**TINY))
    return loaded, before, out, result


def test_training_moves_the_prefix_and_never_the_model(trained):
    from lcc_cli.format.prefix_file import load_prefix

    loaded, before, out, result = trained
    assert result.steps == 4 and out.is_file()
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())  # frozen, bit for bit
    f = load_prefix(out)
    init = loaded.prompter.encode(PrefixConfig().init)
    assert f.entries == len(init) and len(f.keys) == loaded.facts.num_layers
    from lcc_cli.runtime.cache import prefill

    start, _ = prefill(loaded.model, init)
    assert (f.keys[1].float() - start[1][0][0].float()).abs().max() > 5e-3  # trained away from its start
    m = f.manifest
    assert m["model"]["fingerprint"] == loaded.fingerprint and m["training"]["selected_step"] in (2, 4)
    assert {"val_f1", "general_f1"} <= set(m["training"]["validation"])


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(trained, data, tmp_path):
    from lcc_cli.format.prefix_file import load_prefix
    from lcc_cli.training.prefix import train_prefix

    loaded, _, out, _ = trained
    half = tmp_path / "half.prefix"
    train_prefix(loaded, [data], half, PrefixConfig(**TINY), stop_after=2)
    assert not half.exists() and (tmp_path / "half.prefix.ckpt" / "state.json").is_file()
    train_prefix(loaded, [data], half, PrefixConfig(**TINY), resume=True)
    a, b = load_prefix(out), load_prefix(half)
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))


def test_the_trainer_reads_exactly_what_the_engine_reads(trained, tmp_path, tiny_model_dir):
    """Teacher-forced on the engine's own greedy answer, the trainer's forward picks every one
    of its tokens: the same prefix, view, re-encoded pages, positions and mask."""
    from lcc_cli.api import compile_file
    from lcc_cli.runtime.memory import open_memory
    from lcc_cli.runtime.prefix import open_prefix
    from lcc_cli.runtime.reading import Row, answer_rows
    from lcc_cli.training.prefix import row_logits

    from conftest import run_opts

    loaded, _, out, _ = trained
    (tmp_path / "d.txt").write_text(DOC + " The harbour has a stone quay. Fishing boats leave it at dawn.")
    compile_file(tmp_path / "d.txt", tmp_path / "d.lcc", {"ratio": 2.0}, run=run_opts(tiny_model_dir))
    prefix = open_prefix(loaded, out)
    q = "Who designed the lighthouse?"
    for read in (ReadConfig(budget=30), ReadConfig(budget=30, reencode=0)):  # pages re-encoded, and stored
        view = open_memory([tmp_path / "d.lcc"], loaded, read=read).view(q)
        prompt = loaded.prompter.query_ids(q)
        answer = answer_rows(loaded, [Row(view, prompt, q)], AskConfig(max_new_tokens=6), prefix)[0]
        tokens = answer.token_ids[:5]
        assert answer.kv_positions == prefix.slots + view.stored
        with torch.no_grad():
            logits = row_logits(loaded, [(k.float(), v.float()) for k, v in zip(prefix.buffer.keys,
                                                                                prefix.buffer.values)],
                                [view], [prompt + tokens], len(tokens) + 1)
        assert logits[0].argmax(-1).tolist()[:len(tokens)] == tokens


def test_ask_reads_a_prefix_file_says_so_and_reads_without_it_when_told(trained, tmp_path, tiny_model_dir):
    _, _, out, _ = trained
    (tmp_path / "d.txt").write_text(DOC)
    cart = tmp_path / "d.lcc"
    assert CliRunner().invoke(app, ["compile", str(tmp_path / "d.txt"), "-o", str(cart), "--model",
                                    str(tiny_model_dir)]).exit_code == 0
    base = ["ask", str(cart), "Who designed the lighthouse?", "--model", str(tiny_model_dir), "--json",
            "--max-new-tokens", "3"]
    with_prefix = CliRunner().invoke(app, base + ["--prefix-file", str(out)])
    assert with_prefix.exit_code == 0, with_prefix.stderr
    read = json.loads(with_prefix.stdout)
    without = json.loads(CliRunner().invoke(app, base + ["--prefix-file", str(out), "--no-prefix"]).stdout)
    plain = json.loads(CliRunner().invoke(app, base).stdout)  # no prefix is shipped for the tiny model
    assert read["prefix"].startswith("tiny") and without["prefix"] is None and plain["prefix"] is None
    no_document = CliRunner().invoke(app, ["ask", "Who?", "--model", str(tiny_model_dir), "--json",
                                           "--max-new-tokens", "2", "--prefix-file", str(out)])
    assert json.loads(no_document.stdout)["prefix"] is None  # the plain model's answers stay its own
    entries = _entries(out)
    assert read["kv_positions"] == without["kv_positions"] + entries


def test_a_prefix_for_another_model_or_a_damaged_one_is_refused(trained, tmp_path, other_model_dir, tiny_model_dir):
    _, _, out, _ = trained
    (tmp_path / "d.txt").write_text(DOC)
    ask = ["ask", "--context", str(tmp_path / "d.txt"), "Who?", "--max-new-tokens", "2", "--prefix-file"]
    other = CliRunner().invoke(app, ask + [str(out), "--model", str(other_model_dir)])
    assert other.exit_code == 6 and "was made for model" in other.stderr and "Traceback" not in other.stderr
    broken = tmp_path / "broken.prefix"
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    broken.write_bytes(bytes(data))
    damaged = CliRunner().invoke(app, ask + [str(broken), "--model", str(tiny_model_dir)])
    assert damaged.exit_code == 5 and "checksum" in damaged.stderr
    # a plain question reads no prefix, but a bad file is still a bad file (not silently ignored)
    plain = CliRunner().invoke(app, ["ask", "Who?", "--max-new-tokens", "2", "--model", str(tiny_model_dir),
                                     "--prefix-file", str(broken)])
    assert plain.exit_code == 5 and "checksum" in plain.stderr


def test_serve_reports_the_prefix_only_where_it_was_read(trained, tmp_path, tiny_model_dir):
    from openai import OpenAI
    from test_serve import Running

    from conftest import run_opts
    from lcc_cli import api

    _, _, out, _ = trained
    folder = tmp_path / "lib"
    folder.mkdir()
    (tmp_path / "d.txt").write_text(DOC)
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "d.txt"), "-o", str(folder / "d.lcc"), "--index",
                                 "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.stderr
    server = Running(api.load(run_opts(tiny_model_dir)), [folder], read=ReadConfig(prefix_file=str(out)))
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")

        def ask(question, **lcc):
            return client.chat.completions.create(model="library", max_tokens=2, extra_body={"lcc": lcc} if lcc else None,
                                                  messages=[{"role": "user", "content": question}])
        read = ask("Who designed the lighthouse?")
        unread = ask("zzz qqq?")  # matches no page: the plain model's own turn, read without the prefix
        assert read.model_extra["lcc"]["prefix"].startswith("tiny") and unread.model_extra["lcc"]["prefix"] is None
        # and its usage counts no prefix entries: the same as a request that turned the prefix off
        assert unread.usage.prompt_tokens == ask("zzz qqq?", prefix=False).usage.prompt_tokens
        without = ask("Who designed the lighthouse?", prefix=False)
        entries = _entries(out)
        assert read.usage.prompt_tokens == without.usage.prompt_tokens + entries
    finally:
        server.stop()


def _entries(path) -> int:
    """Entries a layer in a prefix file (what reading it adds to kv_positions and usage)."""
    from lcc_cli.format.prefix_file import load_prefix

    return load_prefix(path).keys[0].shape[1]

"""Every way of reading a cartridge gives the same answer, and that answer is pinned.

`lcc ask`, `ask --questions`, `chat`, the server and `lcc eval` all read through
runtime/memory.py and decode through runtime/text.py; these tests hold them to one answer,
for one cartridge and for a composed pair, and pin it to the text the code gave before those
modules existed (the golden cartridges are fixed bytes, the tiny model is built from a seed,
decoding samples at temperature 1 from seed 0, which every surface offers, so that a wrong
buffer or a changed decode shows as different text: greedy, this random model says "::::"
to everything; eval, which decodes greedily only, is held to greedy `ask`). The same was checked on the embedded model with the shipped example
when the refactor landed (issue 28's note)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
from typer.testing import CliRunner

from lcc_cli.cli import app

FIXTURES = Path(__file__).resolve().parent / "fixtures"
QUESTION = "Who designed the lighthouse?"
SAMPLE = ["--temperature", "1.0"]


def _ask(tiny_model_dir, *carts, greedy: bool = False) -> str:
    r = CliRunner().invoke(app, ["ask", *map(str, carts), QUESTION, "--model", str(tiny_model_dir),
                                 "--max-new-tokens", "12", "--json", *([] if greedy else SAMPLE)])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["answer"]


def _ask_questions(tiny_model_dir, tmp_path, *carts) -> str:
    qs = tmp_path / "qs.txt"
    qs.write_text(QUESTION + "\n")
    r = CliRunner().invoke(app, ["ask", *map(str, carts), "--questions", str(qs), "--model", str(tiny_model_dir),
                                 "--max-new-tokens", "12", *SAMPLE])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout.splitlines()[0])["answer"]


def _chat(tiny_model_dir, *carts) -> str:
    r = CliRunner().invoke(app, ["chat", *map(str, carts), "--model", str(tiny_model_dir), "--max-new-tokens", "12",
                                 *SAMPLE], input=QUESTION + "\n")
    assert r.exit_code == 0, r.stderr
    return r.stdout.split("> ", 1)[1].split("\n> ")[0].strip()  # as the terminal shows it (render.clean)


def _served(tiny_model_dir, tmp_path, names: list[str]) -> list[str]:
    from conftest import run_opts
    from test_serve import Running

    from lcc_cli.api import load

    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copy(FIXTURES / "golden-v2.lcc", folder / "two.lcc")
    shutil.copy(FIXTURES / "golden-v1.lcc", folder / "one.lcc")
    server = Running(load(run_opts(tiny_model_dir)), [folder])
    try:
        out = []
        for name in names:
            r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json={"model": name, "max_tokens": 12, "temperature": 1.0, "seed": 0, "messages": [{"role": "user", "content": QUESTION}]})
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["message"]["content"])
        return out
    finally:
        server.stop()


def _evaluated(tiny, tmp_path) -> str:
    from lcc_cli.compile.base import CompilerSpec
    from lcc_cli.config import EvalSettings
    from lcc_cli.eval.run import Method, evaluate_document
    from lcc_cli.format.cartridge import load_cartridge

    cart = load_cartridge(FIXTURES / "golden-v2.lcc")
    settings = EvalSettings(ratios=[4.0], baselines=False, general_probes=False, max_new_tokens=12)
    row = {"id": "golden", "context": "x", "questions": [{"q": QUESTION, "answers": ["Ada"]}]}
    (tmp_path / "carts").mkdir()
    result = evaluate_document(tiny, row, "0" * 64, settings, tmp_path / "carts",
                               [Method("golden", CompilerSpec("am"), {})], lambda *a: cart)
    (got,) = [r["prediction"] for r in result["rows"] if r["condition"] == "cartridge"]
    return got


def test_ask_chat_serve_and_eval_give_the_pinned_answers(tiny, tiny_model_dir, tmp_path):
    two, one = FIXTURES / "golden-v2.lcc", FIXTURES / "golden-v1.lcc"
    single = [_ask(tiny_model_dir, two), _ask_questions(tiny_model_dir, tmp_path, two), _chat(tiny_model_dir, two)]
    pair = [_ask(tiny_model_dir, two, one), _ask_questions(tiny_model_dir, tmp_path, two, one),
            _chat(tiny_model_dir, two, one)]
    served = _served(tiny_model_dir, tmp_path, ["two", "two+one"])
    from lcc_cli.cli.render import clean

    assert single[:2] + served[:1] == [PINNED_ONE] * 3 and single[2] == clean(PINNED_ONE)
    assert pair[:2] + served[1:] == [PINNED_PAIR] * 3 and pair[2] == clean(PINNED_PAIR)
    assert _evaluated(tiny, tmp_path) == _ask(tiny_model_dir, two, greedy=True) == PINNED_GREEDY


PINNED_ONE = "YC\ufffdIter\x18Ngr Na\ufffdwL"
PINNED_PAIR = "YC\ufffdIter\x18NgrFG\x10wL"
PINNED_GREEDY = "::::::::::::"

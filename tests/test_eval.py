"""lcc eval on a 2-document toy dataset with the tiny model: structure, numbers, resume."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import DOC, fast_config, run_opts
from lcc_cli import api
from lcc_cli.cli import app
from lcc_cli.config import EvalSettings
from lcc_cli.errors import InputError
from lcc_cli.eval import data as eval_data
from lcc_cli.eval import run as evaluate

TOY = [
    {"id": "a", "title": "Lighthouse", "context": DOC,
     "questions": [{"q": "Who built it?", "answers": ["Ada Pellinger"], "qid": "a1"},
                   {"q": "When?", "answers": ["1868"], "qid": "a2"}]},
    {"id": "b", "title": "Tower", "context": "The tower is 41 metres tall and painted in red and white bands.",
     "questions": [{"q": "How tall?", "answers": ["41 metres"], "qid": "b1"}]},
]


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TOY) + "\n")
    return path


def settings():
    return EvalSettings(ratios=[4.0, 8.0], compile=fast_config(steps=2), max_new_tokens=4, general_probes=True)


def test_results_structure_and_numbers(toy, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = api.run_eval(toy, settings(), out, run=run_opts(tiny_model_dir))
    data = json.loads((out / "results.json").read_text())
    assert (out / "report.md").is_file() and (out / "frontier.png").stat().st_size > 1000
    rows = [r for d in data["documents"] for r in d["rows"]]
    # 3 questions x (full + none + 2 ratios x (truncate + retrieve + cartridge)) = 24 rows
    assert len(rows) == 24
    assert {(r["condition"], r["ratio"]) for r in rows} == {
        ("full", None), ("none", None), ("truncate", 4.0), ("truncate", 8.0), ("retrieve", 4.0), ("retrieve", 8.0),
        ("cartridge", 4.0), ("cartridge", 8.0)}
    # retrieve spends the truncate budget (the same K tokens; sentence joins may merge a token or two),
    # or the floor an indexed read has (a document under it is read whole)
    from lcc_cli.config import ReadConfig

    full = {r["qid"]: r for r in rows if r["condition"] == "full"}
    for ratio in (4.0, 8.0):
        trunc = {r["qid"]: r for r in rows if r["condition"] == "truncate" and r["ratio"] == ratio}
        for r in rows:
            if r["condition"] == "retrieve" and r["ratio"] == ratio:
                assert r["kv_positions"] <= max(trunc[r["qid"]]["kv_positions"] + 2,
                                                min(full[r["qid"]]["kv_positions"],
                                                    trunc[r["qid"]]["kv_positions"] + ReadConfig().floor))
    for r in rows:
        assert 0 <= r["f1"] <= 1 and r["em"] in (0.0, 1.0) and r["contains"] in (0.0, 1.0)
    summary = result["summary"]
    assert summary["documents"] == 2 and summary["questions"] == 3
    cart4 = next(c for c in summary["conditions"] if c["condition"] == "cartridge" and c["ratio"] == 4.0)
    assert cart4["n"] == 3
    costs = {c["ratio"]: c for c in summary["costs"]}
    doc_a = data["documents"][0]
    compiles = {c["ratio"]: c for c in doc_a["compiles"]}
    assert compiles[4.0]["slots"] == -(-doc_a["context_tokens"] // 4) and compiles[4.0]["method"] == "cartridge"
    assert costs[4.0]["prefill_equivalents"] > 0 and costs[8.0]["slots"] < costs[4.0]["slots"]
    # cartridge KV at question time = slots + question tokens; full = document + question tokens
    cart_rows = [r for r in rows if r["condition"] == "cartridge" and r["ratio"] == 8.0]
    full_rows = [r for r in rows if r["condition"] == "full"]
    assert all(c["kv_positions"] < f["kv_positions"] for c, f in zip(cart_rows, full_rows))
    assert costs[8.0]["kv_ratio"] > 1
    assert summary["general"] and summary["general"][0]["n"] == 2 * len(evaluate.GENERAL_PROBES)
    report = (out / "report.md").read_text()
    assert "| cartridge | cartridge | 8.0 |" in report and "PE" in report and "## Targets" in report
    assert "## Paired against the baselines" in report and "| cartridge | retrieve | 8x |" in report
    assert {(p["baseline"], p["ratio"]) for p in summary["paired"]} == {
        (b, r) for b in ("truncate", "retrieve") for r in ("4x", "8x")}


def test_resume_after_interrupt_keeps_finished_documents(toy, tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    real = evaluate.evaluate_document
    calls = []

    def interrupt_on_b(loaded, row, *args, **kwargs):
        calls.append(row["id"])
        if row["id"] == "b" and len(calls) == 2:
            raise KeyboardInterrupt
        return real(loaded, row, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_document", interrupt_on_b)
    with pytest.raises(KeyboardInterrupt):
        api.run_eval(toy, settings(), out, run=run_opts(tiny_model_dir))
    assert len(list((out / "docs").glob("a-*.json"))) == 1 and not list((out / "docs").glob("b-*.json"))
    api.run_eval(toy, settings(), out, run=run_opts(tiny_model_dir))
    assert calls == ["a", "b", "b"]  # a was not evaluated again
    assert json.loads((out / "results.json").read_text())["summary"]["documents"] == 2


def test_bad_dataset_is_an_input_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"no": "context"}\n')
    with pytest.raises(InputError, match="line 1"):
        eval_data.load_dataset(bad)


def test_eval_cli_json(toy, tmp_path, tiny_model_dir):
    result = CliRunner().invoke(app, ["eval", str(toy), "--ratio", "8", "--steps", "1", "--limit", "1",
                                      "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["documents"] == 1 and [c["ratio"] for c in summary["costs"]] == [8.0]


def test_composition_rows_use_all_paragraph_cartridges(toy, tmp_path, tiny_model_dir):
    rows = [dict(r, title="Same article") for r in TOY]
    path = tmp_path / "article.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    s = settings()
    s.compose, s.ratios, s.general_probes = True, [8.0], False
    out = tmp_path / "out"
    result = api.run_eval(path, s, out, run=run_opts(tiny_model_dir))
    data = json.loads((out / "results.json").read_text())
    article = next(d for d in data["documents"] if d["id"].startswith("article:"))
    composed = [r for r in article["rows"] if r["condition"] == "composed"]
    singles = [r for d in data["documents"] for r in d["rows"] if r["condition"] == "cartridge"]
    overlap = [r for r in article["rows"] if r["condition"] == "composed_overlap"]
    assert len(composed) == len(overlap) == 3
    assert len([r for r in article["rows"] if r["condition"] == "full_article"]) == 3
    slots_of = {d["id"]: d["compiles"][0]["slots"] for d in data["documents"] if d["compiles"]}
    for c, single in zip(composed, singles):
        assert c["question"] == single["question"]
        # composed cache = every paragraph's slots; single = its own paragraph's slots
        assert c["kv_positions"] - single["kv_positions"] == sum(slots_of.values()) - slots_of[single["doc"]]
    assert result["summary"]["documents"] == 2
    assert any(c["condition"] == "composed" for c in result["summary"]["conditions"])


def test_methods_strides_and_layout_checks(toy, tmp_path, tiny_model_dir):
    s = EvalSettings(ratios=[8.0], max_new_tokens=4, general_probes=False, layout_check=True,
                     compile=fast_config(steps=1),
                     methods=[{"label": "scratch+1", "compiler": "none", "steps": 1, "kl_pool": 2},
                              {"label": "scratch+2", "compiler": "none", "steps": 2, "kl_pool": 2, "stride": 2}])
    result = api.run_eval(toy, s, tmp_path / "out", run=run_opts(tiny_model_dir))
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = [r for d in data["documents"] for r in d["rows"]]
    cart = {(r["method"], r["doc"]) for r in rows if r["condition"] == "cartridge"}
    assert cart == {("scratch+1", "a"), ("scratch+1", "b"), ("scratch+2", "a")}  # stride 2: every 2nd document
    assert {r["condition"] for r in rows} >= {"cartridge_v1_layout", "cartridge_bf16"}
    costs = {c["method"]: c for c in result["summary"]["costs"]}
    assert costs["scratch+2"]["documents"] == 1 and costs["scratch+1"]["documents"] == 2
    assert costs["scratch+1"]["file_bytes"] > 0 and costs["scratch+1"]["prefill_equivalents"] > 0
    assert [t["ratio"] for t in result["summary"]["targets"]] == [16.0, 16.0, 8.0]


def test_a_retrained_compiler_at_the_same_path_is_not_reused(tmp_path):
    # Retraining rewrites the shipped compiler in place: finished documents of the old one
    # must not be served as results of the new one.
    import torch

    from lcc_cli.compile.base import CompilerSpec
    from lcc_cli.format.compiler_file import save_compiler

    path = tmp_path / "compiler.safetensors"
    manifest = {"model": {"fingerprint": "f" * 64, "id": "m"},
                "compiler": {"lora_rank": 4, "lora_alpha": 4, "lora_targets": ["q_proj"], "sink": True}}
    lora = {"lora.q_proj.lora_A.weight": torch.zeros(4, 8), "lora.q_proj.lora_B.weight": torch.zeros(8, 4)}
    save_compiler(path, manifest, {"slot_bias": torch.zeros(8), **lora})
    method = evaluate.Method("pretrained+0", CompilerSpec("pretrained", str(path)), {"steps": 0})
    before = evaluate._method_key(method)
    save_compiler(path, manifest, {"slot_bias": torch.ones(8), **lora})
    assert evaluate._method_key(method) != before
    assert evaluate._method_key(evaluate.Method("x", CompilerSpec(), {})) == ["x", "optimise", None, {}]


def test_retrieve_picks_the_questions_sentences_within_the_budget():
    from lcc_cli.retrieval import retrieve

    text = ("The harbour is on the east coast. Its wall was built in 1826 by Ada Stone.\n\n"
            "Seals rest on the granite spur. The lighthouse was automated in 1987 after a storm.")

    def words(t):
        return len(t.split())

    got = retrieve(text, "When was the lighthouse automated?", 12, words)
    assert got == "The lighthouse was automated in 1987 after a storm."
    both = retrieve(text, "Who built the wall, and when was the lighthouse automated?", 40, words)
    assert both.index("1826") < both.index("1987")  # document order, not score order
    assert words(retrieve(text, "lighthouse automated storm", 4, words)) <= 4  # an over-long best sentence is cut
    assert retrieve(text, "anything", 0, words) == ""


def test_routed_condition_on_a_multi_segment_document(tmp_path, tiny_model_dir):
    from lcc_cli.config import CompileConfig

    row = {"id": "long", "context": "The granite quarry ships stone by rail. " * 20 + "\n\nAda Pellinger designed it.",
           "questions": [{"q": "Who designed it?", "answers": ["Ada Pellinger"], "qid": "l1"}]}
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(row) + "\n")
    settings = EvalSettings(ratios=[4.0], compile=CompileConfig(steps=0, segment_tokens=64), max_new_tokens=4,
                            general_probes=False, route=1, methods=[{"label": "am", "compiler": "am", "quality": "fast",
                                                                     "segment_tokens": 64}])
    api.run_eval(data, settings, tmp_path / "out", run=run_opts(tiny_model_dir))
    rows = [r for d in json.loads((tmp_path / "out" / "results.json").read_text())["documents"] for r in d["rows"]]
    routed = [r for r in rows if r["condition"] == "cartridge_routed"]
    full = [r for r in rows if r["condition"] == "cartridge"]
    assert len(routed) == 1 and routed[0]["kv_positions"] < full[0]["kv_positions"]


def test_settings_added_later_stay_out_of_the_cache_key_at_their_defaults():
    from lcc_cli.compile.base import CompilerSpec
    from lcc_cli.eval.run import Method, _method_key

    a = Method("m", CompilerSpec("am"), {"steps": 0})
    b = Method("m", CompilerSpec("am"), {"steps": 0, "kv_lr": 1e-2, "bias": False})
    c = Method("m", CompilerSpec("am"), {"steps": 0, "bias": True})
    assert _method_key(a) == _method_key(b) != _method_key(c)


def test_a_read_default_that_changed_keeps_old_indexed_results_out_of_the_cache():
    """Indexed results cached before `reencode` existed read every page as stored, and before
    `floor` existed cut a best page at the budget: they must not stand for the new defaults."""
    from lcc_cli.compile.base import CompilerSpec
    from lcc_cli.eval.run import Method, _method_key

    old = ["m", "truncate", None, {"index": True}]  # the key such a method had before
    assert _method_key(Method("m", CompilerSpec("truncate"), {"index": True})) != old
    assert _method_key(Method("m", CompilerSpec("truncate"), {"index": True}, read={"reencode": 0})) == [
        *old, {"reencode": 0, "floor": 64}]
    assert _method_key(Method("m", CompilerSpec("truncate"), {"index": True}, read={"reencode": 0, "floor": 0})) == [
        *old, {"reencode": 0, "floor": 0}]
    assert _method_key(Method("m", CompilerSpec("truncate"), {})) == ["m", "truncate", None, {}]


def test_a_method_is_paired_with_the_baseline_run_at_its_own_budget():
    """Two methods keep different numbers of entries at one ratio, so truncate ran twice;
    each method must be compared with the run at its own budget, not whichever came last."""
    from lcc_cli.eval.paired import compare

    def row(condition, method, budget, contains):
        return {"doc": "d", "qid": "q", "condition": condition, "ratio": 8.0, "method": method, "budget": budget,
                "contains": contains, "f1": contains}

    rows = [row("full", None, None, 1.0), row("truncate", None, 10, 1.0), row("cartridge", "a", 10, 0.0),
            row("truncate", None, 12, 0.0), row("cartridge", "b", 12, 0.0)]
    results = {"documents": [{"rows": rows}]}
    assert compare(results, "truncate", "a")["8x"]["contains"]["diff"] == -1.0
    assert compare(results, "truncate", "b")["8x"]["contains"]["diff"] == 0.0
    assert compare(results, "b", "truncate")["8x"]["contains"]["diff"] == 0.0


def test_the_report_shows_a_baseline_at_each_methods_budget_not_their_average():
    from lcc_cli.eval.report import summarize

    def row(condition, method, budget, contains, q="q"):
        return {"doc": "d", "qid": q, "question": q, "condition": condition, "ratio": 8.0 if budget else None,
                "method": method, "budget": budget, "em": 0.0, "f1": contains, "contains": contains,
                "ttft": 1.0, "seconds": 1.0, "kv_positions": 10}

    rows = [row("full", None, None, 1.0), row("truncate", None, 10, 1.0), row("cartridge", "a", 10, 0.0),
            row("truncate", None, 12, 0.0), row("cartridge", "b", 12, 0.0), row("cartridge", "c", 10, 0.0)]
    compiles = [{"method": m, "ratio": 8.0, "slots": k, "seconds": 1.0, "prefill_seconds": 1.0,
                 "prefill_equivalents": 1.0} for m, k in (("a", 10), ("b", 12), ("c", 10))]
    conditions = summarize([{"id": "d", "rows": rows, "compiles": compiles}], 1)["conditions"]
    truncate = {c["method"]: c for c in conditions if c["condition"] == "truncate"}
    assert set(truncate) == {"@a/c", "@b"}
    assert (truncate["@a/c"]["n"], truncate["@a/c"]["contains"]) == (1, 1.0)
    assert (truncate["@b"]["n"], truncate["@b"]["contains"]) == (1, 0.0)

    # one budget per document and ratio: a single unlabelled baseline row
    same = [r for r in rows if r.get("budget") != 12 or r["condition"] == "cartridge"]
    same[-1] = {**same[-1], "budget": 10}
    compiles[1]["slots"] = 10
    conditions = summarize([{"id": "d", "rows": same, "compiles": compiles}], 1)["conditions"]
    assert [c["method"] for c in conditions if c["condition"] == "truncate"] == [None]


def test_a_method_run_on_some_documents_gets_its_own_baseline_row():
    from lcc_cli.eval.report import summarize

    def row(doc, condition, method, budget, contains):
        return {"doc": doc, "qid": "q", "question": "q", "condition": condition, "ratio": 8.0 if budget else None,
                "method": method, "budget": budget, "em": 0.0, "f1": contains, "contains": contains,
                "ttft": 1.0, "seconds": 1.0, "kv_positions": 10}

    def compile_(m, k):
        return {"method": m, "ratio": 8.0, "slots": k, "seconds": 1.0, "prefill_seconds": 1.0,
                "prefill_equivalents": 1.0}

    # "a" on both documents; "b" (every other document) only on d1, where it kept more entries
    d1 = {"id": "d1", "compiles": [compile_("a", 10), compile_("b", 12)],
          "rows": [row("d1", "full", None, None, 1.0), row("d1", "truncate", None, 10, 1.0),
                   row("d1", "truncate", None, 12, 0.0), row("d1", "cartridge", "a", 10, 0.0),
                   row("d1", "cartridge", "b", 12, 0.0)]}
    d2 = {"id": "d2", "compiles": [compile_("a", 10)],
          "rows": [row("d2", "full", None, None, 1.0), row("d2", "truncate", None, 10, 0.0),
                   row("d2", "cartridge", "a", 10, 0.0)]}
    truncate = {c["method"]: c for c in summarize([d1, d2], 1)["conditions"] if c["condition"] == "truncate"}
    assert set(truncate) == {"@a", "@b"}
    assert (truncate["@a"]["n"], truncate["@a"]["contains"]) == (2, 0.5)  # both of a's documents
    assert (truncate["@b"]["n"], truncate["@b"]["contains"]) == (1, 0.0)  # b's one document, at b's budget


def test_questions_without_qids_are_paired_one_by_one(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "x", "context": "Some text.", "questions": [
        {"q": "one?", "answers": ["a"]}, {"q": "two?", "answers": ["b"]}]}) + "\n")
    qids = [q["qid"] for q in eval_data.load_dataset(path)[0]["questions"]]
    assert len(set(qids)) == 2
    path.write_text(json.dumps({"id": "x", "context": "Some text.", "questions": [
        {"q": "one?", "answers": ["a"], "qid": "same"}, {"q": "two?", "answers": ["b"], "qid": "same"}]}) + "\n")
    with pytest.raises(InputError, match="share a qid"):
        eval_data.load_dataset(path)


def test_two_baselines_are_compared_at_one_budget():
    from lcc_cli.eval.paired import compare

    def row(condition, method, budget, contains):
        return {"doc": "d", "qid": "q", "condition": condition, "ratio": 8.0, "method": method, "budget": budget,
                "contains": contains, "f1": contains}

    rows = [row("full", None, None, 1.0), row("cartridge", "a", 10, 0.0), row("cartridge", "b", 12, 0.0),
            row("truncate", None, 10, 0.0), row("retrieve", None, 10, 1.0),
            row("truncate", None, 12, 1.0), row("retrieve", None, 12, 0.0)]
    assert compare({"documents": [{"rows": rows}]}, "truncate", "retrieve")["8x"]["contains"]["diff"] == 1.0


def test_a_method_row_without_a_budget_is_still_paired():
    """Rows from before budgets were recorded: the document stays in the comparison."""
    from lcc_cli.eval.paired import compare

    rows = [{"doc": "d", "qid": "q", "condition": c, "ratio": 8.0, "method": m, "budget": b, "contains": x, "f1": x}
            for c, m, b, x in (("full", None, None, 1.0), ("cartridge", "a", None, 0.0), ("truncate", None, 10, 1.0))]
    row = compare({"documents": [{"rows": rows}]}, "truncate", "a")["8x"]
    assert row["documents"] == 1 and row["contains"]["diff"] == -1.0


def test_an_ab_half_without_baselines_pairs_with_a_full_run(toy, tmp_path, tiny_model_dir):
    """`baselines = false` answers from the methods' cartridges only; bench/paired.py pairs
    its rows with another run's on the same questions."""
    import subprocess
    import sys
    from pathlib import Path

    def run(out, baselines, label):
        cfg = tmp_path / f"{label}.toml"
        cfg.write_text(f"[eval]\nratios = [8.0]\nmax_new_tokens = 4\ngeneral_probes = false\n"
                       f"baselines = {str(baselines).lower()}\n"
                       f"[[eval.methods]]\nlabel = \"{label}\"\ncompiler = \"truncate\"\nquality = \"fast\"\n")
        r = CliRunner().invoke(app, ["eval", str(toy), "--config", str(cfg), "--out", str(tmp_path / out),
                                     "--model", str(tiny_model_dir), "--json"])
        assert r.exit_code == 0, r.stderr
        return tmp_path / out / "results.json"

    full, half = run("a", True, "one"), run("b", False, "two")
    conditions = {r["condition"] for d in json.loads(half.read_text())["documents"] for r in d["rows"]}
    assert conditions == {"cartridge"}
    script = Path(__file__).resolve().parents[1] / "bench" / "paired.py"
    out = subprocess.run([sys.executable, str(script), str(full), "one", str(half), "two"], capture_output=True,
                         text=True, check=True, cwd=script.parents[1])
    paired = json.loads(out.stdout)["8x"]
    assert paired["questions"] == 3 and paired["contains"]["diff"] == 0.0  # the same compiler, the same answers
    # one label in both runs (two steps of one candidate): the second run's rows, not the first's twice
    again = run("c", False, "one")
    out = subprocess.run([sys.executable, str(script), str(full), "one", str(again), "one"], capture_output=True,
                         text=True, check=True, cwd=script.parents[1])
    assert "one (second run)" in json.loads(out.stdout)["8x"]["contains"]


def test_full_false_leaves_the_whole_document_out_and_formats_reach_the_baselines(toy, tmp_path, tiny_model_dir):
    cfg = EvalSettings(ratios=[8.0], compile=fast_config(steps=2), max_new_tokens=4, general_probes=False,
                       full=False, baseline_formats=["plain", "words"], limit=1)
    out = tmp_path / "out"
    api.run_eval(toy, cfg, out, run=run_opts(tiny_model_dir))
    rows = [r for d in json.loads((out / "results.json").read_text())["documents"] for r in d["rows"]]
    assert {r["condition"] for r in rows} == {"none", "truncate", "retrieve", "retrieve_words", "cartridge"}
    report = (out / "report.md").read_text()
    assert "| cartridge | retrieve | 8x |" in report and "| cartridge | retrieve_words | 8x |" in report

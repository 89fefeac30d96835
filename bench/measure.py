"""Side-by-side measurements for the bench report (part of `make bench`, after `lcc eval`).

    python bench/measure.py [questions|backends|contention|sizes|all] [--out bench/results]

Each measurement runs its conditions one after another in one run, on this machine, with
the real embedded model, and writes bench/results/measurements.{json,md}:

- questions:  20 questions answered by one `lcc ask --questions` vs 20 separate `lcc ask`
- backends:   a 20-paragraph batch compile (pretrained + 2 steps, so the executors' own
              costs show) with the local, processes and ray executors (documents per
              minute), and Ray's fixed start-up cost on its own
- contention: a 6-step compile of the README example (the whole process) idle, beside a
              busy loop on one core, and beside a second lcc compile; with the old settings
              (--threads 2, spinning OpenMP waits) and the new (automatic threads, passive waits)
- sizes:      file sizes of the same cartridge as v1 and v2, fp32 and bfloat16
- train:      one training step (8 paragraphs + 1 long document of the bench data, the
              default TrainConfig) computed document by document and batched (batched.py):
              tokens per second of forward + backward, each way timed 3 times, alternating
- indexed:    indexed cartridges (issue 29) on the long-document bench: time to first token
              (choosing and reading the pages included) against `retrieve` (BM25 sentences
              prefilled) and the whole document in the prompt, each question under all three in
              turn; bytes per document token for each storage kind; compile seconds against a
              prefill of the same document (PE); and a 50,000-token document compiled window by
              window, then asked: selection + load time and peak memory
- library:    libraries of 10, 100 and 1,000 indexed cartridges (SQuAD train paragraphs, built
              once under build/library/): index build, incremental update of one cartridge,
              selection latency p50/p95, time to first token, peak memory; and the same questions
              answered from the library and from their own cartridge alone, paired
- serve:      `lcc serve` with 1, 4 and 16 concurrent clients (requests per second, p50/p95
              latency) against the same questions through one `lcc ask --questions`; and the
              time to the first streamed token from the cartridge against the same model with
              the document in the prompt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "squad_dev_sample.jsonl"
EXAMPLE = ROOT / "examples" / "harbor.md"
LCC = [sys.executable, "-m", "lcc_cli"]
QUESTIONS = ["Who designed the lighthouse?", "When was the lighthouse completed?", "How tall is the tower?",
             "How many steps lead to the lantern room?", "When was the station automated?",
             "What did the first lamp burn?", "How far could the first lamp be seen?",
             "When was the oil lamp replaced?", "Who was the last keeper?", "Where is the logbook now?",
             "On what does the lighthouse stand?", "What colours is the tower painted?",
             "Why was the tower built?", "When did two ships run aground?", "When is it open to visitors?",
             "How long does the climb take?", "What bay is the lighthouse in?",
             "How many years did the last keeper keep the logbook?", "What replaced the oil lamp?",
             "Is a keeper still living there?"]


def sh(args, env=None, **kw) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, **kw)
    return time.perf_counter() - start, proc


def ok(proc) -> None:
    if proc.returncode not in (0, 10):
        raise SystemExit(f"command failed ({proc.returncode}): {proc.stderr[-500:]}")


def measure_questions(tmp: Path) -> dict:
    cart = tmp / "harbor.lcc"
    ok(sh(LCC + ["compile", str(EXAMPLE), "-o", str(cart), "--quality", "fast", "-f"])[1])
    (tmp / "q.txt").write_text("\n".join(QUESTIONS))
    batch, proc = sh(LCC + ["ask", str(cart), "--questions", str(tmp / "q.txt"), "--max-new-tokens", "32"])
    ok(proc)
    separate = 0.0
    for q in QUESTIONS:
        seconds, proc = sh(LCC + ["ask", str(cart), q, "--max-new-tokens", "32", "--json"])
        ok(proc)
        separate += seconds
    return {"questions": len(QUESTIONS), "one_process_s": round(batch, 1), "separate_processes_s": round(separate, 1),
            "speedup": round(separate / batch, 2)}


def measure_backends(tmp: Path) -> dict:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:20]
    docs = tmp / "docs"
    docs.mkdir()
    for row in rows:
        (docs / f"{row['id'].replace('#', '_')}.txt").write_text(row["context"])
    out = {}
    for backend, extra in (("local", []), ("processes", ["--workers", "2", "--threads", "1"]),
                           ("ray", ["--workers", "2", "--threads", "1"])):
        seconds, proc = sh(LCC + ["compile", str(docs), "-o", f"{tmp / backend}/", "--backend", backend,
                                  "--quality", "balanced", "--steps", "2", "--json", *extra])
        ok(proc)
        summary = json.loads(proc.stdout)
        out[backend] = {"seconds": round(seconds, 1), "documents": summary["counts"]["done"],
                        "documents_per_minute": round(60 * summary["counts"]["done"] / seconds, 2)}
    code = ("import time; t=time.perf_counter(); from lcc_cli.backends.ray import start_ray; r=start_ray(num_cpus=2); "
            "a=time.perf_counter(); r.shutdown(); print(a-t, time.perf_counter()-a)")
    _, proc = sh([sys.executable, "-c", code])
    ok(proc)
    start, stop = map(float, proc.stdout.split()[-2:])
    out["ray_fixed_cost"] = {"init_s": round(start, 2), "shutdown_s": round(stop, 2)}
    return out


def measure_contention(tmp: Path) -> dict:
    compile_args = LCC + ["compile", str(EXAMPLE), "--steps", "6", "--compiler", "none", "-f"]
    configs = {"before (--threads 2, spinning waits)": ({"OMP_WAIT_POLICY": "ACTIVE"}, ["--threads", "2"]),
               "after (automatic threads, passive waits)": ({}, [])}
    out = {}
    for name, (env, extra) in configs.items():
        row = {}
        for scenario in ("idle", "busy loop on one core", "second lcc compile"):
            other = None
            if scenario == "busy loop on one core":
                other = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            elif scenario == "second lcc compile":
                other = subprocess.Popen(LCC + ["compile", str(EXAMPLE), "--steps", "60", "--compiler", "none", "-f",
                                                "-o", str(tmp / "other.lcc"), *extra],
                                         env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(8)  # let it load its model and start compiling
            try:
                seconds, proc = sh(compile_args + ["-o", str(tmp / "c.lcc"), *extra], env=env)
                ok(proc)
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
            row[scenario] = round(seconds, 1)
        row["busy / idle"] = round(row["busy loop on one core"] / row["idle"], 2)
        row["second lcc / idle"] = round(row["second lcc compile"] / row["idle"], 2)
        out[name] = row
    return out


def measure_sizes(tmp: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from lcc_cli.format.cartridge import load_cartridge, to_bytes

    golden = ROOT / "tests" / "fixtures" / "golden-v1.lcc"
    v2 = to_bytes(load_cartridge(golden))
    cart = tmp / "harbor16.lcc"
    ok(sh(LCC + ["compile", str(EXAMPLE), "-o", str(cart), "--quality", "fast", "-f"])[1])
    real = load_cartridge(cart)
    real_bf16 = type(real)(real.manifest, real.buffer.to(dtype=__import__("torch").bfloat16))
    return {"golden (tiny model)": {"v1_bytes": golden.stat().st_size, "v2_bytes": len(v2)},
            "harbor.md at 16x (SmolLM2)": {"v2_float32_bytes": cart.stat().st_size,
                                          "v2_bfloat16_bytes": len(to_bytes(real_bf16))}}


def measure_serve(tmp: Path) -> dict:
    import socket
    import statistics
    import threading

    import httpx

    carts = tmp / "carts"
    carts.mkdir()
    ok(sh(LCC + ["compile", str(EXAMPLE), "-o", str(carts / "harbor.lcc"), "--quality", "fast", "-f"])[1])
    (tmp / "q.txt").write_text("\n".join(QUESTIONS))
    ask_s, proc = sh(LCC + ["ask", str(carts / "harbor.lcc"), "--questions", str(tmp / "q.txt"),
                            "--max-new-tokens", "32"])
    ok(proc)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(LCC + ["serve", str(carts), "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit(f"lcc serve did not start: {server.stderr.read()[-500:] if server.stderr else ''}")
                time.sleep(0.5)
        plain = next(m["id"] for m in httpx.get(url + "/v1/models").json()["data"] if m["lcc"].get("cartridge", 1) is None)

        def request(question: str, model: str = "harbor", stream: bool = False) -> float:
            body = {"model": model, "max_tokens": 32, "stream": stream,
                    "messages": [{"role": "user", "content": question}]}
            start = time.perf_counter()
            if not stream:
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
                r.raise_for_status()
                return time.perf_counter() - start
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        return time.perf_counter() - start
            return time.perf_counter() - start

        request(QUESTIONS[0])  # warm-up
        out = {"questions": len(QUESTIONS), "ask_questions_s": round(ask_s, 2),
               "ask_questions_per_s": round(len(QUESTIONS) / ask_s, 2)}
        for clients in (1, 4, 16):
            jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(max(len(QUESTIONS), 2 * clients))]
            latencies: list[float] = []
            lock = threading.Lock()

            def worker(mine: list[str]) -> None:
                for q in mine:
                    seconds = request(q)
                    with lock:
                        latencies.append(seconds)

            start = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(jobs[i::clients],)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            health = httpx.get(url + "/health").json()
            latencies.sort()
            out[f"clients_{clients}"] = {"requests": len(jobs), "seconds": round(wall, 2),
                                         "requests_per_s": round(len(jobs) / wall, 2),
                                         "p50_s": round(statistics.median(latencies), 3),
                                         "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
                                         "batches_so_far": health["batches"], "mean_batch_so_far": health["mean_batch"]}
        document = EXAMPLE.read_text()
        ttft_cart = [request(q, stream=True) for q in QUESTIONS[:5]]
        ttft_doc = [request(f"Answer using this document. Be brief.\n\n{document}\n\nQuestion: {q}", plain, True)
                    for q in QUESTIONS[:5]]
        out["first_token_cartridge_s"] = round(statistics.median(ttft_cart), 3)
        out["first_token_document_in_prompt_s"] = round(statistics.median(ttft_doc), 3)
        return out
    finally:
        server.terminate()
        server.wait(timeout=60)


def measure_train(tmp: Path) -> dict:
    import json as _json
    import random
    import statistics

    import torch

    from lcc_cli.api import RunOptions, load
    from lcc_cli.training import batched, data as train_data, losses
    from lcc_cli.compile.optimise import attach_lora
    from lcc_cli.config import TrainConfig

    cfg = TrainConfig()
    loaded = load(RunOptions(threads=2))
    rows = [train_data.Row(r["context"], [{"q": q["q"], "answer": q["answers"][0], "para": q.get("para")}
                                     for q in r["questions"]], r["id"], False)
            for r in map(_json.loads, SAMPLE.read_text().splitlines()[:8])]
    long = _json.loads((ROOT.parent / "shared" / "data" / "squad_long_dev.jsonl").read_text().splitlines()[0])
    rows.append(train_data.Row(long["context"], [{"q": q["q"], "answer": q["answers"][0], "para": q["para"]}
                                            for q in long["questions"]], long["id"], True))
    targets = losses.instruction_targets(loaded, cfg)
    peft_model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    bias = torch.nn.Parameter(torch.zeros(loaded.facts.hidden_size))
    rng = random.Random(0)
    items = []
    for row in rows:
        doc = train_data.prepare(loaded, row, cfg)
        items.append((doc, 8.0, *losses.sample_step(doc, targets, rng, cfg)))
    ways = {"per document": lambda: [losses.document_losses(loaded, peft_model, bias, *it, cfg) for it in items],
            "batched": lambda: batched.step_losses(loaded, peft_model, bias, items, cfg)}
    times: dict[str, list] = {k: [] for k in ways}
    tokens = 0
    for _ in range(3):
        for name, fn in ways.items():
            start = time.perf_counter()
            results = fn()
            sum(t["recon"] * cfg.recon_weight + t["qa"] * cfg.qa_weight + t["kl"] * cfg.kl_weight
                for t, _ in results).backward()
            times[name].append(time.perf_counter() - start)
            tokens = sum(n for _, n in results)
    peft_model.unload()
    out = {"tokens_per_step": tokens, "threads": 2, "dtype": str(loaded.dtype)}
    for name, ts in times.items():
        out[name] = {"seconds": round(statistics.median(ts), 2), "tokens_per_s": round(tokens / statistics.median(ts))}
    out["batched / per document"] = round(out["batched"]["tokens_per_s"] / out["per document"]["tokens_per_s"], 2)
    return out


LONG = ROOT.parent / "shared" / "data" / "squad_long_dev.jsonl"
TRAIN = ROOT.parent / "shared" / "data" / "squad_train_pool.jsonl"
PARAGRAPHS = ROOT.parent / "shared" / "data" / "squad_dev_sample.jsonl"


REPAIRS = (4, 16)  # ask-time repair (EPIC): each chosen page's first N tokens re-encoded


def measure_indexed(tmp: Path, documents: int = 6, per_doc: int = 5) -> dict:
    """In one process, one model: each question answered (one token) under full, retrieve and
    indexed in turn, so that all three see the same machine at the same moment."""
    import random
    import statistics

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lcc_cli import api
    from lcc_cli.config import AskConfig, ReadConfig

    loaded = api.load(api.RunOptions())
    rows = [json.loads(line) for line in LONG.read_text().splitlines()][:documents]
    one = AskConfig(max_new_tokens=1)
    times: dict[str, list[float]] = {"full": [], "retrieve": [], "indexed bfloat16": [], "indexed int8": [],
                                     "indexed int8, no prefix": [],
                                     **{f"indexed int8 repair {r}": [] for r in REPAIRS}}
    sizes, compiles = {}, []
    for n, row in enumerate(rows):
        src = tmp / f"doc{n}.txt"
        src.write_text(row["context"])
        carts = {}
        for kv in ("float32", "bfloat16", "int8", "int4"):
            carts[kv] = tmp / f"doc{n}-{kv}.lcc"
            started = time.perf_counter()
            api.compile_file(src, carts[kv], {"ratio": 16.0, "index": True, "gist": False, "kv_dtype": kv},
                             compiler="truncate", run=api.RunOptions())
            seconds = time.perf_counter() - started
            tokens = len(loaded.prompter.context_ids(row["context"]))
            sizes.setdefault(kv, []).append(carts[kv].stat().st_size / tokens)
            if kv == "int8":
                from lcc_cli.eval.run import time_prefill

                compiles.append(seconds / time_prefill(loaded, loaded.prompter.context_ids(row["context"]), repeats=1))
        readers = {f"indexed {kv}": api.Reader([carts[kv]], model=api.Model(loaded), read=ReadConfig()) for kv in ("bfloat16", "int8")}
        readers["indexed int8, no prefix"] = api.Reader([carts["int8"]], model=api.Model(loaded),
                                                        read=ReadConfig(prefix=False))
        readers |= {f"indexed int8 repair {r}": api.Reader([carts["int8"]], model=api.Model(loaded), read=ReadConfig(repair=r))
                    for r in REPAIRS}
        budget = readers["indexed int8"].memory.budget
        questions = random.Random(n).sample(row["questions"], min(per_doc, len(row["questions"])))
        for q in (q["q"] for q in questions):
            times["full"].append(_text_answer(loaded, row["context"], q, one).seconds_to_first_token)
            _time_reads(loaded, row["context"], q, budget, readers, times)
    p50 = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out = {"documents": len(rows), "questions": len(times["full"]), "ttft_p50_s": p50,
           "indexed_int8 / retrieve": round(p50["indexed int8"] / p50["retrieve"], 3),
           "indexed_int8 / full": round(p50["indexed int8"] / p50["full"], 3),
           "indexed_int8 / no prefix": round(p50["indexed int8"] / p50["indexed int8, no prefix"], 3),
           **{f"repair_{r} / retrieve": round(p50[f"indexed int8 repair {r}"] / p50["retrieve"], 3) for r in REPAIRS},
           "bytes_per_token": {k: round(statistics.mean(v)) for k, v in sizes.items()},
           "compile_pe_int8": round(statistics.median(compiles), 2)}
    out["paragraphs"] = _paragraph_reads(tmp, loaded)
    out["long_document"] = _fifty_thousand(tmp)
    return out


def _text_answer(loaded, document: str, question: str, cfg):
    """One answer with `document` in the prompt, the plain model's read (no reading prefix)."""
    from lcc_cli.runtime.reading import Row, View, answer_rows

    view = View.text(loaded.prompter.context_ids(document))
    return answer_rows(loaded, [Row(view, loaded.prompter.query_ids(question), question)], cfg, batch=False)[0]


def _time_reads(loaded, document: str, question: str, budget: int, readers: dict, times: dict) -> None:
    """One token for `question` under `retrieve` (choosing its sentences counted) and then each
    reader, one after another, so that all see the machine at the same moment."""
    from lcc_cli.config import AskConfig
    from lcc_cli.retrieval import retrieve

    one = AskConfig(max_new_tokens=1)
    started = time.perf_counter()
    text = retrieve(document, question, budget, lambda t: len(loaded.prompter.encode(t)))
    chosen = time.perf_counter() - started
    times["retrieve"].append(chosen + _text_answer(loaded, text, question, one).seconds_to_first_token)
    for name, reader in readers.items():
        times[name].append(reader.ask(question, **vars(one)).seconds_to_first_token)


def _paragraph_reads(tmp: Path, loaded, documents: int = 8, per_doc: int = 4) -> dict:
    """Paragraphs at 8x (about 27 entries, under `reencode`'s 64): time to the first token with
    the chosen pages re-encoded whole (the default there), read as stored, and `retrieve`,
    each question under all three in turn."""
    import random
    import statistics

    from lcc_cli import api
    from lcc_cli.config import ReadConfig

    rows = [json.loads(line) for line in PARAGRAPHS.read_text().splitlines()][:documents]
    times: dict[str, list[float]] = {"retrieve": [], "indexed, re-encoded (default)": [], "indexed, as stored": [],
                                     "indexed, re-encoded, no prefix": []}
    for n, row in enumerate(rows):
        src, cart = tmp / f"para{n}.txt", tmp / f"para{n}.lcc"
        src.write_text(row["context"])
        api.compile_file(src, cart, {"ratio": 8.0, "index": True, "gist": False}, compiler="truncate",
                         run=api.RunOptions())
        readers = {"indexed, re-encoded (default)": api.Reader([cart], model=api.Model(loaded), read=ReadConfig()),
                   "indexed, as stored": api.Reader([cart], model=api.Model(loaded), read=ReadConfig(reencode=0)),
                   "indexed, re-encoded, no prefix": api.Reader([cart], model=api.Model(loaded),
                                                                read=ReadConfig(prefix=False))}
        budget = readers["indexed, as stored"].memory.budget
        for q in (q["q"] for q in random.Random(n).sample(row["questions"], min(per_doc, len(row["questions"])))):
            _time_reads(loaded, row["context"], q, budget, readers, times)
    return {"documents": len(rows), "questions": len(times["retrieve"]),
            "ttft_p50_s": {k: round(statistics.median(v), 3) for k, v in times.items()}}


def _fifty_thousand(tmp: Path) -> dict:
    """A 50,000-token document (consecutive train-pool paragraphs, a long PDF's worth) compiled
    window by window as int8, then one question asked in a fresh process: its selection + load
    time and that process's peak memory, against the cartridge's size."""
    paragraphs = [json.loads(line)["context"] for line in TRAIN.read_text().splitlines()]
    text, words = [], 0
    for p in paragraphs:
        text.append(p)
        words += len(p.split())
        if words > 40_000:  # about 1.25 tokens a word
            break
    src = tmp / "long.txt"
    src.write_text("\n\n".join(text))
    cart = tmp / "long.lcc"
    seconds, proc = sh([*LCC, "compile", str(src), "--index", "--no-gist", "--kv-dtype", "int8", "-o", str(cart),
                        "--json"])
    ok(proc)
    compiled = json.loads(proc.stdout)
    code = ("import json, sys, time\n"
            "from lcc_cli import api\nfrom lcc_cli.config import AskConfig, ReadConfig\n"
            "loaded = api.load(api.RunOptions())\n"
            "started = time.perf_counter()\n"
            "reader = api.Reader([sys.argv[1]], model=api.Model(loaded), read=ReadConfig())\n"
            "opened = time.perf_counter() - started\n"
            "q = 'What did the city council decide about the new bridge?'\n"
            "started = time.perf_counter()\nview = reader.memory.view(q)\nchosen = time.perf_counter() - started\n"
            "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print(json.dumps({'open_s': round(opened, 3), 'select_and_load_s': round(chosen, 3), 'entries': view.stored + len(view.fresh),"
            " 'peak_mb': round(peak / 1024), 'bytes_read_mb': round(reader.memory.sources[0].handle.raw.bytes_read / 2**20, 1)}))\n")
    _, asked = sh([sys.executable, "-c", code, str(cart)], env={"OMP_WAIT_POLICY": "PASSIVE"})
    ok(asked)
    return {"tokens": compiled["tokens"], "compile_s": round(seconds, 1), "windows": compiled["index"]["windows"],
            "file_mb": round(cart.stat().st_size / 2**20), **json.loads(asked.stdout.strip().splitlines()[-1])}


SQUAD_TRAIN = ROOT / "build" / "squad" / "squad_train.jsonl"
LIBRARY = ROOT / "build" / "library"
SIZES = (10, 100, 1000)


def _library_rows(count: int = 1000) -> list[dict]:
    """`count` SQuAD train paragraphs (`make data`), one per article in turn, seeded."""
    import random

    if not SQUAD_TRAIN.is_file():
        raise SystemExit(f"{SQUAD_TRAIN} is missing: run `make data` first")
    rows = [json.loads(line) for line in SQUAD_TRAIN.read_text().splitlines()]
    rows = [r for r in rows if r["questions"] and 60 <= len(r["context"].split()) <= 250]
    random.Random(0).shuffle(rows)
    return rows[:count]


def _build_library(rows: list[dict]) -> dict:
    """build/library/{10,100,1000}/: the 1,000 compiled once (int8, no gist), the smaller
    ones hard links to the first of them (regular files: a library never follows links)."""
    full = LIBRARY / str(SIZES[-1])
    texts = LIBRARY / "texts"
    built = {}
    if not full.is_dir() or len(list(full.glob("*.lcc"))) < len(rows):
        texts.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(rows):
            (texts / f"p{i:04d}.txt").write_text(r["context"])
        seconds, proc = sh([*LCC, "compile", str(texts), "--index", "--no-gist", "--kv-dtype", "int8", "-o",
                            str(full) + "/", "--json"])
        ok(proc)
        built["compile_1000_s"] = round(seconds, 1)
    for size in SIZES[:-1]:
        folder = LIBRARY / str(size)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(size):
            target = folder / f"p{i:04d}.lcc"
            if not target.exists():
                os.link(full / f"p{i:04d}.lcc", target)
    return built


def measure_library(tmp: Path) -> dict:
    import random

    rows = _library_rows()
    out = {"built": _build_library(rows)}
    per_size = {}
    for size in SIZES:
        folder = LIBRARY / str(size)
        seconds, proc = sh([*LCC, "index", str(folder), "--rebuild", "--json"])
        ok(proc)
        built = seconds
        # one cartridge replaced by another document's: the incremental update
        victim, spare = folder / "p0000.lcc", LIBRARY / str(SIZES[-1]) / f"p{size:04d}.lcc"
        keep = tmp / "keep.lcc"
        shutil.copyfile(victim, keep)
        victim.unlink()
        shutil.copyfile(spare if spare.exists() else keep, victim)
        update, proc = sh([*LCC, "index", str(folder), "--json"])
        ok(proc)
        victim.unlink()
        shutil.copyfile(keep, victim)  # back as it was (a copy now: unlinked from the 1,000's file)
        ok(sh([*LCC, "index", str(folder), "--json"])[1])
        questions = [q["q"] for r in rows[:size] for q in r["questions"][:1]]
        questions = random.Random(size).sample(questions, min(40, len(questions)))
        code = ("import json, statistics, sys, time\n"
                "from lcc_cli import api\nfrom lcc_cli.config import AskConfig, ReadConfig\n"
                "loaded = api.load(api.RunOptions())\n"
                "reader = api.Reader([sys.argv[1]], model=api.Model(loaded), read=ReadConfig(budget=24))\n"
                "qs = json.loads(sys.argv[2])\nselect, first = [], []\n"
                "for q in qs:\n"
                "    reader.memory.forget_choices()\n"
                "    t = time.perf_counter(); reader.memory.choose(q); select.append(time.perf_counter() - t)\n"
                "    reader.memory.forget_choices()\n"
                "    first.append(reader.ask(q, max_new_tokens=1).seconds_to_first_token)\n"
                "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
                "q = lambda v, p: sorted(v)[min(len(v) - 1, int(p * len(v)))]\n"
                "print(json.dumps({'select_p50_ms': round(1000 * statistics.median(select), 1),"
                " 'select_p95_ms': round(1000 * q(select, 0.95), 1), 'ttft_p50_s': round(statistics.median(first), 3),"
                " 'ttft_p95_s': round(q(first, 0.95), 3), 'peak_mb': round(peak / 1024)}))\n")
        _, asked = sh([sys.executable, "-c", code, str(folder), json.dumps(questions)], env={"OMP_WAIT_POLICY": "PASSIVE"})
        ok(asked)
        index_mb = (folder / ".lcc-index.sqlite").stat().st_size / 2**20
        per_size[size] = {"index_build_s": round(built, 2), "update_one_s": round(update, 2),
                          "index_mb": round(index_mb, 1), **json.loads(asked.stdout.strip().splitlines()[-1])}
    out["sizes"] = per_size
    out["ttft 1000 / 10"] = round(per_size[1000]["ttft_p50_s"] / per_size[10]["ttft_p50_s"], 2)
    out["quality"] = _library_quality(rows)
    return out


def library_picks(rows: list[dict], count: int = 200) -> list[tuple[int, dict]]:
    """(paragraph number, question): the library quality check's questions, one per paragraph."""
    import random

    picks = [(i, q) for i, r in enumerate(rows) for q in r["questions"][:1]]
    return random.Random(1).sample(picks, min(count, len(picks)))


def paired(a_rows: list[dict], b_rows: list[dict], metric: str, names: tuple[str, str]) -> dict:
    """Means of `metric` over the same questions answered two ways, and b − a with a 95%
    bootstrap interval over questions."""
    import random

    diffs = [b[metric] - a[metric] for a, b in zip(a_rows, b_rows)]
    rng = random.Random(0)
    boots = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(5000))
    return {names[0]: round(sum(r[metric] for r in a_rows) / len(a_rows), 3),
            names[1]: round(sum(r[metric] for r in b_rows) / len(b_rows), 3),
            "diff": round(sum(diffs) / len(diffs), 3), "ci95": [round(boots[125], 3), round(boots[4875], 3)],
            "better/worse": [sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)]}


def _library_quality(rows: list[dict], count: int = 200) -> dict:
    """Questions whose gold paragraph is in the 1,000-cartridge library, answered from the
    library and from their own cartridge alone at the same budget (their paragraph's tokens / 8),
    paired: what searching the haystack costs."""

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lcc_cli import api
    from lcc_cli.config import AskConfig, ReadConfig
    from lcc_cli.scoring import score
    from lcc_cli.format.cartridge import open_cartridge
    from lcc_cli.eval.run import answers
    from lcc_cli.runtime.memory import open_memory
    from lcc_cli.runtime.memory.library import LibraryMemory
    from lcc_cli.runtime.prefix import reading_prefix
    from lcc_cli.library.index import Library

    loaded = api.load(api.RunOptions())
    picks = library_picks(rows, count)
    folder = LIBRARY / str(SIZES[-1])
    ask = AskConfig(max_new_tokens=32)
    own_rows, lib_rows = [], []
    by_budget: dict[int, list] = {}
    for i, q in picks:
        cart = open_cartridge(folder / f"p{i:04d}.lcc")
        budget = -(-cart.manifest["source"]["token_count"] // 8)
        by_budget.setdefault(budget, []).append((i, q, cart))
    library = Library(folder)
    for budget, items in by_budget.items():
        lib = LibraryMemory(loaded, library, ReadConfig(budget=budget))
        prefix = reading_prefix(loaded)  # the default read, on both sides
        got = answers(loaded, lib, [q["q"] for _, q, _ in items], ask, prefix)
        for (i, q, cart), a in zip(items, got):
            own = answers(loaded, open_memory([cart], loaded, read=ReadConfig(budget=budget)), [q["q"]], ask, prefix)[0]
            own_rows.append(score(own.text, q["answers"]))
            lib_rows.append(score(a.text, q["answers"]))
            lib_rows[-1]["own_page_read"] = any(p["cartridge"] == f"p{i:04d}.lcc" for p in lib.read_pages(q["q"]))
    out = {"questions": len(own_rows)}
    for metric in ("contains", "f1"):
        out[metric] = paired(own_rows, lib_rows, metric, ("own", "library"))
        own, lib = out[metric]["own"], out[metric]["library"]
        out[metric]["library / own"] = round(lib / own, 3) if own else None
    out["own page read"] = round(sum(r["own_page_read"] for r in lib_rows) / len(lib_rows), 3)
    return out


def render(results: dict) -> str:
    lines = ["# Measurements beside the eval", "",
             f"Machine: {os.cpu_count()} CPU cores, no GPU. Each table's conditions ran one after another in one run "
             "(`python bench/measure.py`); read ratios, not absolute seconds (the machine is shared).", ""]
    if "questions" in results:
        q = results["questions"]
        lines += ["## Many questions per process", "",
                  f"{q['questions']} questions about examples/harbor.md: one `lcc ask --questions` process took "
                  f"{q['one_process_s']} s; {q['questions']} separate `lcc ask` processes took "
                  f"{q['separate_processes_s']} s ({q['speedup']}x).", ""]
    if "backends" in results:
        b = results["backends"]
        lines += ["## Executors: a 20-paragraph batch (`--quality balanced --steps 2`)", "",
                  "| backend | seconds | documents | documents / minute |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['seconds']} | {v['documents']} | {v['documents_per_minute']} |" for k, v in b.items()
                  if k != "ray_fixed_cost"]
        fc = b.get("ray_fixed_cost", {})
        lines += ["", f"Ray's fixed cost, measured on its own: `ray.init` {fc.get('init_s')} s, shutdown "
                      f"{fc.get('shutdown_s')} s (plus one model load per actor).", ""]
    if "contention" in results:
        c = results["contention"]
        lines += ["## A busy machine: 6-step compile of the README example (whole process, seconds)", "",
                  "| settings | idle | busy loop on one core | second lcc compile | busy / idle | second lcc / idle |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['idle']} | {v['busy loop on one core']} | {v['second lcc compile']} | "
                  f"{v['busy / idle']} | {v['second lcc / idle']} |" for k, v in c.items()]
        lines.append("")
    if "train" in results:
        t = results["train"]
        lines += ["## A training step, document by document and batched", "",
                  f"One step of the default TrainConfig (8 bench paragraphs + 1 long document, ratio 8), forward and "
                  f"backward, {t['threads']} threads, {t['dtype']}; median of 3, the two ways alternating; "
                  f"{t['tokens_per_step']:,} tokens per step.", "",
                  "| step | seconds | tokens / s |", "|---|---|---|",
                  f"| per document | {t['per document']['seconds']} | {t['per document']['tokens_per_s']} |",
                  f"| batched | {t['batched']['seconds']} | {t['batched']['tokens_per_s']} |", "",
                  f"Batched / per document: {t['batched / per document']}x.", ""]
    if "serve" in results:
        v = results["serve"]
        lines += ["## `lcc serve`: concurrent clients (README example cartridge, `fast`, 32 new tokens)", "",
                  "| condition | requests | seconds | requests / s | p50 latency s | p95 latency s |",
                  "|---|---|---|---|---|---|",
                  f"| one `lcc ask --questions` process (model load included) | {v['questions']} | "
                  f"{v['ask_questions_s']} | {v['ask_questions_per_s']} | – | – |"]
        lines += [f"| serve, {c} concurrent client{'s' if c > 1 else ''} | {v[f'clients_{c}']['requests']} | "
                  f"{v[f'clients_{c}']['seconds']} | {v[f'clients_{c}']['requests_per_s']} | "
                  f"{v[f'clients_{c}']['p50_s']} | {v[f'clients_{c}']['p95_s']} |" for c in (1, 4, 16)]
        lines += ["", f"Time to the first streamed token (median of 5): from the cartridge "
                      f"{v['first_token_cartridge_s']} s; the same model with the document in the prompt "
                      f"{v['first_token_document_in_prompt_s']} s.", ""]
    if "indexed" in results:
        x = results["indexed"]
        t = x["ttft_p50_s"]
        lines += ["## Indexed cartridges: time to first token, storage, compile", "",
                  f"{x['questions']} questions of the first {x['documents']} long-bench documents (about 3k tokens), "
                  f"each answered under every condition in turn (one new token; the page budget is the document's "
                  f"tokens / 16, the same number of tokens `retrieve` prefills). Median seconds to the first token, "
                  f"choosing and reading the pages (or the sentences) included:", "",
                  "| condition | first token (p50) |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in t.items()]
        lines += ["", f"indexed int8 / retrieve: {x['indexed_int8 / retrieve']}; indexed int8 / full: "
                      f"{x['indexed_int8 / full']}; with the reading prefix / without: "
                      f"{x.get('indexed_int8 / no prefix')}; " + "; ".join(
                          f"repair {r} / retrieve: {x[f'repair_{r} / retrieve']}" for r in REPAIRS
                          if f"repair_{r} / retrieve" in x) + ".", "",
                  "Bytes per document token (file size / context tokens): " + ", ".join(
                      f"{k} {v:,}" for k, v in x["bytes_per_token"].items()) + f". Compile (int8): "
                  f"{x['compile_pe_int8']} prefills of the same document.", ""]
        para = x.get("paragraphs")
        if para:
            p50 = para["ttft_p50_s"]
            lines += [f"Paragraphs at 8x ({para['questions']} questions of the first {para['documents']} paragraphs of "
                      f"the shared sample; about 27 entries, so re-encoded whole by default, in the question's own "
                      f"pass): first token (p50) " + ", ".join(f"{k} {v} s" for k, v in p50.items())
                      + f"; the default / retrieve: {round(p50['indexed, re-encoded (default)'] / p50['retrieve'], 3)}.",
                      ""]
        d = x.get("long_document")
        if d:
            lines += [f"A {d['tokens']:,}-token document: compiled in {d['compile_s']} s ({d['windows']} windows), "
                      f"{d['file_mb']} MB (int8). One question in a fresh process: cartridge opened in {d['open_s']} s, "
                      f"pages chosen and read in {d['select_and_load_s']} s ({d['entries']} entries, "
                      f"{d['bytes_read_mb']} MB read), peak memory {d['peak_mb']} MB (the model included).", ""]
    if "library" in results:
        x = results["library"]
        lines += ["## Libraries: 10, 100 and 1,000 indexed cartridges (SQuAD train paragraphs, int8)", "",
                  "| cartridges | index build s | update one s | index MB | selection p50 / p95 ms | "
                  "first token p50 / p95 s | peak MB |", "|---|---|---|---|---|---|---|"]
        for size, v in x["sizes"].items():
            lines.append(f"| {size} | {v['index_build_s']} | {v['update_one_s']} | {v['index_mb']} | "
                         f"{v['select_p50_ms']} / {v['select_p95_ms']} | {v['ttft_p50_s']} / {v['ttft_p95_s']} | "
                         f"{v['peak_mb']} |")
        q = x["quality"]
        lines += ["", f"Time to first token, 1,000 / 10 cartridges: {x['ttft 1000 / 10']}x. Index build and update "
                      f"are whole `lcc index` processes (model-free). Selection and first token: 40 questions each, "
                      f"a budget of 24 entries, one process per size (peak memory is that process's, model included).",
                  "", f"Quality, {q['questions']} questions whose paragraph is in the 1,000 (budget: the paragraph's "
                      f"tokens / 8), paired: "
                  + "; ".join(f"{m} own {q[m]['own']}, library {q[m]['library']} ({q[m]['library / own']} of own; "
                              f"difference {q[m]['diff']}, 95% CI {q[m]['ci95'][0]}..{q[m]['ci95'][1]})"
                              for m in ("contains", "f1"))
                  + f". The library read the question's own paragraph for {q['own page read']} of them.", ""]
    if "sizes" in results:
        s = results["sizes"]
        lines += ["## File sizes", "", "```", json.dumps(s, indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    names = ["questions", "backends", "contention", "sizes", "train", "serve", "indexed", "library"]
    parser.add_argument("what", nargs="*", default=["all"], choices=[*names, "all"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "measurements.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    todo = names if "all" in args.what else args.what
    with tempfile.TemporaryDirectory() as tmp:
        for name in todo:
            print(f"measuring {name}…", flush=True)
            sub = Path(tmp) / name
            sub.mkdir()
            results[name] = globals()[f"measure_{name}"](sub)
            path.write_text(json.dumps(results, indent=1))
            (out / "measurements.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()

"""`lcc serve` on the tiny model: the real openai client, limits, safety, batching."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import httpx
import pytest

from conftest import run_opts
from lcc_cli import api
from lcc_cli.config import AskConfig
from lcc_cli.serve.app import Limits
from lcc_cli.serve.run import build

QUESTION = "Who designed the lighthouse?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in a thread of this test process (uvicorn on a free port)."""

    def __init__(self, loaded, paths, limits=Limits(), api_key=None, read=None):
        import uvicorn

        self.app, self.catalog, self.engine = build(loaded, paths, limits, api_key, read=read)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


@pytest.fixture(scope="module")
def served(tiny_model_dir, compiled, tmp_path_factory):
    from lcc_cli.api import load

    folder = tmp_path_factory.mktemp("served")
    shutil.copy(compiled[0], folder / "harbor.lcc")
    shutil.copy(compiled[0], folder / "copy.lcc")
    (folder / "broken.lcc").write_bytes(b"not a cartridge")
    loaded = load(run_opts(tiny_model_dir))
    server = Running(loaded, [folder], Limits(max_queue=4, max_batch=4, max_body_bytes=4096, max_messages=3,
                                              max_tokens=64))
    yield server, folder, loaded
    server.stop()


def _client(server, key="none"):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_gets_the_same_text_as_ask(served, compiled, tiny_model_dir):
    server, _, loaded = served
    want = api.ask([QUESTION], [compiled[0]], cfg=AskConfig(max_new_tokens=12), loaded=loaded)[0].text
    client = _client(server)
    got = client.chat.completions.create(model="harbor", messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=12)
    assert got.choices[0].message.content == want and got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.completion_tokens >= 1
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="harbor", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, stream=True)]
    assert "".join(pieces) == want and len([p for p in pieces if p]) >= 1
    plain = api.ask([QUESTION], [], cfg=AskConfig(max_new_tokens=12), loaded=loaded)[0].text
    got = client.chat.completions.create(model=loaded.model_id, messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=12)
    assert got.choices[0].message.content == plain


def test_composed_cartridges_answer_like_ask_with_two(served, compiled):
    server, _, loaded = served
    want = api.ask([QUESTION], [compiled[0], compiled[0]], cfg=AskConfig(max_new_tokens=8), loaded=loaded)[0].text
    got = _client(server).chat.completions.create(model="harbor+copy", max_tokens=8,
                                                  messages=[{"role": "user", "content": QUESTION}])
    assert got.choices[0].message.content == want


def test_models_lists_cartridges_and_why_one_is_unavailable(served):
    server, _, loaded = served
    data = httpx.get(server.url + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert {loaded.model_id, "harbor", "copy", "broken"} <= set(by_id)
    assert by_id["harbor"]["lcc"]["available"] and by_id["harbor"]["lcc"]["slots"] > 0
    assert not by_id["broken"]["lcc"]["available"] and by_id["broken"]["lcc"]["reason"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "broken", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "unavailable" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("model", ["../harbor", "/etc/passwd", "harbor.lcc", "sub/harbor", "nothing", "harbor+..",
                                   "..%2Fharbor"])
def test_names_that_are_not_served_cartridges_are_404_never_a_file_read(served, model):
    server, _, _ = served
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "invalid"),
    (json.dumps({"model": "harbor"}).encode(), 400, "messages"),
    (json.dumps({"model": "harbor", "messages": [{"role": "user", "content": "x"}] * 4}).encode(), 400, "at most 3"),
    (json.dumps({"model": "harbor", "max_tokens": 65, "messages": [{"role": "user", "content": "x"}]}).encode(),
     400, "limit of 64"),
    (json.dumps({"model": "harbor", "messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 413, "bytes"),
    (json.dumps({"model": "harbor", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     400, "invalid"),
    (json.dumps({"model": "harbor", "temperature": -1, "messages": [{"role": "user", "content": "x"}]}).encode(),
     400, "temperature"),
])
def test_limits_and_malformed_requests_are_4xx(served, body, status, fragment):
    server, _, _ = served
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_a_prompt_past_the_window_is_refused(served, compiled):
    _, _, loaded = served
    server = Running(loaded, [compiled[0]])  # default limits: a 30k-character message is allowed
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "doc", "max_tokens": 64, "messages": [
            {"role": "user", "content": "x " * 15_000}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "doc", "max_tokens": 64, "messages": [
            {"role": "user", "content": "x" * 40_000}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "message_too_long"
    finally:
        server.stop()


def test_a_cartridge_dropped_into_the_folder_is_served_without_a_restart(served, compiled):
    server, folder, _ = served
    shutil.copy(compiled[0], folder / ".new.lcc.tmp")  # as an atomic write does: hidden, then renamed
    (folder / ".new.lcc.tmp").rename(folder / "new.lcc")
    got = _client(server).chat.completions.create(model="new", max_tokens=4,
                                                  messages=[{"role": "user", "content": QUESTION}])
    assert got.choices[0].message.content is not None


def test_concurrent_clients_get_their_own_answers_and_are_batched(served, compiled, monkeypatch):
    """The model is held busy until all four requests wait, so those the engine did not take
    first decode as one batch: the no-cross-talk check runs on a real batch, not on four
    single decodes."""
    server, _, loaded = served
    questions = ["Who designed the lighthouse?", "When was it completed?", "What colour is the tower?",
                 "Where is the harbour?"]
    want = {q: api.ask([q], [compiled[0]], cfg=AskConfig(max_new_tokens=10), loaded=loaded)[0].text for q in questions}
    before = list(server.engine.batch_sizes)
    gate, real = threading.Event(), server.engine._run
    monkeypatch.setattr(server.engine, "_run", lambda group: (gate.wait(30), real(group)))
    got = {}

    def one(q):
        got[q] = _client(server).chat.completions.create(model="harbor", max_tokens=10, messages=[
            {"role": "user", "content": q}]).choices[0].message.content

    threads = [threading.Thread(target=one, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while server.engine.load() < len(questions) and time.time() < deadline:
        time.sleep(0.02)
    gate.set()
    for t in threads:
        t.join()
    assert got == want
    sizes = server.engine.batch_sizes[len(before):]
    assert sum(sizes) == len(questions) and max(sizes) >= 2, sizes


def test_a_full_queue_is_429_and_a_client_that_leaves_frees_its_place(served, monkeypatch):
    server, _, _ = served
    engine = server.engine
    gate, real = threading.Event(), engine._run
    monkeypatch.setattr(engine, "_run", lambda group: (gate.wait(30), real(group)))  # hold the model busy
    body = {"model": "harbor", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
    clients = [httpx.Client(timeout=30) for _ in range(4)]
    streams = [c.stream("POST", server.url + "/v1/chat/completions", json=body) for c in clients]
    responses = [s.__enter__() for s in streams]  # each has its headers: the request is queued
    assert all(r.status_code == 200 for r in responses)
    deadline = time.time() + 10
    while engine.load() < 4 and time.time() < deadline:
        time.sleep(0.02)
    assert engine.load() == 4
    full = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False})
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    for s, c in zip(streams[:2], clients[:2]):  # two clients leave mid-stream
        s.__exit__(None, None, None)
        c.close()
    deadline = time.time() + 10
    while engine.load() > 2 and time.time() < deadline:
        time.sleep(0.02)
    assert engine.load() == 2
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.setdefault("r", httpx.post(
        server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)))
    thread.start()
    time.sleep(0.3)
    gate.set()
    thread.join(30)
    assert waiting["r"].status_code == 200
    for s, c in zip(streams[2:], clients[2:]):
        assert "[DONE]" in "".join(responses[streams.index(s)].iter_text())
        s.__exit__(None, None, None)
        c.close()
    assert engine.load() == 0


def test_an_api_key_is_required_when_set(tiny_model_dir, compiled):
    from lcc_cli.api import load

    server = Running(load(run_opts(tiny_model_dir)), [compiled[0]], api_key="s3cret")
    try:
        body = {"model": "doc", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 401
        assert httpx.post(server.url + "/v1/chat/completions", json=body,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert _client(server, "s3cret").chat.completions.create(**body).choices[0].message.content is not None
    finally:
        server.stop()


def test_serve_command_warns_off_loopback_and_exits_0_on_sigterm(tiny_model_dir, compiled, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "LCC_HOME": str(tmp_path / "home")}
    env.pop("LCC_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "lcc_cli", "serve", str(compiled[0]), "--host", "0.0.0.0",
                             "--port", str(port), "--model", str(tiny_model_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
            "model": "doc", "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}]}, timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "without --api-key" in err and "Traceback" not in err


def test_lcc_api_key_from_the_environment_and_sigterm_mid_request(tiny_model_dir, compiled, tmp_path):
    """LCC_API_KEY alone protects the server (no warning); a SIGTERM that arrives while a
    request decodes still ends in exit 0 and the client gets an answer or an error, never a
    hang."""
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "LCC_HOME": str(tmp_path / "home"), "LCC_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "lcc_cli", "serve", str(compiled[0]), "--port", str(port),
                             "--model", str(tiny_model_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "doc", "max_tokens": 48, "messages": [{"role": "user", "content": QUESTION}]}
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 401
        got = {}

        def ask():
            try:
                got["r"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=60,
                                      headers={"Authorization": "Bearer from-env"})
            except httpx.HTTPError as exc:  # a connection closed at shutdown is an answer too
                got["r"] = exc

        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        thread.join(60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert not thread.is_alive() and "r" in got
    assert "without --api-key" not in err and "Traceback" not in err


def test_a_cartridge_made_for_another_model_is_listed_unavailable(other_model_dir, compiled):
    """The fingerprint check `lcc verify` runs: a cartridge of the tiny model, served with a
    model of the same shapes and other weights, is listed with the reason and never read."""
    from lcc_cli.api import load

    server = Running(load(run_opts(other_model_dir)), [compiled[0]])
    try:
        card = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}["doc"]
        assert not card["lcc"]["available"] and "made for model" in card["lcc"]["reason"]
        r = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "doc", "max_tokens": 2, "messages": [{"role": "user", "content": QUESTION}]})
        assert r.status_code == 404 and "unavailable" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_stop_strings_cut_the_answer_and_never_leak_a_partial_match(served):
    from lcc_cli.runtime.text import visible

    assert visible("the harbour light", ["light"], final=False) == ("the harbour ", True)
    assert visible("the harbour li", ["light"], final=False) == ("the harbour ", False)  # may still become one
    assert visible("the harbour li", ["light"], final=True) == ("the harbour li", False)
    assert visible("abc", [""], final=False) == ("abc", False)

    server, _, _ = served
    ask = dict(model="harbor", max_tokens=12, messages=[{"role": "user", "content": QUESTION}])
    full = _client(server).chat.completions.create(**ask).choices[0].message.content
    assert len(full) > 4
    stop = full[len(full) // 2:len(full) // 2 + 3]
    want = full[:full.index(stop)].rstrip()
    plain = _client(server).chat.completions.create(**ask, stop=[stop]).choices[0]
    assert plain.message.content == want and plain.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _client(server).chat.completions.create(**ask, stop=[stop], stream=True) if c.choices)
    assert streamed == want


def test_a_system_message_leads_the_user_turn_and_text_parts_read_as_text(served, compiled):
    """What OpenAI clients send by default: a system message (the cartridge holds the system
    turn, so its text leads the user's) and content as a list of text parts."""
    server, _, loaded = served
    want = api.ask(["Answer briefly.\n\n" + QUESTION], [compiled[0]], cfg=AskConfig(max_new_tokens=10),
                   loaded=loaded)[0].text
    client = _client(server)
    got = client.chat.completions.create(model="harbor", max_tokens=10, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}])
    assert got.choices[0].message.content == want
    parts = client.chat.completions.create(model="harbor", max_tokens=10, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Who designed "}, {"type": "text", "text": "the lighthouse?"}]}])
    assert parts.choices[0].message.content == want


def test_a_client_that_gives_up_without_streaming_frees_its_place(served, monkeypatch):
    server, _, _ = served
    engine = server.engine
    gate, real = threading.Event(), engine._run
    monkeypatch.setattr(engine, "_run", lambda group: (gate.wait(30), real(group)))
    body = {"model": "harbor", "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}]}
    try:
        for _ in range(2):  # the first holds the model; the second waits behind it
            with pytest.raises(httpx.TimeoutException):
                httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1)
        deadline = time.time() + 10
        while engine.load() > 1 and time.time() < deadline:
            time.sleep(0.05)
        assert engine.load() <= 1  # the waiting one left the queue; the running one ends with its batch
    finally:
        gate.set()
    deadline = time.time() + 30
    while engine.load() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.load() == 0

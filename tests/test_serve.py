"""serve.py: the OpenAI-compatible server, driven by the official `openai` client (both modes),
by plain HTTP for the errors, and by this project's own clients (distill.py, evaluate.py judge)
end to end. The model is the tiny configuration with random weights in fp64, so that a reply
decoded in a batch with others is the reply decoded alone, token for token."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
import torch
from conftest import ROOT, popen_as_from_a_terminal

import distill
import evaluate
import generate
import engine as engine_module
import protocol
import serve
from data.schema import load_jsonl
from data.template import render
from model import CONFIGS, Transformer
from pretrained import load_transformer, save_model
from tokenizer import Tokenizer

openai = pytest.importorskip("openai")

JSON = {"Content-Type": "application/json"}  # what the server takes (issue 35: not text/plain)
QUESTIONS = ["我最近三天一直头痛，需要去医院吗？", "孩子发烧38.5度怎么办", "咳嗽两周了", "胃痛反酸烧心"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_file):
    out = tmp_path_factory.mktemp("served")
    save_model(Transformer.from_config(CONFIGS["tiny"], seed=3), out / "m", tokenizer=tokenizer_file)
    return out / "m"


def make_server(model_dir, **kw):
    return serve.start(model_dir, "huatuo-tiny", dtype=torch.float64, **kw)


@pytest.fixture(scope="module")
def server(model_dir):
    s = make_server(model_dir)
    yield s
    s.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def ask(client, question, **kw):
    return client.chat.completions.create(model="huatuo-tiny", messages=[{"role": "user", "content": question}], **kw)


def test_a_reply_is_the_doctors_reply_and_its_usage_counts_the_template(client, model_dir):
    doctor = evaluate.Doctor(model_dir, max_new_tokens=12, dtype=torch.float64)
    out = ask(client, QUESTIONS[0], temperature=0, max_tokens=12)
    assert out.object == "chat.completion" and out.model == "huatuo-tiny" and len(out.choices) == 1
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == doctor.reply([[{"role": "user", "content": QUESTIONS[0]}]])[0]
    tok = Tokenizer(model_dir / "tokenizer.model")
    prompt = render(tok, [{"role": "user", "content": QUESTIONS[0]}]).ids
    assert out.usage.prompt_tokens == len(prompt)
    if out.choices[0].finish_reason == "length":
        assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # A system message replaces the paper's system text: another prompt, counted as such.
    other = client.chat.completions.create(
        model="huatuo-tiny",
        temperature=0,
        max_tokens=4,
        messages=[{"role": "system", "content": "你是医生。"}, {"role": "user", "content": QUESTIONS[0]}],
    )
    assert other.usage.prompt_tokens == len(
        render(tok, [{"role": "user", "content": QUESTIONS[0]}], system="你是医生。").ids
    )


def test_the_stream_adds_up_to_the_reply(client):
    whole = ask(client, QUESTIONS[1], temperature=0, max_tokens=20)
    chunks = list(
        ask(client, QUESTIONS[1], temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_end_the_reply_in_both_modes(client):
    full = ask(client, QUESTIONS[2], temperature=0, max_tokens=30).choices[0].message.content
    assert len(full) > 8
    stop = full[5:8]  # three characters: held back while they might be starting
    cut = full[: full.find(stop)].strip()
    out = ask(client, QUESTIONS[2], temperature=0, max_tokens=30, stop=[stop, "不会出现的字符串"])
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in ask(client, QUESTIONS[2], temperature=0, max_tokens=30, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == cut


def test_n_choices_sampled_with_a_seed_are_reproducible(client):
    one = ask(client, QUESTIONS[3], temperature=1.0, top_p=0.9, max_tokens=10, n=3, seed=7)
    two = ask(client, QUESTIONS[3], temperature=1.0, top_p=0.9, max_tokens=10, n=3, seed=7)
    assert [c.index for c in one.choices] == [0, 1, 2]
    texts = [c.message.content for c in one.choices]
    assert texts == [c.message.content for c in two.choices] and len(set(texts)) > 1
    assert one.usage.completion_tokens == sum(10 if c.finish_reason == "length" else 0 for c in one.choices) or any(
        c.finish_reason == "stop" for c in one.choices
    )
    streamed = ["", "", ""]
    for c in ask(client, QUESTIONS[3], temperature=1.0, top_p=0.9, max_tokens=10, n=3, seed=7, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == texts


def wait_until_decoding(server, decoded: int):
    """Wait until the engine has run a decoding step beyond its first `decoded`."""
    end = time.monotonic() + 300  # a bound for a hang, not a measure of speed
    while server.engine.steps <= decoded and time.monotonic() < end:
        time.sleep(0.01)
    assert server.engine.steps > decoded


def widths_since(server, steps: int) -> list[int]:
    """The rows decoded at each step after the engine's first `steps`."""
    return list(server.engine.widths)[-(server.engine.steps - steps) :]


def test_requests_that_arrive_while_one_decodes_join_it_at_the_next_step(client, server):
    """Issue 36: they waited for the running batch to end; now they join it, and each reply is
    the one it gets alone (fp64)."""
    alone = [ask(client, q, temperature=0, max_tokens=16).choices[0].message.content for q in QUESTIONS[1:]]
    before = server.engine.steps
    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(ask, client, QUESTIONS[0], temperature=0, max_tokens=300)  # keeps the engine busy
        wait_until_decoding(server, before)
        together = [pool.submit(ask, client, q, temperature=0, max_tokens=16) for q in QUESTIONS[1:]]
        replies = [f.result().choices[0].message.content for f in together]
        assert not long.done()  # they ended while the long one went on
        long.result()
    assert replies == alone
    assert max(widths_since(server, before)) == 4 and widths_since(server, before)[-1] == 1


def test_bad_requests_get_a_json_error_naming_the_field(server):
    url = server.base_url + "/chat/completions"
    good = {"model": "huatuo-tiny", "messages": [{"role": "user", "content": "头痛"}], "max_tokens": 2}

    def post(body, status, param=None, code=None, **kw):
        r = requests.post(url, data=body if isinstance(body, (str, bytes)) else json.dumps(body), headers=JSON, **kw)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["param"] == param and (code is None or err["code"] == code)
        return err["message"]

    assert "not valid JSON" in post("{", 400)
    post(dict(good, model="gpt-4"), 404, "model", "model_not_found")
    post(dict(good, messages=[]), 400, "messages")
    post(
        dict(good, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
        400,
        "messages[1].role",
    )
    post(dict(good, messages=[{"role": "user", "content": 3}]), 400, "messages[0].content")
    post(dict(good, temperature=3), 400, "temperature")
    post(dict(good, n=0), 400, "n")
    post(dict(good, max_tokens="many"), 400, "max_tokens")
    post(dict(good, stop=["a"] * 5), 400, "stop")
    post(dict(good, tools=[{"type": "function"}]), 400, "tools")
    post(dict(good, top_logprobs=2), 400, "top_logprobs")  # without logprobs: true
    post(dict(good, logprobs=True, top_logprobs=21), 400, "top_logprobs")
    post(dict(good, stream_options={"include_usage": True}), 400, "stream_options")
    post(dict(good, messages=[{"role": "user", "content": "头痛" * 3000}]), 400, "messages", "context_length_exceeded")
    post(dict(good, max_tokens=4000), 400, "max_tokens")
    assert requests.get(server.base_url + "/nothing").status_code == 404
    assert requests.post(server.base_url.removesuffix("/v1") + "/v2/x", json={}).json()["error"]["code"] == "not_found"
    r = requests.get(server.base_url + "/models/huatuo-tiny")
    assert r.json()["id"] == "huatuo-tiny"
    # The server is still there after all of that.
    assert requests.post(url, json=good).status_code == 200


def test_limits_size_concurrency_and_key(model_dir, monkeypatch):
    s = make_server(model_dir, max_body=2000, max_concurrent=1, api_key="secret-key")
    try:
        url = s.base_url + "/chat/completions"
        auth = {"Authorization": "Bearer secret-key"}
        body = {"model": "huatuo-tiny", "messages": [{"role": "user", "content": "头痛"}], "max_tokens": 2}
        assert requests.post(url, json=body).status_code == 401
        assert requests.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert requests.get(s.base_url + "/models").status_code == 401
        assert requests.post(url, json=body, headers=auth).status_code == 200
        big = dict(body, messages=[{"role": "user", "content": "头" * 3000}])
        r = requests.post(url, json=big, headers=auth)
        assert r.status_code == 413 and "at most 2000 bytes" in r.json()["error"]["message"]
        # One request in flight at most: a second one at the same time is told to come back.
        with ThreadPoolExecutor(1) as pool:
            decoded = s.engine.steps
            slow = pool.submit(requests.post, url, json=dict(body, max_tokens=300), headers=auth)
            wait_until_decoding(s, decoded)
            refused = requests.post(url, json=body, headers=auth)
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert slow.result().status_code == 200
        # The official client with the key; it retries the 429 by itself.
        c = openai.OpenAI(base_url=s.base_url, api_key="secret-key")
        assert c.models.list().data[0].id == "huatuo-tiny"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base_url, api_key="nope", max_retries=0).models.list()
    finally:
        s.shutdown()


def test_a_client_that_leaves_mid_stream_frees_the_engine(client, server):
    cancelled, before = server.engine.abandoned, server.engine.steps
    stream = ask(client, QUESTIONS[0], temperature=0, max_tokens=1500, stream=True)
    next(iter(stream))
    stream.close()
    assert ask(client, QUESTIONS[1], temperature=0, max_tokens=2).choices
    end = time.monotonic() + 300  # a bound for a hang: the count of steps decides, not the clock
    while server.engine.abandoned == cancelled and time.monotonic() < end:
        time.sleep(0.01)
    assert server.engine.abandoned == cancelled + 1 and server.engine.steps - before < 1000  # not its 1,500 tokens


def test_distill_and_the_judge_run_against_the_local_server(server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    qa = ROOT / "data" / "eval" / "qa_test.jsonl"
    out = tmp_path / "polished.jsonl"
    code = distill.main(
        [
            "polish-qa",
            "--input",
            str(qa),
            "--out",
            str(out),
            "--base-url",
            server.base_url,
            "--model",
            "huatuo-tiny",
            "--limit",
            "2",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--workers",
            "2",
        ]
    )
    written = load_jsonl(out)
    rejected = load_jsonl(tmp_path / "polished.rejects.jsonl")
    assert code == 0 and len(written) + len(rejected) == 2
    prompt = distill.fill(
        distill.prompt("a3_polish_qa"),
        Patient_Question=written[0]["messages"][0]["content"],
        Doctor_Response=written[0]["meta"]["original_answer"],
    )
    direct = requests.post(
        server.base_url + "/chat/completions",
        json={
            "model": "huatuo-tiny",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 8,
        },
    ).json()["choices"][0]["message"]["content"]
    assert written[0]["messages"][1]["content"] == direct.strip()

    answers = out  # any two answer files in our schema; here the same one twice
    judged = tmp_path / "judge.jsonl"
    code = evaluate.main(
        [
            "judge",
            "--a",
            str(answers),
            "--b",
            str(answers),
            "--out",
            str(judged),
            "--base-url",
            server.base_url,
            "--judge-model",
            "huatuo-tiny",
            "--judge-retries",
            "0",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    outcomes = [r["outcome"] for r in load_jsonl(judged)]
    # A random tiny model does not say "Assistant 1 is better than Assistant 2": counted as unparsed.
    assert len(outcomes) == len(written) and set(outcomes) <= {"unparsed", "win", "tie", "loss"}
    assert all(r["judgments"][0]["reply"] is not None for r in load_jsonl(judged))


def serve_cli(model_dir, *extra) -> tuple[subprocess.Popen, str]:
    """`serve.py --model model_dir --name m` on a free port: the process and its base URL."""
    proc = popen_as_from_a_terminal(
        [sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", "0", "--name", "m", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("serving 'm' at http://127.0.0.1:"), line + proc.stderr.read()
    return proc, line.split(" at ")[1].split()[0]


def test_the_command_line_serves_until_stopped(model_dir):
    proc, base = serve_cli(model_dir)
    try:
        r = requests.post(
            base + "/chat/completions",
            json={"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "头痛"}]},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(10)


# -- reliability, round 3 (issue 24) ---------------------------------------------------------------------


def raw(server, data: bytes, timeout=10) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it (or the timeout)."""
    import socket

    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<still open>")
    return b"".join(chunks)


def test_stop_strings_are_bounded_and_held_back_in_linear_time(server):
    """A stop string of 262,000 characters made every token build all its prefixes: 8.7 s of the
    engine for 4 tokens. Stops are bounded, and what is held back is found by KMP, equal to the
    brute-force rule on random texts."""
    import random

    from generate import held_back

    url = server.base_url + "/chat/completions"
    body = {"model": "huatuo-tiny", "messages": [{"role": "user", "content": "头痛"}], "max_tokens": 2}
    r = requests.post(url, json=dict(body, stop=["痛" * (protocol.MAX_STOP_CHARS + 1)]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert requests.post(url, json=dict(body, stop=["痛" * protocol.MAX_STOP_CHARS] * 4)).status_code == 200
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
        brute = max([k for k in range(1, len(stop)) if text.endswith(stop[:k])], default=0)
        assert held_back(text, stop) == brute, (text, stop)


def test_a_client_that_leaves_before_a_whole_reply_frees_its_slot(model_dir):
    """Non-streaming clients that disconnected kept their rows decoding and held the slots: the
    next request got 429. A client gone is now noticed while it waits, its rows stop, the slot
    is free, and it is counted."""
    s = make_server(model_dir, max_concurrent=2)
    try:
        request = json.dumps(
            {
                "model": "huatuo-tiny",
                "max_tokens": 1500,
                "temperature": 0,
                "messages": [{"role": "user", "content": QUESTIONS[0]}],
            }
        ).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        for _ in range(2):
            raw(s, head + b"Content-Length: %d\r\n\r\n" % len(request) + request, timeout=0.3)  # then hangs up
        end = time.monotonic() + 300  # a bound for a hang
        while s.engine.abandoned < 2 and time.monotonic() < end:
            time.sleep(0.05)
        assert s.engine.abandoned == 2
        ok = requests.post(
            s.base_url + "/chat/completions",
            json={"model": "huatuo-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "头痛"}]},
        )
        assert ok.status_code == 200
    finally:
        s.shutdown()


def test_a_seeded_reply_is_the_same_alone_batched_and_as_choice_0(client, server):
    """One generator served the whole batch: the same prompt and seed gave another reply when
    batched with someone else's request, and choice 0 of n=2 differed from n=1."""
    kw = dict(temperature=1.0, max_tokens=12, seed=11)
    alone = ask(client, QUESTIONS[2], **kw).choices[0].message.content
    assert ask(client, QUESTIONS[2], n=2, **kw).choices[0].message.content == alone
    before = server.engine.steps
    with ThreadPoolExecutor(3) as pool:
        long = pool.submit(ask, client, QUESTIONS[0], temperature=1.0, max_tokens=300, seed=1)
        wait_until_decoding(server, before)
        mine = pool.submit(ask, client, QUESTIONS[2], **kw)
        other = pool.submit(ask, client, QUESTIONS[3], temperature=1.0, max_tokens=12, seed=99)
        batched = mine.result().choices[0].message.content
        other.result(), long.result()
    assert max(widths_since(server, before)) == 3  # the seeded request decoded beside two others
    assert batched == alone


def test_a_body_is_never_read_as_a_next_request(server):
    """A POST to an unknown path with a chunked body was answered 404 without reading the body,
    on a connection kept open: a request smuggled in that body was answered as a second one.
    Duplicate Content-Length headers were taken (the first one)."""
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    reply = raw(server, b"POST /v2/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
    assert reply.count(b"HTTP/1.1 ") == 1 and b" 404 " in reply and b'"object": "list"' not in reply
    body = b'{"model": "huatuo-tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1}'
    reply = raw(
        server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
        b"Content-Length: 3\r\n\r\n" % len(body) + body,
    )
    assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1 ") == 1 and b"more than once" in reply


def test_requests_that_broke_the_server_get_a_400_naming_the_field(server):
    url = server.base_url + "/chat/completions"
    good = {"model": "huatuo-tiny", "messages": [{"role": "user", "content": "头痛"}], "max_tokens": 2}

    def error(body, status=400):
        r = requests.post(url, data=body if isinstance(body, (bytes, str)) else json.dumps(body), headers=JSON)
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert "nested too deeply" in error(b"[" * 100_000 + b"]" * 100_000)["message"]  # a RecursionError before
    surrogate = json.dumps(good, ensure_ascii=False).replace("头痛", "\\ud800abc").encode()
    assert error(surrogate)["param"] == "messages[0].content"  # sentencepiece's RuntimeError before
    assert error(dict(good, top_p=1e-46))["param"] == "top_p"  # > 0, yet 0 in float32: a 500 before
    assert error(dict(good, temperature=1e-30))["param"] == "temperature"
    e = error(dict(good, max_token=5))  # a misspelt field was ignored, the reply ran to the default length
    assert e["param"] == "max_token" and e["code"] == "unknown_parameter"
    e = error({k: v for k, v in good.items() if k != "model"})
    assert e["param"] == "model" and "'huatuo-tiny'" in e["message"]  # was "no model None"
    assert requests.post(url, json=good).status_code == 200


def test_the_command_line_says_in_one_line_what_it_cannot_do_and_logs_a_line_a_request(model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot serve on 127.0.0.1 port {port}: ")
    has_ipv6 = (
        socket.has_ipv6
        and subprocess.run(
            ["python3", "-c", "import socket; socket.socket(socket.AF_INET6).bind(('::1', 0))"]
        ).returncode
        == 0
    )
    host = "::1" if has_ipv6 else "127.0.0.1"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", "0", "--host", host],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = []  # its stderr as it comes: a request whose client left may be logged after the next one
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 'm' at http://") and 'a request names it as its "model"' in line, line
        base = line.split(" at ")[1].split()[0]
        body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "头痛"}]}
        assert requests.post(base + "/chat/completions", json=body).status_code == 200
        with requests.post(base + "/chat/completions", json=dict(body, max_tokens=500, stream=True), stream=True) as r:
            next(r.iter_content(16))  # and leave mid-stream
        assert requests.post(base + "/chat/completions", json=body).status_code == 200
        end = time.monotonic() + 300  # a bound for a hang
        while sum('"POST /v1/chat/completions"' in line for line in log) < 3 and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
    reader.join(10)
    log = "".join(log)
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if '"POST /v1/chat/completions"' in line]
    assert len(lines) == 3, log  # one a request, the one whose client left too
    status, tokens, seconds = lines[0].split()[3:6]
    assert status == "200" and tokens.isdigit() and int(tokens) <= 3 and seconds.endswith("s"), lines[0]


def test_other_web_pages_can_neither_post_to_the_server_nor_read_it_under_their_name(model_dir):
    """Issue 35 item 3.1: without a key (the default on loopback), any page the user visited
    could POST text/plain (a request a browser sends without asking the server first), and a
    page whose name was rebound to 127.0.0.1 could read the replies. A body that is not
    application/json is refused, and so is a Host that is not the server's own name."""
    s = make_server(model_dir, allow_hosts=("chat.example",))
    try:
        url, port = s.base_url + "/chat/completions", s.server_address[1]
        body = json.dumps({"model": "huatuo-tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "头痛"}]})
        for media in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
            r = requests.post(url, data=body, headers={"Content-Type": media} if media else {})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", media
        r = requests.post(url, data=body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert r.status_code == 200
        foreign = {"Host": "attacker.example", "Origin": "http://attacker.example"}
        for method in (requests.get, requests.post):
            r = (
                method(s.base_url + "/models", headers=foreign)
                if method is requests.get
                else method(url, data=body, headers={**foreign, **JSON})
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
            assert "'attacker.example'" in r.json()["error"]["message"] and r.headers["Connection"] == "close"
        assert (
            requests.get(s.base_url.removesuffix("/v1") + "/", headers={"Host": "attacker.example"}).status_code == 403
        )
        for host in (
            f"localhost:{port}",
            "LOCALHOST",
            f"127.0.0.1:{port}",
            f"[::1]:{port}",
            "10.1.2.3",
            "chat.example",
        ):
            assert requests.get(s.base_url + "/models", headers={"Host": host}).status_code == 200, host
        assert requests.get(s.base_url + "/models", headers={"Host": "chat.example.evil"}).status_code == 403
    finally:
        s.shutdown()


def test_the_access_log_escapes_control_characters_and_counts_from_the_first_byte(model_dir, capfd):
    """Issue 35 items 3.2 and 3.4: `GET /\\x1b[2J` wrote the ESC byte to the operator's terminal,
    and a request sent after 2.5 s of idle keep-alive logged 2.55 s."""
    import http.client

    s = make_server(model_dir, access_log=True)
    try:
        raw(s, b"GET /\x1b[2J\x07\x9b HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        conn = http.client.HTTPConnection(*s.server_address[:2], timeout=10)
        for _ in range(2):
            conn.request("GET", "/v1/models")
            assert conn.getresponse().read()
            time.sleep(1.0)  # idle on the open connection before the next request
        conn.close()
    finally:
        s.shutdown()
    log = capfd.readouterr().err
    assert "\x1b" not in log and "\x07" not in log and "\x9b" not in log
    assert '"GET /\\x1b[2J\\x07\\x9b" 404' in log, log  # escaped as http.server escapes its own lines
    seconds = [float(line.split()[-1].rstrip("s")) for line in log.splitlines() if '"GET /v1/models"' in line]
    assert len(seconds) == 2 and max(seconds) < 0.5, log  # not the idle second before the request


def test_bearer_is_case_insensitive_and_a_wrong_key_is_said_to_be_refused(model_dir):
    """Issue 35 item 3.5: `Authorization: bearer KEY` was refused (the scheme's name is
    case-insensitive in HTTP), and a wrong key got the same message as none."""
    s = make_server(model_dir, api_key="s3cret")
    try:
        for given in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret"):
            assert requests.get(s.base_url + "/models", headers={"Authorization": given}).status_code == 200, given
        for given, says in (
            ("Bearer wrong", "the API key was refused"),
            ("Basic s3cret", "the API key was refused"),
            ("s3cret", "the API key was refused"),
            (None, "a valid bearer key is required"),
        ):
            r = requests.get(s.base_url + "/models", headers={"Authorization": given} if given else {})
            assert r.status_code == 401 and r.json()["error"]["message"].startswith(says), given
    finally:
        s.shutdown()


def test_a_kept_alive_connection_is_not_held_by_nagle(model_dir):
    """Issue 35 item 3.3: headers and body went out in two writes without TCP_NODELAY, so each
    kept-alive request waited for the client's delayed ACK (44 ms a request with the official
    client). Every connection the server accepts has TCP_NODELAY set (bench/bench_serve.py
    times the difference)."""
    import http.client
    import socket

    s = make_server(model_dir)
    accepted, get_request = [], s.get_request

    def recording():
        conn, address = get_request()
        accepted.append(conn)
        return conn, address

    s.get_request = recording
    try:
        conn = http.client.HTTPConnection(*s.server_address[:2], timeout=10)
        for _ in range(2):  # kept alive: one connection
            conn.request("GET", "/v1/models")
            assert conn.getresponse().read()
        assert len(accepted) == 1 and accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        conn.close()
    finally:
        s.shutdown()


def collect(job, timeout=120) -> tuple[list[str], list[str], dict]:
    """A job's texts, finish reasons and usage, from its events."""
    texts, finish = [""] * job.request.n, [None] * job.request.n
    while True:
        event = job.events.get(timeout=timeout)
        if isinstance(event, engine_module.Text):
            texts[event.choice] += event.text
        elif isinstance(event, engine_module.Finished):
            finish[event.choice] = event.reason
        elif isinstance(event, engine_module.Done):
            return texts, finish, event.usage
        else:
            raise AssertionError(event)


def reference_text(tok, tokens: list[int], max_tokens: int) -> str:
    """What a reply of these tokens reads as (ReplyText, as the server streams it)."""
    reply = generate.ReplyText(tok, [], max_tokens)
    for t in tokens:
        reply.push(t, tok.eos_id)
    return reply.content


def test_a_reply_is_the_same_alone_joining_a_running_batch_or_joined_mid_flight(model_dir):
    """Issue 36 item 3, on the engine itself (fp64): a greedy reply equals generate() alone,
    whether it ran alone (its prompt prefilled whole), joined rows already decoding (its prompt
    prefilled in chunks between their steps: 7 tokens a step here), or was joined by others
    mid-flight; a seeded sampled reply at another
    temperature decodes beside it and is the same as alone; a cancelled request frees its rows
    at once for the next."""
    model = load_transformer(model_dir, dtype=torch.float64).eval()
    tok = Tokenizer(model_dir / "tokenizer.model")
    engine = engine_module.Engine(model, tok, max_batch=4, prefill_chunk=7)

    def request(question, **kw):
        body = {"model": "m", "messages": [{"role": "user", "content": question}], **kw}
        return protocol.parse_request(body, tok, engine.context)

    long, short = (
        request(QUESTIONS[0], temperature=0, max_tokens=60),
        request(QUESTIONS[1], temperature=0, max_tokens=12),
    )
    assert len(short.ids) > 7 * 3  # joining rows that decode, its prefill takes several steps
    with torch.no_grad():
        expected = [
            reference_text(
                tok,
                generate.generate(
                    model, [r.ids], max_new_tokens=r.max_tokens, eos_id=tok.eos_id, temperature=0, vocab_limit=len(tok)
                ).tokens[0],
                r.max_tokens,
            )
            for r in (long, short)
        ]
    assert collect(engine.submit(long))[0] == [expected[0]]  # alone
    sampled = request(QUESTIONS[2], temperature=0.7, top_p=0.9, seed=5, max_tokens=20)
    sampled_alone = collect(engine.submit(sampled))[0]
    before = engine.steps
    first = engine.submit(long)
    wait_until_decoding(SimpleNamespace(engine=engine), before)
    joined, beside = engine.submit(short), engine.submit(sampled)
    assert collect(joined)[0] == [expected[1]]  # it joined the running row
    assert collect(beside)[0] == sampled_alone  # its own temperature, top_p and seed, beside greedy rows
    assert collect(first)[0] == [expected[0]]  # joined mid-flight, unchanged
    assert max(widths_since(SimpleNamespace(engine=engine), before)) >= 2  # rows decoded together

    # Cancellation: a request holding every row is cancelled mid-reply; the next one gets the rows.
    wide = request(QUESTIONS[3], temperature=1.0, n=4, max_tokens=500)
    before = engine.steps
    hog = engine.submit(wide)
    wait_until_decoding(SimpleNamespace(engine=engine), before)
    hog.cancelled = True
    texts, finish, usage = collect(hog)
    assert finish == [None] * 4 and usage["completion_tokens"] < 4 * 500  # stopped, nothing more sent
    assert collect(engine.submit(short))[0] == [expected[1]] and engine.abandoned == 1 and not engine.rows


def test_log_probabilities_are_the_models_own_streaming_and_not(client, model_dir):
    """Issue 36 item 4: logprobs and top_logprobs, as the Chat Completions API defines them
    (choices[].logprobs.content[]: token, logprob, bytes, top_logprobs), read by the official
    client; each logprob is the model's own log-probability of the token it sampled
    (model.token_logprobs, the whole vocabulary, fp64), and the top ones are in order."""
    model = load_transformer(model_dir, dtype=torch.float64).eval()
    tok = Tokenizer(model_dir / "tokenizer.model")
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    ids = protocol.parse_request({"model": "m", "messages": messages}, tok, model.config.max_position_embeddings).ids
    with torch.no_grad():
        gen = generate.generate(
            model,
            [ids],
            max_new_tokens=10,
            eos_id=tok.eos_id,
            temperature=0,
            vocab_limit=len(tok),
            return_logprobs=True,
        )
    tokens, logprobs = gen.tokens[0], gen.logprobs[0]
    if tokens[-1] == tok.eos_id:  # eos ends the reply: not part of its content
        tokens, logprobs = tokens[:-1], logprobs[:-1]
    r = client.chat.completions.create(
        model="huatuo-tiny", messages=messages, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == [engine_module.token_bytes(tok, t) for t in tokens]
    for c, expected in zip(content, logprobs):
        assert abs(c.logprob - expected) < 1e-9 and c.token == bytes(c.bytes).decode("utf-8", "backslashreplace")
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == c.logprob  # greedy: the top one taken
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
    streamed = []
    for chunk in client.chat.completions.create(
        model="huatuo-tiny", messages=messages, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3, stream=True
    ):
        for choice in chunk.choices:
            streamed += choice.logprobs.content if choice.logprobs else []
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
    plain = ask(client, QUESTIONS[1], temperature=0, max_tokens=10)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


# -- reliability, round 5 (issue 44) ---------------------------------------------------------------------


def events_until_end(job, timeout=120) -> list:
    """A job's events up to its Done or Failed."""
    events = []
    while not events or not isinstance(events[-1], (engine_module.Done, engine_module.Failed)):
        events.append(job.events.get(timeout=timeout))
    return events


def fail_once(model, when, columns: list):
    """model's next forward for which when(args, kwargs) holds raises (an out-of-memory on a GPU);
    `columns` gets the cache columns each decoding step writes (a list a step)."""
    real, armed = model.forward, [True]

    def forward(*args, **kwargs):
        if armed[0] and when(args, kwargs):
            armed[0] = False
            raise RuntimeError("CUDA out of memory (simulated)")
        if is_decoding_step(args, kwargs):
            columns.append(kwargs["start"].flatten().tolist())
        return real(*args, **kwargs)

    model.forward = forward


def is_decoding_step(args, kwargs) -> bool:
    return torch.is_tensor(kwargs.get("start"))  # CacheRows.step: a cache column per row


def is_prefill(args, kwargs) -> bool:
    return isinstance(kwargs.get("start"), int)


def test_a_failed_step_leaves_nothing_of_its_requests_for_the_next(model_dir):
    """Issue 44 item 1: after the model raised in a step, the rows were cleared but not their
    cache columns, and the next request decoded in the failed one's row at its length (attending
    to another user's prompt). After a failure in decoding, and in a prefill beside a decoding
    row, the next requests decode at the columns a fresh engine uses, and their replies equal a
    fresh engine's token for token (fp64, sharp weights: attention that depends on what it
    reads; greedy and seeded)."""
    from conftest import sharpen_

    tok = Tokenizer(model_dir / "tokenizer.model")
    models = [sharpen_(load_transformer(model_dir, dtype=torch.float64), seed=1).eval() for _ in range(2)]
    fresh_columns, columns = [], []
    fail_once(models[0], lambda *_: False, fresh_columns)
    fail_once(models[1], is_decoding_step, columns)
    fresh = engine_module.Engine(models[0], tok, max_batch=4)
    engine = engine_module.Engine(models[1], tok, max_batch=4, prefill_chunk=7)

    def request(question, **kw):
        body = {"model": "m", "messages": [{"role": "user", "content": question}], **kw}
        return protocol.parse_request(body, tok, engine.context)

    nexts = [request(QUESTIONS[1], temperature=0, max_tokens=12), request(QUESTIONS[2], seed=3, n=2, max_tokens=12)]
    expected = [collect(fresh.submit(r)) for r in nexts]
    try:
        # A failure in a decoding step: the request that was decoding hears it.
        failed = events_until_end(engine.submit(request(QUESTIONS[3], temperature=0, max_tokens=20)))
        assert isinstance(failed[-1], engine_module.Failed) and "out of memory" in failed[-1].message
        columns.clear()
        assert [collect(engine.submit(r)) for r in nexts] == expected
        assert columns == fresh_columns

        # A failure in a prefill while another request decodes: both hear it.
        before = engine.steps
        long = engine.submit(request(QUESTIONS[0], temperature=0, max_tokens=400))
        wait_until_decoding(SimpleNamespace(engine=engine), before)
        fail_once(models[1], is_prefill, [])
        joining = engine.submit(request(QUESTIONS[3], temperature=0, max_tokens=20))
        assert isinstance(events_until_end(joining)[-1], engine_module.Failed) and isinstance(
            events_until_end(long)[-1], engine_module.Failed
        )
        columns.clear()
        assert [collect(engine.submit(r)) for r in nexts] == expected
        assert columns == fresh_columns
    finally:
        for e in (engine, fresh):
            getattr(e, "close", lambda: None)()


def test_a_request_for_more_choices_than_rows_is_refused_and_the_next_is_answered(model_dir):
    """Issue 44 item 1: n > --max-batch could never be admitted, and every request behind it
    waited forever (first come, first served)."""
    s = make_server(model_dir, max_batch=2)
    try:
        url = s.base_url + "/chat/completions"
        body = {"model": "huatuo-tiny", "messages": [{"role": "user", "content": "头痛"}], "max_tokens": 3}
        r = requests.post(url, json=dict(body, n=3), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert "at most 2" in r.json()["error"]["message"]
        r = requests.post(url, json=dict(body, n=2), timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    finally:
        s.shutdown()
        s.engine.close()


@pytest.mark.parametrize("field", ["max_tokens", "n", "seed", "top_logprobs", "temperature", "top_p"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_in_a_number_field_are_a_400_naming_it(server, field, value):
    """Issue 44 item 1: "max_tokens": NaN (a JSON extension Python's json reads) raised in the
    handler and dropped the connection with no answer."""
    extra = ', "logprobs": true' if field == "top_logprobs" else ""
    data = (
        '{"model": "huatuo-tiny", "messages": [{"role": "user", "content": "hi"}], "%s": %s%s}' % (field, value, extra)
    ).encode()
    r = requests.post(server.base_url + "/chat/completions", data=data, headers=JSON, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_ctrl_c_while_replies_stream_stops_cleanly(model_dir):
    """Issue 44 item 1: Ctrl-C while a reply streamed ended in "terminate called without an active
    exception" (SIGABRT, exit 134): the engine's thread was still inside torch at exit. Now the
    stream hears that the server stops, the thread is joined, and the exit is 130 with one line."""
    import signal

    proc, base = serve_cli(model_dir, "--quiet")
    try:
        body = {"model": "m", "max_tokens": 1500, "stream": True, "temperature": 0}  # greedy: no eos for long
        body["messages"] = [{"role": "user", "content": QUESTIONS[0]}]
        r = requests.post(base + "/chat/completions", json=body, stream=True, timeout=60)
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")  # the stream has begun
        proc.send_signal(signal.SIGINT)
        rest = [line for line in lines if line]
        assert rest[-1] == b"data: [DONE]" and b"the server is stopping" in rest[-2]
        _, err = proc.communicate(timeout=60)  # generous: it stops between two steps of a tiny model
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["stopped (Ctrl-C); 1 request(s) in flight were told the server is stopping"]

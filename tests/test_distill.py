"""distill.py and chat_api.py against a scripted local Chat Completions server."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from fake_openai import FakeOpenAI

import distill
import chat_api
from chat_api import APIError, ChatClient, fill, prompt
from data.schema import RecordError
from distill import keep_novel, lcs_similarity, parse_dialogue, parse_ratings, parse_triples

# Its tail (checked alone below: a log must not print even the last 4 characters) has capitals:
# all digits, "3456", once matched a random port of the fake server's URL (127.0.0.1:34561),
# and no port, loopback address or pytest tmp path (lowercase) can hold "Qz7W".
KEY = "sk-test-DO-NOT-LEAK-xQz7W"
EVAL = ROOT / "data" / "eval"


def respond(messages):
    """Replies by which of the paper's prompts is being answered."""
    first = messages[0]["content"]
    if "20个不同的<角色" in first:
        return (
            "角色：心内科医生\n指令：请解释下面这份心电图报告的意思。\n输入：窦性心律，ST段压低0.1mV。\n"
            "5. 角色：药师\n指令：请用通俗的语言向老年患者解释下面这种药物的服用方法和注意事项。\n输入：二甲双胍片\n"
            "6. 角色：护士\n指令：列出糖尿病足的日常护理要点。\n输入：无\n"
            "7. 这一条没有标签也没有第二行"
        )
    if first.startswith("假设你是一名经验丰富的"):
        return "您好，" + re.search(r"经验丰富的(\S+?),会对患者", first).group(1) + "建议您先休息，必要时就医。"
    if first.startswith("你是一名患者"):
        said = sum(m["role"] == "assistant" for m in messages)
        return ["医生你好，我头痛。", "大概三天了，没有发烧。", "好的，谢谢医生，再见"][min(said, 2)]
    if messages[0]["role"] == "system" and "你是一名经验丰富的医生" in first:
        return f"（医生第{(len(messages) - 1) // 2 + 1}次回答）请问还有别的症状吗？"
    if first.startswith("<患者问题>"):
        return "<HuatuoGPT回复>: 您好，根据您的描述，建议多喝水，注意观察。"
    if first.startswith("你现在是一名医疗大模型"):
        turns = re.findall(r"^(病人|医生)：(.*)$", first, re.M)
        if any("坏" in t for _, t in turns):
            turns = turns[:-1]  # a rewrite that loses a turn
        return "\n".join(f"{'患者' if s == '病人' else '医疗大模型'}：{t}（润色）" for s, t in turns)
    if "Rating A" in first:
        a = re.search(r"\[Assistant A\] (.*?) \[End of Assistant A\]", first, re.S).group(1)
        b = re.search(r"\[Assistant B\] (.*?) \[End of Assistant B\]", first, re.S).group(1)
        if "乱码" in a or "乱码" in b:
            return "I cannot decide."
        if "偏心" in a + b:  # a judge that always prefers the first position
            return "Rating A: 9; Rating B: 3"

        def score(t):
            return int(re.search(r"质量(\d+)", t).group(1))

        return f"The first is fine. Rating A: {score(a)}; Rating B: {score(b)}"
    return "?"


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = FakeOpenAI(respond)
    yield server
    server.close()


def run_cli(api, *args):
    return distill.main([*args, "--base-url", api.url, "--backoff", "0.01", "--workers", "2"])


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- the client ------------------------------------------------------------------------------------


def test_client_retries_every_transient_failure(api):
    client = ChatClient(api.url, "m", timeout=0.5, backoff=0.01, max_attempts=6)
    api.faults = ["429", "500", "slow", "truncated"]
    t = time.time()
    reply = client.chat([{"role": "user", "content": "<患者问题>: 头痛"}])
    assert reply.content.startswith("<HuatuoGPT回复>")
    assert client.stats.requests == 5 and client.stats.retries == 4
    assert time.time() - t >= 1.0  # Retry-After: 1 was honoured
    assert (client.stats.prompt_tokens, client.stats.completion_tokens) == (100, 20)
    assert all(entry["authorization"] == f"Bearer {KEY}" for entry in api.log)


def test_client_gives_up_and_never_shows_the_key(api):
    client = ChatClient(api.url, "m", backoff=0.01, max_attempts=3)
    api.faults = ["500", "500", "500"]
    with pytest.raises(APIError, match="gave up after 3 attempts; last: HTTP 500"):
        client.chat([{"role": "user", "content": "x"}])
    api.faults = ["400"]  # the server echoes our Authorization header in its error body
    with pytest.raises(APIError) as e:
        client.chat([{"role": "user", "content": "x"}])
    assert "HTTP 400" in str(e.value) and KEY not in str(e.value) and "[OPENAI_API_KEY]" in str(e.value)
    assert client.stats.requests == 4  # a 400 is not retried
    assert KEY not in repr(client)


def test_key_required_only_for_the_openai_api(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(APIError, match="OPENAI_API_KEY is not set"):
        ChatClient()
    ChatClient("http://127.0.0.1:9/v1")  # a local server may need no key


# -- the five subcommands --------------------------------------------------------------------------


def test_instructions(api, tmp_path, capsys):
    out = tmp_path / "inst.jsonl"
    assert run_cli(api, "instructions", "--out", str(out), "--calls", "2") == 0
    triples = lines(tmp_path / "inst.triples.jsonl")
    assert len(triples) == 6 and {t["job"] for t in triples} == {"gen-0", "gen-1"}
    records = lines(out)
    # Kept: the ECG one and the foot-care one; dropped: the seed's near-copy and the repeats.
    assert sorted(r["messages"][0]["content"].split("\n")[0] for r in records) == [
        "列出糖尿病足的日常护理要点。",
        "请解释下面这份心电图报告的意思。",
    ]
    assert {r["meta"]["role"] for r in records} == {"心内科医生", "护士"}
    ecg = next(r for r in records if "心电图" in r["messages"][0]["content"])
    assert ecg["messages"][0]["content"].endswith("窦性心律，ST段压低0.1mV。")
    assert ecg["messages"][1]["content"] == "您好，心内科医生建议您先休息，必要时就医。"
    printed = capsys.readouterr().out
    assert "6 triples generated, 4 dropped as near-duplicates" in printed
    n = len(api.log)
    assert run_cli(api, "instructions", "--out", str(out), "--calls", "2") == 0  # rerun: nothing new
    assert len(api.log) == n and len(lines(out)) == 2


def test_conversations_keep_patient_and_doctor_apart(api, tmp_path):
    out = tmp_path / "conv.jsonl"
    assert (
        run_cli(api, "conversations", "--input", str(EVAL / "med_dialog_small.json"), "--out", str(out), "--limit", "2")
        == 0
    )
    records = lines(out)
    assert len(records) == 2
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * 3
        assert r["messages"][-2]["content"].endswith("再见") and r["meta"]["ended"] == "goodbye"
    cases = json.loads((EVAL / "med_dialog_small.json").read_text(encoding="utf-8"))[:2]
    for entry in api.log:
        text = json.dumps(entry["messages"], ensure_ascii=False)
        for c in cases:
            if entry["messages"][0]["role"] == "system":  # the doctor: diagnosis, never the case
                assert c["medical_case"] not in text
            else:  # the patient: the case, never the diagnosis
                assert c["doctor_diagnosis"] not in text


def test_polish_qa(api, tmp_path):
    out = tmp_path / "qa.jsonl"
    assert run_cli(api, "polish-qa", "--input", str(EVAL / "qa_test.jsonl"), "--out", str(out), "--limit", "3") == 0
    records = lines(out)
    assert len(records) == 3 and all(r["source"] == "real_instruction" for r in records)
    assert all(r["messages"][1]["content"] == "您好，根据您的描述，建议多喝水，注意观察。" for r in records)
    assert all(r["meta"]["original_answer"] for r in records)
    items = [json.loads(line) for line in (EVAL / "qa_test.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    expected = {
        fill(prompt("a3_polish_qa"), Patient_Question=x["questions"], Doctor_Response=x["answers"]) for x in items
    }
    assert {e["messages"][0]["content"] for e in api.log} == expected  # the paper's A.3 prompt, filled


def test_polish_dialogue_rejects_a_changed_shape(api, tmp_path, capsys):
    src = tmp_path / "dialogues.jsonl"
    convs = [
        {
            "id": f"d{i}",
            "source": "meddialog",
            "messages": [
                {"role": "user", "content": f"头痛{i}"},
                {"role": "assistant", "content": "多久了？"},
                {"role": "user", "content": "坏" if i == 1 else "三天"},
                {"role": "assistant", "content": "量个血压。"},
            ],
        }
        for i in range(3)
    ]
    src.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    out = tmp_path / "polished.jsonl"
    assert run_cli(api, "polish-dialogue", "--input", str(src), "--out", str(out)) == 0
    assert sorted(r["id"] for r in lines(out)) == ["d0", "d2"]
    assert lines(out)[0]["messages"][1]["content"] == "多久了？（润色）"
    rejects = lines(tmp_path / "polished.rejects.jsonl")
    assert [r["id"] for r in rejects] == ["d1"] and rejects[0]["reason"].startswith("changed shape: 4 turns became 3")
    assert "rejected 1 x changed shape" in capsys.readouterr().out


def test_score_keeps_only_consistent_pairs(api, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    rows = [
        {
            "id": "s1",
            "messages": [{"role": "user", "content": "头痛"}],
            "reference": "多休息",
            "responses": ["回答质量3", "回答质量8", "回答质量5"],
        },
        {
            "id": "s2",
            "messages": [
                {"role": "user", "content": "咳嗽"},
                {"role": "assistant", "content": "多久？"},
                {"role": "user", "content": "一周"},
            ],
            "reference": "拍胸片",
            "responses": ["偏心回答质量1", "偏心回答质量2"],
        },
        {
            "id": "s3",
            "messages": [{"role": "user", "content": "发烧"}],
            "reference": "退烧",
            "responses": ["乱码", "回答质量4"],
        },
    ]
    samples.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    assert run_cli(api, "score", "--input", str(samples), "--out", str(out)) == 0
    pairs = {p["id"]: p for p in lines(out)}
    assert set(pairs) == {"s1:0-1", "s1:0-2", "s1:1-2"}
    assert (pairs["s1:0-1"]["chosen"], pairs["s1:0-1"]["rejected"]) == ("回答质量8", "回答质量3")
    assert pairs["s1:1-2"]["meta"]["ratings"] == [[8.0, 5.0], [5.0, 8.0]]
    reasons = {r["id"]: r["reason"] for r in lines(tmp_path / "pairs.rejects.jsonl")}
    assert reasons["s2:0-1"].startswith("inconsistent") and reasons["s3:0-1"].startswith("no ratings")
    assert "History" not in api.log[0]["messages"][0]["content"].split("[History]")[1][:5]
    s2 = [e for e in api.log if "咳嗽" in e["messages"][0]["content"]][0]["messages"][0]["content"]
    assert "[History] 病人：咳嗽\n医生：多久？ [End of History]" in s2 and "[Question] 一周 [End of question]" in s2
    printed = capsys.readouterr().out
    assert "rejected 1 x inconsistent" in printed and "rejected 1 x no ratings" in printed


def test_dry_run_prints_the_first_prompt_and_calls_nothing(api, tmp_path, capsys):
    assert (
        run_cli(
            api, "polish-qa", "--input", str(EVAL / "qa_test.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--dry-run"
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("<患者问题>: 感冒了鼻塞流鼻涕")
    assert api.log == [] and not (tmp_path / "o.jsonl").exists()


def test_killed_run_resumes_without_duplicates_or_losses(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = FakeOpenAI(respond, delay=0.15)
    out = tmp_path / "qa.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "distill.py"),
        "polish-qa",
        "--input",
        str(EVAL / "qa_test.jsonl"),
        "--out",
        str(out),
        "--base-url",
        server.url,
        "--workers",
        "2",
    ]
    env = dict(os.environ, OPENAI_API_KEY=KEY)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    deadline = time.time() + 300  # a bound for a hang
    while time.time() < deadline and (not out.is_file() or len(out.read_text(encoding="utf-8").splitlines()) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(lines(out))
    assert 5 <= first < 20
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    server.close()
    ids = [r["id"] for r in lines(out)]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert f"{first} already finished" in done.stdout
    logs = done.stdout + done.stderr + out.read_text(encoding="utf-8")
    assert KEY not in logs and all(KEY not in p.read_text() for p in tmp_path.iterdir())


# -- parsing by hand -------------------------------------------------------------------------------


def test_parsers_by_hand():
    assert lcs_similarity("头痛怎么办", "头痛怎么办") == 1.0
    assert lcs_similarity("abcd", "abxd") == pytest.approx(2 * 3 / 8)  # LCS "abd"
    assert lcs_similarity("", "x") == 0.0
    text = "1. <角色>：护士\n<指令>：写出护理要点\n<输入>：无\n2、医生\n解释检查结果\n血糖7.8\n（3）只有一行"
    assert parse_triples(text) == [
        {"role": "护士", "instruction": "写出护理要点", "input": ""},
        {"role": "医生", "instruction": "解释检查结果", "input": "血糖7.8"},
    ]
    assert parse_ratings("Rating A: 7; Rating B: 9") == (7.0, 9.0)
    assert parse_ratings("analysis...\n**Rating A: [8.5]；Rating B: [6]**") == (8.5, 6.0)
    with pytest.raises(distill.Reject, match="out of range"):
        parse_ratings("Rating A: 0; Rating B: 11")
    turns = parse_dialogue("患者：头痛\n第二行\n**医疗大模型**：请问多久了？\nHuatuoGPT: 还有吗")
    assert [t["role"] for t in turns] == ["user", "assistant", "assistant"]
    assert turns[0]["content"] == "头痛\n第二行"
    kept, dropped = keep_novel(
        [{"instruction": "请解释心电图报告"}, {"instruction": "请解释心电图报告。"}, {"instruction": "列出护理要点"}],
        seeds=[],
    )
    assert [k["instruction"] for k in kept] == ["请解释心电图报告", "列出护理要点"] and dropped == 1


def test_score_does_not_rate_responses_cut_off_before_eos(api, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    row = {
        "id": "s1",
        "messages": [{"role": "user", "content": "头痛"}],
        "reference": "多休息",
        "responses": ["回答质量3", "回答质量8", "回答质量5"],
        "finished": [True, False, True],
    }
    samples.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    assert run_cli(api, "score", "--input", str(samples), "--out", str(out)) == 0
    assert [p["id"] for p in lines(out)] == ["s1:0-2"]  # the pairs with response 1 were never sent
    assert all("回答质量8" not in e["messages"][0]["content"] for e in api.log)
    assert "2 of 3 pairs not rated" in capsys.readouterr().err
    samples.write_text(json.dumps(dict(row, finished=[True]), ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="field 'finished' must list one true/false per response"):
        distill.read_samples(samples)


# -- failures: what is final, what is retried (issue 12) -----------------------------------------


def test_an_outage_leaves_every_item_to_the_next_run(api, tmp_path, capsys):
    out, rejects = tmp_path / "qa.jsonl", tmp_path / "qa.rejects.jsonl"
    args = ["polish-qa", "--input", str(EVAL / "qa_test.jsonl"), "--out", str(out), "--max-attempts", "2"]
    api.always = "500"
    assert run_cli(api, *args) == 1  # not a success
    printed = capsys.readouterr().out
    assert "stopped early: 10 requests in a row failed" in printed and "20 item(s) left" in printed
    assert len(api.log) <= 2 * (10 + 4)  # it stopped, instead of trying all 20 items
    assert not out.is_file() or lines(out) == []
    assert not rejects.is_file() or lines(rejects) == []  # nothing recorded as final
    api.always, api.log = None, []
    api.faults = ["400"]  # a bad request: not retried, and not final either; the others go through
    assert run_cli(api, *args) == 1
    assert "19 records written" in capsys.readouterr().out and len(lines(out)) == 19
    assert run_cli(api, *args) == 0  # the failed item is tried again, and only it
    printed = capsys.readouterr().out
    assert "1 done (1 records written, 0 rejected), 19 already finished" in printed
    ids = [r["id"] for r in lines(out)]
    assert len(ids) == 20 == len(set(ids))


def test_a_refused_key_stops_the_run_at_once_and_is_not_echoed(api, tmp_path, capsys):
    out = tmp_path / "qa.jsonl"
    args = ["polish-qa", "--input", str(EVAL / "qa_test.jsonl"), "--out", str(out)]
    api.always = "401"
    assert run_cli(api, *args) == 2
    captured = capsys.readouterr()
    assert "HTTP 401" in captured.out and "check OPENAI_API_KEY" in captured.out
    assert len(api.log) <= 4  # the requests already in flight when the first 401 came back, no retries
    for text in (captured.out, captured.err, *(p.read_text() for p in tmp_path.iterdir())):
        assert KEY not in text and KEY[:8] not in text and KEY[-4:] not in text
    api.always = None
    assert run_cli(api, *args) == 0 and len(lines(out)) == 20


def test_redact_hides_partial_echoes_of_the_key():
    key = "sk-proj-AbCdEfGhIjKlMnOp1234"
    for echo in (
        f"Incorrect API key provided: {key[:8]}****{key[-4:]}.",
        f"key {key[:10]}...",
        f"key ...{key[-6:]}",
        f"token={key}",
        f"'{key[:12]}…{key[-4:]}'",
    ):
        hidden = chat_api.redact(echo, key)
        assert key[:10] not in hidden and key[-4:] not in hidden and "[OPENAI_API_KEY]" in hidden, hidden
    assert (
        chat_api.redact("HTTP 400: bad request, max_tokens too large", key)
        == "HTTP 400: bad request, max_tokens too large"
    )


def test_unparseable_retry_after_falls_back_to_the_backoff(api):
    assert chat_api.retry_after("soon") is None and chat_api.retry_after("2") == 2.0
    assert chat_api.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    client = ChatClient(api.url, "m", backoff=0.01, max_attempts=3)
    api.faults = ["429-soon"]
    assert client.chat([{"role": "user", "content": "<患者问题>: 头痛"}]).content.startswith("<HuatuoGPT回复>")


def test_timeout_bounds_a_reply_that_trickles_in(api):
    client = ChatClient(api.url, "m", timeout=1.0, backoff=0.01, max_attempts=1)
    api.faults = ["trickle"]  # ~300 bytes at 5 bytes a second: a minute if nothing cut it
    t = time.monotonic()
    with pytest.raises(APIError, match="gave up after 1 attempts"):
        client.chat([{"role": "user", "content": "x"}])
    assert time.monotonic() - t < 30  # timeout + at most one read: far from the minute the trickle takes


def test_key_over_plain_http_to_another_host_warns(monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ChatClient("http://127.0.0.1:9/v1")
    ChatClient("http://localhost:9/v1")
    ChatClient("https://example.org/v1")
    assert capsys.readouterr().err == ""
    ChatClient("http://example.org/v1")
    err = capsys.readouterr().err
    assert "sent unencrypted" in err and "example.org" in err and KEY not in err
    monkeypatch.delenv("OPENAI_API_KEY")
    ChatClient("http://example.org/v1")  # no key, nothing to leak
    assert capsys.readouterr().err == ""


def test_a_rerun_with_another_setup_is_refused(api, tmp_path):
    out = tmp_path / "qa.jsonl"
    args = ["polish-qa", "--input", str(EVAL / "qa_test.jsonl"), "--out", str(out), "--limit", "3"]
    assert run_cli(api, *args) == 0
    with pytest.raises(RecordError, match=r"another setup \(model: 'gpt-3.5-turbo' -> 'gpt-4'\)"):
        run_cli(api, *args, "--model", "gpt-4")
    other = tmp_path / "other.jsonl"
    other.write_text((EVAL / "qa_test.jsonl").read_text(encoding="utf-8")[:-1] + " \n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"another setup \(input: "):
        run_cli(api, "polish-qa", "--input", str(other), "--out", str(out))
    assert len(lines(out)) == 3
    # An output of unknown origin (an earlier version's) is not continued either.
    (tmp_path / "qa.setup.json").unlink()
    with pytest.raises(RecordError, match="says nothing of what produced it"):
        run_cli(api, *args)

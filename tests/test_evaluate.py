"""evaluate.py: verdict parsing, order randomisation, judge runs against a scripted server,
the simulated-patient loop with the tiny model, benchmark runs and the report."""

import json
import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from fake_openai import FakeOpenAI

import evaluate
from chat_api import Reject
from data.schema import RecordError
from evaluate import judge_order, parse_verdict, tally
from model import CONFIGS, Transformer
from pretrained import save_model


def test_parse_verdict():
    assert parse_verdict("analysis...\nAssistant 1 is better than Assistant 2") == "better"
    assert parse_verdict("Assistant 1 is worse than Assistant 2.\n\n'assistant 1 is equal to assistant 2'") == "equal"
    assert (
        parse_verdict("Assistant 1 is better than Assistant 2\nfinal: Assistant 1 is worse than Assistant 2") == "worse"
    )
    assert parse_verdict("I cannot decide.") is None
    assert parse_verdict("") is None


def test_order_is_balanced_reproducible_and_recorded():
    orders = [judge_order(0, f"q{i}") for i in range(1000)]
    assert 0.45 < orders.count("ab") / 1000 < 0.55
    assert orders == [judge_order(0, f"q{i}") for i in range(1000)]
    assert orders != [judge_order(1, f"q{i}") for i in range(1000)]


def conversation(id, answer, label):
    return {
        "id": id,
        "messages": [{"role": "user", "content": f"问题{id}"}, {"role": "assistant", "content": answer}],
        "meta": {"label": label},
    }


def judge_reply(messages):
    """A judge that prefers the conversation with '详细' in it; '无法判断' items never get a verdict,
    and '偏心' items always get 'better' (a judge biased towards the first position)."""
    text = messages[0]["content"]
    one = re.search(r"\[Assistant 1\]\n(.*?)\n\[End of Assistant 1\]", text, re.S).group(1)
    two = re.search(r"\[Assistant 2\]\n(.*?)\n\[End of Assistant 2\]", text, re.S).group(1)
    if "无法判断" in one + two:
        return "Hmm."
    if "偏心" in one + two:
        return "Assistant 1 is better than Assistant 2"
    if ("详细" in one) == ("详细" in two):
        return "Both fine.\nAssistant 1 is equal to Assistant 2"
    return "Comparing...\n" + (
        "Assistant 1 is better than Assistant 2" if "详细" in one else "Assistant 1 is worse than Assistant 2"
    )


@pytest.fixture
def judge_api(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = FakeOpenAI(judge_reply)
    yield server
    server.close()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_single_turn_judge_run(judge_api, tmp_path):
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [conversation(f"q{i}", "详细的回答", "治疗方案") for i in range(6)]
        + [conversation("q6", "简短", "病因分析"), conversation("q7", "无法判断", "病因分析")],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [conversation(f"q{i}", "简短", "治疗方案") for i in range(6)]
        + [conversation("q6", "简短", "病因分析"), conversation("q7", "无法判断", "病因分析")],
    )
    out = tmp_path / "judge.jsonl"
    assert (
        evaluate.main(
            [
                "judge",
                "--a",
                str(a),
                "--b",
                str(b),
                "--name-a",
                "Huatuo",
                "--name-b",
                "Ziya",
                "--out",
                str(out),
                "--base-url",
                judge_api.url,
                "--judge-retries",
                "1",
            ]
        )
        == 0
    )
    rows = {r["id"]: r for r in evaluate.load_jsonl(out)}
    assert all(rows[f"q{i}"]["outcome"] == "win" for i in range(6))  # whatever order each was shown in
    assert rows["q6"]["outcome"] == "tie" and rows["q7"]["outcome"] == "unparsed"
    assert {rows[f"q{i}"]["judgments"][0]["order"] for i in range(6)} == {"ab", "ba"}  # both orders occur
    assert all(rows[i]["judgments"][0]["order"] == judge_order(0, i) for i in rows)  # and are recorded
    q7_requests = [e for e in judge_api.log if "无法判断" in e["messages"][0]["content"]]
    assert len(q7_requests) == 2  # asked, re-asked once, then recorded as unparsed
    counts = tally(list(rows.values()))
    assert counts["治疗方案"] == {"win": 6, "tie": 0, "loss": 0, "unparsed": 0}
    assert counts["Total"] == {"win": 6, "tie": 1, "loss": 0, "unparsed": 1}
    # The report: a Markdown table and an SVG that parses, with one bar segment per outcome.
    assert evaluate.main(["report", "--judgments", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| Huatuo vs. Ziya | win | tie | loss | unparsed |" in md and "| Total | 6 | 1 | 0 | 1 |" in md
    svg = ET.parse(tmp_path / "rep" / "win_tie_loss.svg").getroot()
    fills = [r.get("fill") for r in svg.iter("{http://www.w3.org/2000/svg}rect")]
    assert fills.count("#4e9a6a") == 2 and fills.count("#c9c9c9") == 2  # a bar segment each, and the legend
    # A second report into the same --out replaces the first only when told to (issue 21).
    with pytest.raises(
        SystemExit,
        match=r"rep holds an earlier report \(report.md, win_tie_loss.svg\): add "
        r"--overwrite",
    ):
        evaluate.main(["report", "--judgments", str(out), "--out", str(tmp_path / "rep")])
    assert evaluate.main(["report", "--judgments", str(out), "--out", str(tmp_path / "rep"), "--overwrite"]) == 0


def test_both_orders_turn_a_position_bias_into_a_tie(judge_api, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [conversation("q1", "偏心A", "其他")])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation("q1", "偏心B", "其他")])
    out = tmp_path / "j.jsonl"
    evaluate.main(
        ["judge", "--a", str(a), "--b", str(b), "--out", str(out), "--base-url", judge_api.url, "--both-orders"]
    )
    row = evaluate.load_jsonl(out)[0]
    assert [j["order"] for j in row["judgments"]] == ["ab", "ba"] and row["outcome"] == "tie"


def patient_reply(messages):
    said = sum(m["role"] == "assistant" for m in messages)
    return ["医生你好，我胸口疼。", "疼了两天了。", "好的，谢谢，再见"][min(said, 2)]


def test_consultation_loop_with_the_tiny_model(monkeypatch, tmp_path, tokenizer_file):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    save_model(Transformer.from_config(CONFIGS["tiny"], seed=0), tmp_path / "m", tokenizer=tokenizer_file)
    server = FakeOpenAI(patient_reply)
    out = tmp_path / "dialogues.jsonl"
    args = [
        "consult",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(ROOT / "data" / "eval" / "med_dialog_small.json"),
        "--out",
        str(out),
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--base-url",
        server.url,
    ]
    assert evaluate.main(args) == 0
    rows = evaluate.load_jsonl(out)
    assert len(rows) == 2
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * 3
        assert r["messages"][4]["content"].endswith("再见") and r["meta"]["ended"] == "goodbye"
        assert r["meta"]["department"] and r["meta"]["doctor_diagnosis"]
    # The patient (the API) saw the case and the model's replies, never the diagnosis.
    first = server.log[0]["messages"][0]["content"]
    assert first.startswith("你是一名患者") and "尿频" in first
    assert server.log[1]["messages"][-1]["content"] == rows[0]["messages"][1]["content"]
    assert {e["model"] for e in server.log} == {"gpt-3.5-turbo"}  # §4.3: ChatGPT plays the patient
    n = len(server.log)
    assert evaluate.main(args) == 0 and len(server.log) == n  # rerun: nothing redone
    server.close()


def test_bench_writes_resumable_predictions_and_table2(tmp_path, tokenizer_file, capsys):
    save_model(Transformer.from_config(CONFIGS["tiny"], seed=0), tmp_path / "m", tokenizer=tokenizer_file)
    args = [
        "bench",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(ROOT / "data" / "eval" / "qa_test.jsonl"),
        "--out",
        str(tmp_path / "b"),
        "--limit",
        "3",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
    ]
    assert evaluate.main(args) == 0
    printed = capsys.readouterr().out
    assert "| model | BLEU-1 |" in printed and "3 items" in printed
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert set(m) == set(evaluate.TABLE2)
    evaluate.main(args + ["--limit", "4"])
    ids = [r["id"] for r in evaluate.load_jsonl(tmp_path / "b" / "predictions.jsonl")]
    assert len(ids) == 4 and len(set(ids)) == 4


def test_doctor_on_a_device_and_dtype_and_questions_too_long(tmp_path, tokenizer_file):
    save_model(Transformer.from_config(CONFIGS["tiny"], seed=0), tmp_path / "m", tokenizer=tokenizer_file)
    doctor = evaluate.Doctor(tmp_path / "m", max_new_tokens=8, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in doctor.model.parameters()} == {torch.bfloat16}
    short = [{"role": "user", "content": "头痛"}]
    long = [{"role": "user", "content": "头痛发热咳嗽" * 800}]  # beyond the 2048-token context
    answers = doctor.reply([short, long, short])
    assert answers[1] is None and isinstance(answers[0], str) and answers[0] == answers[2]
    # In a consultation such a turn is a reject of that case, not a crash of the run.
    with pytest.raises(Reject, match="outgrew the model's context"):
        evaluate.consult(doctor, Verbose(), {"id": "c", "messages": short}, max_rounds=2)


class Verbose:
    """A simulated patient (in place of the API client) whose every turn is far too long."""

    def chat(self, messages):
        return SimpleNamespace(content="头痛发热咳嗽" * 800)


def test_judge_items_the_api_failed_are_judged_on_the_next_run(judge_api, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [conversation(f"q{i}", "详细的回答", "治疗方案") for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation(f"q{i}", "简短", "治疗方案") for i in range(4)])
    out = tmp_path / "judge.jsonl"
    cmd = [
        "judge",
        "--a",
        str(a),
        "--b",
        str(b),
        "--out",
        str(out),
        "--base-url",
        judge_api.url,
        "--backoff",
        "0.01",
        "--workers",
        "1",
    ]
    judge_api.faults = ["400"]  # the first item's request fails; it is not a verdict
    assert evaluate.main(cmd) == 1
    assert "1 item(s) left" in capsys.readouterr().out and len(evaluate.load_jsonl(out)) == 3
    assert not (tmp_path / "judge.rejects.jsonl").read_text()
    judge_api.always = "401"
    assert evaluate.main(cmd) == 2  # a refused key: a user error, and nothing recorded
    judge_api.always = None
    assert evaluate.main(cmd) == 0
    assert sorted(r["id"] for r in evaluate.load_jsonl(out)) == ["q0", "q1", "q2", "q3"]
    assert all(r["outcome"] == "win" for r in evaluate.load_jsonl(out))


def test_a_rerun_into_another_models_output_is_refused(tmp_path, tokenizer_file, capsys):
    """Issue 12: bench of model B into model A's directory printed A's numbers as B's row."""
    for name, seed in (("a", 0), ("b", 1)):
        save_model(Transformer.from_config(CONFIGS["tiny"], seed=seed), tmp_path / name, tokenizer=tokenizer_file)
    common = [
        "--data",
        str(ROOT / "data" / "eval" / "qa_test.jsonl"),
        "--out",
        str(tmp_path / "bench"),
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
    ]
    assert evaluate.main(["bench", "--model", str(tmp_path / "a"), "--name", "A", *common]) == 0
    before = (tmp_path / "bench" / "predictions.jsonl").read_bytes()
    with pytest.raises(RecordError, match=r"holds the output of another setup \(model: '[0-9a-f]+' -> "):
        evaluate.main(["bench", "--model", str(tmp_path / "b"), "--name", "B", *common])
    with pytest.raises(RecordError, match=r"\(max_new_tokens: 4 -> 5; temperature: 0.0 -> 0.7\)"):
        evaluate.main(
            ["bench", "--model", str(tmp_path / "a"), *common, "--max-new-tokens", "5", "--temperature", "0.7"]
        )
    assert (tmp_path / "bench" / "predictions.jsonl").read_bytes() == before
    # A copy of A elsewhere is the same model: its rerun continues.
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
    assert evaluate.main(["bench", "--model", str(tmp_path / "a_copy"), *common, "--limit", "3"]) == 0
    # Through the command line the refusal is one line and exit status 2.
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "answer",
            "--model",
            str(tmp_path / "b"),
            "--data",
            str(ROOT / "data" / "eval" / "qa_test.jsonl"),
            "--out",
            str(tmp_path / "bench" / "predictions.jsonl"),
            "--limit",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "command: 'bench' -> 'answer'" in r.stderr and "model:" in r.stderr


def test_judge_of_other_answers_is_refused(judge_api, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [conversation("q1", "详细的回答", "其他")])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation("q1", "简短", "其他")])
    out = tmp_path / "j.jsonl"
    cmd = ["judge", "--a", str(a), "--b", str(b), "--out", str(out), "--base-url", judge_api.url]
    assert evaluate.main(cmd) == 0
    write_jsonl(b, [conversation("q1", "另一个模型的回答", "其他")])
    with pytest.raises(RecordError, match=r"another setup \(b: 'file [0-9a-f]+' -> 'file [0-9a-f]+'\)"):
        evaluate.main(cmd)
    with pytest.raises(RecordError, match=r"judge_model: 'gpt-4' -> 'gpt-4o'"):
        evaluate.main(cmd + ["--judge-model", "gpt-4o"])

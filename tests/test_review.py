"""review.py and `evaluate.py review` / `report --reviews`: the doctors' blind pairwise review
(§4.3, App. F). κ against sklearn's and statsmodels' on random verdicts and by hand; the API's
isolation and blinding; verdicts that survive SIGKILL; a whole study of three reviewers on the
embedded default's models, driven through the API, into the report."""

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from conftest import ROOT, popen_as_from_a_terminal

import evaluate
import review
from pretrained import save_model

NAMES = ("HuatuoGPT-tiny", "Rival-tiny")


# -- agreement, against the reference implementations ---------------------------------------------------


def test_kappas_by_hand():
    # Two raters, 10 items: agree on 7 (a a a a b b tie tie tie a / a a a b b b tie a tie a).
    x = ["a", "a", "a", "a", "b", "b", "tie", "tie", "tie", "a"]
    y = ["a", "a", "a", "b", "b", "b", "tie", "a", "tie", "a"]
    # p_o = 8/10 (items 4 and 8 differ); x: a 5, b 2, tie 3; y: a 5, b 3, tie 2;
    # p_e = .5 x .5 + .2 x .3 + .3 x .2 = .37; κ = (.8 - .37) / .63.
    assert review.cohen_kappa(x, y) == pytest.approx((0.8 - 0.37) / 0.63, abs=1e-12)
    # Fleiss: 3 items, 3 raters. Item 1 all a (P = 1), item 2 a a b (P = 2/6), item 3 a b tie (0):
    # P̄ = 4/9; shares a 6/9, b 2/9, tie 1/9: P̄e = (36 + 4 + 1) / 81; κ = (P̄ - P̄e) / (1 - P̄e).
    pe = 41 / 81
    assert review.fleiss_kappa([["a"] * 3, ["a", "a", "b"], ["a", "b", "tie"]]) == pytest.approx(
        (4 / 9 - pe) / (1 - pe), abs=1e-12
    )
    assert review.majority(["a", "b", "tie"]) == "tie" and review.majority(["b", "b", "a"]) == "b"


@pytest.mark.parametrize("seed", range(5))
def test_kappas_equal_sklearn_and_statsmodels_on_random_verdicts(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = random.Random(seed)
    n, raters = rng.randint(5, 60), rng.randint(2, 5)
    truth = [rng.choice(review.OUTCOMES) for _ in range(n)]
    ratings = [[t if rng.random() < 0.6 else rng.choice(review.OUTCOMES) for _ in range(raters)] for t in truth]
    x, y = [r[0] for r in ratings], [r[1] for r in ratings]
    assert review.cohen_kappa(x, y) == pytest.approx(sklearn_metrics.cohen_kappa_score(x, y), abs=1e-12)
    table, _ = inter_rater.aggregate_raters([[review.OUTCOMES.index(c) for c in r] for r in ratings])
    assert review.fleiss_kappa(ratings) == pytest.approx(inter_rater.fleiss_kappa(table), abs=1e-12)


# -- a study on the embedded default's models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def answers(tmp_path_factory, tokenizer_file):
    """Two tiny random models' answers to the shipped questions (evaluate.py answer), as a study
    pairs them: the files' names say which model wrote them, which no reviewer may see."""
    import torch

    from model import CONFIGS, Transformer

    root = tmp_path_factory.mktemp("review")
    files = []
    for seed, name in zip((3, 4), NAMES):
        model = root / f"model-{name}"
        save_model(Transformer.from_config(CONFIGS["tiny"], seed=seed), model, tokenizer=tokenizer_file)
        out = root / f"answers-{name}.jsonl"
        argv = ["answer", "--model", str(model), "--data", str(ROOT / "data" / "eval" / "qa_test.jsonl")]
        argv += ["--out", str(out), "--limit", "9", "--max-new-tokens", "12", "--dtype", "float32"]
        torch.set_num_threads(2)
        assert evaluate.main(argv) == 0
        files.append(out)
    return files


def study_args(answers, out, **kw):
    base = dict(
        a=str(answers[0]),
        b=str(answers[1]),
        name_a=NAMES[0],
        name_b=NAMES[1],
        reviewers=3,
        sample=None,
        seed=0,
        out=str(out),
        host="127.0.0.1",
        port=0,
    )
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def server(answers, tmp_path):
    s = review.ReviewServer(review.open_study(study_args(answers, tmp_path / "study")), port=0)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    s.base = f"http://127.0.0.1:{s.server_address[1]}"
    yield s
    s.shutdown()
    s.server_close()


def get_items(base, key):
    return requests.get(base + "/api/items", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def post(base, key, body):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return requests.post(base + "/api/verdicts", data=json.dumps(body), headers=headers, timeout=30)


def test_the_api_is_blind_and_each_reviewer_sees_only_their_own(server, answers):
    keys = server.study.keys
    seen = [get_items(server.base, k).json()["items"] for k in keys]
    n = len(seen[0])
    assert n == 9 and all(sorted(x["id"] for x in s) == sorted(x["id"] for x in seen[0]) for s in seen)
    assert len({tuple(x["id"] for x in s) for s in seen}) == 3  # an order of their own
    for r, plan in enumerate(server.study.plans):  # each model first in half the items, ±1
        assert sum(side == "a" for side in plan["first"].values()) in (n // 2, (n + 1) // 2)
    # Blinding: no model's name, no input file's name in any byte served.
    served = requests.get(server.base + "/", timeout=30).content + b"".join(
        get_items(server.base, k).content for k in keys
    )
    for secret in [*NAMES, *(Path(a).name for a in answers), "answers-", "model-"]:
        assert secret.encode() not in served, secret
    # Isolation: no key, a wrong key, a key of the wrong form: 401; nothing stored.
    first = seen[0][0]["id"]
    assert requests.get(server.base + "/api/items", timeout=30).status_code == 401
    assert get_items(server.base, "x" * 32).status_code == 401
    assert post(server.base, keys[0] + "x", {"id": first, "overall": "1"}).status_code == 401
    bad = [
        {"id": "not-an-item", "overall": "1"},
        {"id": first, "overall": "3"},
        {"id": first, "overall": "1", "diagnosis": "maybe"},
        {"id": first, "overall": "1", "reviewer": 2},
        ["not", "an", "object"],
    ]
    for body in bad:
        r = post(server.base, keys[0], body)
        assert r.status_code == 400 and r.json()["error"], body
    assert not (server.study.out / "verdicts.jsonl").exists()  # nothing stored
    # Reviewer 1's verdict is theirs: reviewer 2 neither sees nor changes it.
    assert post(server.base, keys[0], {"id": first, "overall": "1", "diagnosis": "tie"}).status_code == 200
    assert post(server.base, keys[1], {"id": first, "overall": "2"}).status_code == 200
    mine = {x["id"]: x["verdict"] for x in get_items(server.base, keys[0]).json()["items"]}
    theirs = {x["id"]: x["verdict"] for x in get_items(server.base, keys[1]).json()["items"]}
    assert mine[first] == {"overall": "1", "diagnosis": "tie", "treatment": None, "medication": None}
    assert theirs[first]["overall"] == "2" and all(v is None for i, v in theirs.items() if i != first)
    # Posting again replaces; the stored winner is the model shown where the reviewer pointed.
    assert post(server.base, keys[0], {"id": first, "overall": "2"}).status_code == 200
    v = server.verdicts.of(0)[first]
    shown_second = "b" if server.study.plans[0]["first"][first] == "a" else "a"
    assert v["overall"] == "2" and v["overall_winner"] == shown_second


def test_another_study_in_the_same_out_is_refused_and_the_keys_are_private(answers, tmp_path):
    out = tmp_path / "study"
    review.open_study(study_args(answers, out))
    assert oct((out / "reviewers.json").stat().st_mode & 0o777) == "0o600"
    assert review.open_study(study_args(answers, out)).keys == json.loads((out / "reviewers.json").read_text())["keys"]
    for change in (dict(seed=1), dict(name_a="Other"), dict(sample=4), dict(reviewers=2), dict(a=str(answers[1]))):
        with pytest.raises(SystemExit, match=f"^{out} holds another study"):
            review.open_study(study_args(answers, out, **change))
    sampled = review.open_study(study_args(answers, tmp_path / "sampled", sample=4))
    again = review.open_study(study_args(answers, tmp_path / "sampled-again", sample=4))
    assert len(sampled.items) == 4 and list(sampled.items) == list(again.items)  # drawn reproducibly


def test_every_acknowledged_verdict_survives_sigkill_and_the_study_goes_on(answers, tmp_path):
    """Three reviewers post verdicts at once (a bounded loop each); the server is SIGKILLed
    mid-stream; started again with the same command, every verdict acknowledged with a 200 is
    there, each (reviewer, item) once, and the report counts exactly those."""
    out = tmp_path / "study"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "review", "--a", str(answers[0]), "--b", str(answers[1])]
    cmd += ["--name-a", NAMES[0], "--name-b", NAMES[1], "--out", str(out), "--port", "0"]

    def start():
        proc = popen_as_from_a_terminal(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        head = proc.stdout.readline()
        assert head.startswith("review of 9 items by 3 reviewers at http://127.0.0.1:"), head + proc.stderr.read()
        links = [proc.stdout.readline().split(": ", 1)[1].strip() for _ in range(3)]
        return proc, head.split(" at ")[1].split()[0], [link.split("#key=")[1] for link in links]

    proc, base, keys = start()
    acked, in_flight, stop = {}, {}, threading.Event()

    def reviewer(r):
        rng = random.Random(r)
        ids = [x["id"] for x in get_items(base, keys[r]).json()["items"]]
        for _ in range(200):  # bounded
            if stop.is_set():
                return
            body = {"id": rng.choice(ids), "overall": rng.choice(review.CHOICES)}
            in_flight[r] = (body["id"], body["overall"])  # may be stored though its 200 never came
            try:
                if post(base, keys[r], body).status_code == 200:
                    acked[r, body["id"]] = body["overall"]
            except requests.ConnectionError:
                return
            del in_flight[r]

    threads = [threading.Thread(target=reviewer, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120  # a bound for a hang: the count of verdicts decides
    while len(acked) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acked) >= 10
    proc, base, keys2 = start()
    try:
        assert keys2 == keys
        for r in range(3):
            got = {x["id"]: x["verdict"] for x in get_items(base, keys[r]).json()["items"] if x["verdict"]}
            for (rr, i), overall in acked.items():
                if rr == r:  # the last one acknowledged, or one sent after it whose answer the kill cut off
                    late = in_flight.get(r)
                    allowed = {overall} | ({late[1]} if late and late[0] == i else set())
                    assert got[i]["overall"] in allowed, (r, i, got[i], allowed)
        lines = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
        assert len(lines) >= len(acked)  # every one appended; replacements are later lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            proc.kill()  # not left running when it did not stop
    summary = review.study_summary(out, [])
    assert sum(r["judged"] for r in summary["reviewers"]) == len(
        {k for k in review.Verdicts(out / "verdicts.jsonl").latest}
    )
    assert {(r, i) for (r, i) in review.Verdicts(out / "verdicts.jsonl").latest} >= set(acked)


def test_a_study_of_three_reviewers_ends_in_the_report_with_the_judges_agreement(server, answers, tmp_path):
    """The embedded default's two models, three reviewers driving every verdict through the API
    (each with the aspects too), a judgments file of the same two models, and the report:
    each reviewer's and the pooled win / tie / loss, Fleiss' κ, the judge's Cohen's κ, the
    halved ties, summary.json and the SVG."""
    keys, rng = server.study.keys, random.Random(7)
    ids = list(server.study.items)
    truth = {i: rng.choice(review.OUTCOMES) for i in ids}  # what each item "is", in the models' terms
    for r, key in enumerate(keys):
        for i in ids:
            outcome = truth[i] if rng.random() < 0.8 else rng.choice(review.OUTCOMES)
            first = server.study.plans[r]["first"][i]
            shown = "tie" if outcome == "tie" else ("1" if outcome == first else "2")
            body = {"id": i, "overall": shown, "diagnosis": shown, "treatment": "tie", "medication": shown}
            assert post(server.base, key, body).status_code == 200
    judge = tmp_path / "judge.jsonl"
    judge.write_text(
        "".join(
            json.dumps({"id": i, "group": "all", "outcome": {"a": "win", "b": "loss", "tie": "tie"}[truth[i]]}) + "\n"
            for i in ids
        )
    )
    (tmp_path / "judge.setup.json").write_text(json.dumps({"setup": {}, "info": {"a": NAMES[0], "b": NAMES[1]}}))
    out = tmp_path / "report"
    assert (
        evaluate.main(
            ["report", "--judgments", str(judge), "--reviews", str(server.study.out), "--out", str(out), "--halve-ties"]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    given = {r: server.verdicts.of(r) for r in range(3)}
    for r, entry in enumerate(s["reviewers"]):
        winners = [v["overall_winner"] for v in given[r].values()]
        assert (entry["overall"]["win"], entry["overall"]["tie"], entry["overall"]["loss"]) == (
            winners.count("a"),
            winners.count("tie"),
            winners.count("b"),
        )
        assert entry["treatment"]["tie"] == len(ids)
    majority = {i: review.majority([given[r][i]["overall_winner"] for r in range(3)]) for i in ids}
    total = s["pooled"]["Total"]
    assert (total["win"], total["tie"], total["loss"]) == tuple(
        list(majority.values()).count(c) for c in ("a", "tie", "b")
    )
    assert total["win_rate"] == pytest.approx((total["win"] + total["tie"] / 2) / len(ids))
    ratings = [[given[r][i]["overall_winner"] for r in range(3)] for i in ids]
    assert s["fleiss_kappa"] == pytest.approx(review.fleiss_kappa(ratings))
    j = s["judges"][0]
    assert j["items"] == len(ids)
    assert j["vs_majority"]["cohen_kappa"] == pytest.approx(
        review.cohen_kappa([truth[i] for i in ids], [majority[i] for i in ids])
    )
    report = (out / "report.md").read_text()
    assert "Fleiss' κ" in report and "Cohen's κ" in report and (out / "doctors_vs_judge.svg").is_file()
    assert "win rate, ties halved" in report

"""The doctors' evaluation (§4.3, App. F): a blind pairwise review page, and the agreement of
the doctors with each other and with the LLM judge.

    python evaluate.py review --a a.jsonl --b b.jsonl --name-a HuatuoGPT --name-b ChatGPT \\
        --reviewers 3 --out runs/review [--sample 50] [--seed 0] [--host 127.0.0.1] [--port 8100]
    python evaluate.py report --judgments judge.jsonl --reviews runs/review --out runs/report

The inputs are what `evaluate.py answer` and `evaluate.py consult` write, paired by id. Each
item shows its context (the turns both records share: the question) and the two responses
(the turns after it: an answer, or a whole consultation) as "Response 1" and "Response 2". Each
reviewer has a key of their own, given in their link's fragment (#key=..., which no request
carries), an order of the items of their own and a left/right assignment of their own: each
model shown first in half of their items (±1), drawn from (seed, reviewer). Neither the page
nor any answer of the API names a model or an input file.

Nothing acknowledged is lost: a verdict is appended to OUT/verdicts.jsonl and fsynced before
its 200. The study (items, orders, assignments, the inputs' digests) is OUT/study.json, the
keys OUT/reviewers.json (mode 0600); the same command started again goes on where the
reviewers were, and another one (other inputs, names, seed, sample or number of reviewers) is
refused in one line.
"""

from __future__ import annotations

import hmac
import json
import os
import random
import secrets
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from chat_api import PROMPTS
from data.schema import load_jsonl
from safety import file_digest

ASPECTS = ("diagnosis", "treatment", "medication")  # App. F's three guidelines, in its order
CHOICES = ("1", "2", "tie")  # what a reviewer picks: the response shown first, second, or neither
MAX_BODY = 4096  # a verdict is a few dozen bytes


# -- the study: items, and each reviewer's order and sides ------------------------------------------------


def pair_items(a_path, b_path) -> list[dict]:
    """The items both files hold (their ids, in a's order): {id, context, a, b, group}, the
    context the turns both records begin with, each response the turns after it."""
    a = {r["id"]: r for r in load_jsonl(a_path)}
    b = {r["id"]: r for r in load_jsonl(b_path)}
    items = []
    for i in (i for i in a if i in b):
        ma, mb = a[i]["messages"], b[i]["messages"]
        shared = 0
        while shared < min(len(ma), len(mb)) - 1 and ma[shared] == mb[shared]:
            shared += 1
        meta = a[i].get("meta", {})
        items.append(
            {
                "id": i,
                "context": ma[:shared],
                "a": ma[shared:],
                "b": mb[shared:],
                "group": meta.get("label") or meta.get("department") or "all",
            }
        )
    return items


def plan_reviews(ids: list[str], reviewers: int, seed: int) -> list[dict]:
    """Each reviewer's order of the items and which model each shows first ("a" or "b"): a
    shuffle of the items, and a balanced assignment (each model first in half, ±1), both drawn
    from (seed, reviewer)."""
    plans = []
    for r in range(reviewers):
        rng = random.Random(f"{seed}:{r}")
        order = ids[:]
        rng.shuffle(order)
        firsts = ["a", "b"] * (len(ids) // 2) + [rng.choice("ab")] * (len(ids) % 2)
        rng.shuffle(firsts)
        plans.append({"order": order, "first": dict(zip(ids, firsts))})
    return plans


@dataclass
class Study:
    out: Path
    items: dict[str, dict]  # by id
    plans: list[dict]  # a reviewer's: order, first
    keys: list[str]  # a reviewer's key
    name_a: str
    name_b: str


def open_study(args) -> Study:
    """The study in --out: made at the first start, and at every later one checked against the
    command (the inputs by digest): another study in the same --out is refused in one line."""
    out = Path(args.out)
    setup = {
        "a": file_digest(args.a),
        "b": file_digest(args.b),
        "name_a": args.name_a,
        "name_b": args.name_b,
        "reviewers": args.reviewers,
        "sample": args.sample,
        "seed": args.seed,
    }
    items = pair_items(args.a, args.b)
    if not items:
        raise SystemExit(f"{args.a} and {args.b} share no ids")
    study_file, keys_file = out / "study.json", out / "reviewers.json"
    if study_file.is_file():
        saved = json.loads(study_file.read_text(encoding="utf-8"))
        changed = sorted(k for k in setup if saved["setup"].get(k) != setup[k])
        if changed:
            raise SystemExit(
                f"{out} holds another study (it differs in {', '.join(changed)}): give another --out, "
                "or start it with the command that made it"
            )
        keys = json.loads(keys_file.read_text(encoding="utf-8"))["keys"]
        ids, plans = saved["ids"], saved["plans"]
    else:
        ids = [x["id"] for x in items]
        if args.sample:
            if args.sample > len(ids):
                raise SystemExit(f"--sample {args.sample}: the files share {len(ids)} items")
            chosen = set(random.Random(f"{args.seed}:sample").sample(ids, args.sample))
            ids = [i for i in ids if i in chosen]
        plans = plan_reviews(ids, args.reviewers, args.seed)
        keys = [secrets.token_urlsafe(24) for _ in range(args.reviewers)]
        out.mkdir(parents=True, exist_ok=True)
        _write_private(keys_file, json.dumps({"keys": keys}, indent=1))
        groups = {x["id"]: x["group"] for x in items if x["id"] in set(ids)}
        _write_private(study_file, json.dumps({"setup": setup, "ids": ids, "groups": groups, "plans": plans}, indent=1))
    by_id = {x["id"]: x for x in items}
    return Study(out, {i: by_id[i] for i in ids}, plans, keys, args.name_a, args.name_b)


def _write_private(path: Path, text: str):
    """A file only its owner reads, written whole (a temporary renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- the verdicts, on disk before they are acknowledged ---------------------------------------------------


class Verdicts:
    """OUT/verdicts.jsonl: one line a verdict given, appended, flushed and fsynced before the
    reviewer hears it was stored; a later line for the same reviewer and item replaces an
    earlier one. A line cut short by a kill was never acknowledged: it is cut off at the next
    start, so that nothing is appended after half a line."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        self.latest, whole = read_verdicts(path)
        if path.is_file() and path.stat().st_size > whole:
            with open(path, "r+b") as f:
                f.truncate(whole)
                os.fsync(f.fileno())

    def record(self, verdict: dict):
        with self.lock:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(verdict, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.latest[verdict["reviewer"], verdict["id"]] = verdict

    def of(self, reviewer: int) -> dict[str, dict]:
        with self.lock:
            return {i: v for (r, i), v in self.latest.items() if r == reviewer}


def read_verdicts(path: Path) -> tuple[dict, int]:
    """The latest verdict of each (reviewer, item) in the whole lines of `path`, and their length
    in bytes; reads only (the report may read a study while its server appends to it)."""
    if not path.is_file():
        return {}, 0
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    latest = {}
    for line in whole.decode("utf-8").splitlines():
        v = json.loads(line)
        latest[v["reviewer"], v["id"]] = v
    return latest, len(whole)


def winner(choice: str | None, first: str) -> str | None:
    """A choice as shown ("1", "2", "tie") -> the model it favours ("a", "b", "tie")."""
    if choice is None or choice == "tie":
        return choice
    second = "b" if first == "a" else "a"
    return first if choice == "1" else second


# -- the HTTP server ---------------------------------------------------------------------------------------


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, study: Study, host: str = "127.0.0.1", port: int = 8100):
        from serve import Page

        self.study, self.verdicts = study, Verdicts(study.out / "verdicts.jsonl")
        self.page = Page(Path(__file__).with_name("review.html"))
        self.guidelines = (PROMPTS / "f_doctor_guidelines.txt").read_text(encoding="utf-8").strip()
        self.hosts = {"localhost", host.lower().strip("[]")}
        try:
            super().__init__((host, port), ReviewHandler)
        except OSError as e:
            raise SystemExit(f"cannot serve on {host} port {port}: {e.strerror or e}") from None

    def reviewer(self, authorization: str) -> int | None:
        """The reviewer whose key a bearer header carries, compared with every key (no early
        exit: how long it takes says nothing about which key came close)."""
        scheme, _, given = authorization.strip().partition(" ")
        found = None
        for r, key in enumerate(self.study.keys):
            if hmac.compare_digest(given.strip().encode(), key.encode()) & (scheme.lower() == "bearer"):
                found = r
        return found

    def items_for(self, reviewer: int) -> list[dict]:
        """A reviewer's items in their order, each response where their plan shows it, with
        the verdict they gave so far: nothing that names a model or a file."""
        plan, given = self.study.plans[reviewer], self.verdicts.of(reviewer)
        out = []
        for i in plan["order"]:
            item, first = self.study.items[i], plan["first"][i]
            second = "b" if first == "a" else "a"
            v = given.get(i)
            out.append(
                {
                    "id": i,
                    "context": item["context"],
                    "responses": [item[first], item[second]],
                    "verdict": {k: v.get(k) for k in ("overall", *ASPECTS)} if v else None,
                }
            )
        return out

    def links(self, base: str) -> list[str]:
        return [f"{base}/#key={key}" for key in self.study.keys]


class BadVerdict(Exception):
    pass


def check_verdict(body, reviewer_items: set[str]) -> dict:
    """A posted verdict -> {id, overall, diagnosis, treatment, medication} (aspects None when
    not given), or BadVerdict naming what is wrong."""
    if not isinstance(body, dict):
        raise BadVerdict("the body must be a JSON object")
    unknown = sorted(set(body) - {"id", "overall", *ASPECTS})
    if unknown:
        raise BadVerdict(f"unknown field {unknown[0]!r}")
    if body.get("id") not in reviewer_items:
        raise BadVerdict(f"'id' {body.get('id')!r} is not one of your items")
    if body.get("overall") not in CHOICES:
        raise BadVerdict(f"'overall' must be one of {', '.join(CHOICES)}")
    for aspect in ASPECTS:
        if body.get(aspect) is not None and body[aspect] not in CHOICES:
            raise BadVerdict(f"{aspect!r} must be one of {', '.join(CHOICES)}, or left out")
    return {"id": body["id"], "overall": body["overall"], **{k: body.get(k) for k in ASPECTS}}


class ReviewHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    server: ReviewServer

    def log_message(self, fmt, *args):  # no access log: a request line holds nothing worth keeping
        pass

    def _send(self, status: int, obj: dict):
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._send(status, {"error": message})

    def _own_host(self) -> bool:
        """A Host header naming this server (an IP address, localhost, --host), or 403: a page
        whose name was rebound to this address must not read it (as serve.py)."""
        from serve import host_allowed

        host = self.headers.get("Host")
        if host is None or host_allowed(self.server.hosts, host):
            return True
        self.close_connection = True
        self._error(403, f"Host {host!r} is not this server's name")
        return False

    def _reviewer(self) -> int | None:
        r = self.server.reviewer(self.headers.get("Authorization", ""))
        if r is None:
            self._error(401, "a reviewer's key is required (Authorization: Bearer KEY, from your link)")
        return r

    def do_GET(self):
        if not self._own_host():
            return
        path = self.path.split("?")[0].split("#")[0]
        if path == "/":
            self.server.page.send(self)
        elif path == "/api/items":
            r = self._reviewer()
            if r is not None:
                self._send(200, {"guidelines": self.server.guidelines, "items": self.server.items_for(r)})
        else:
            self._error(404, f"no such page: GET {path}")

    def do_POST(self):
        if not self._own_host():
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            self._error(
                413 if length and length.isdigit() else 411, f"a body of at most {MAX_BODY} bytes, with its length"
            )
            return
        body = self.rfile.read(int(length))
        if self.path.split("?")[0] != "/api/verdicts":
            self._error(404, f"no such endpoint: POST {self.path.split('?')[0]}")
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            self._error(415, "the body must be JSON sent as Content-Type: application/json")
            return
        r = self._reviewer()
        if r is None:
            return
        plan = self.server.study.plans[r]
        try:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise BadVerdict("the body is not valid JSON") from None
            verdict = check_verdict(parsed, set(plan["order"]))
        except BadVerdict as e:
            self._error(400, str(e))
            return
        first = plan["first"][verdict["id"]]
        stored = dict(
            verdict,
            reviewer=r,
            first=first,
            **{f"{k}_winner": winner(verdict[k], first) for k in ("overall", *ASPECTS)},
        )
        self.server.verdicts.record(stored)  # on disk before the 200
        self._send(200, {"stored": verdict})


def serve_review(args) -> int:
    """`evaluate.py review`: the study opened (or made), its links printed, served until Ctrl-C."""
    study = open_study(args)
    server = ReviewServer(study, args.host, args.port)
    host, port = server.server_address[:2]
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} over plain HTTP: the keys and verdicts cross the network unencrypted")
    given = sum(len(server.verdicts.of(r)) for r in range(len(study.keys)))
    print(
        f"review of {len(study.items)} items by {len(study.keys)} reviewers at {base} ({given} verdicts so far; "
        f"the links are also in {study.out / 'reviewers.json'}; Ctrl-C stops):",
        flush=True,
    )
    for r, link in enumerate(server.links(base)):
        print(f"  reviewer {r + 1}: {link}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
        print(
            "stopped (Ctrl-C); every acknowledged verdict is in " + str(study.out / "verdicts.jsonl"), file=sys.stderr
        )
        return 130
    return 0


# -- agreement -----------------------------------------------------------------------------------------------

OUTCOMES = ("a", "tie", "b")  # a verdict in the models' terms: name-a better, neither, name-b better


def cohen_kappa(x: list[str], y: list[str]) -> float:
    """Cohen's κ of two raters' labels of the same items: (p_o − p_e) / (1 − p_e), p_e from each
    rater's own label frequencies. 1.0 when both give one label throughout (as sklearn)."""
    n = len(x)
    if n == 0 or n != len(y):
        raise ValueError("two raters' labels of the same items, at least one")
    labels = sorted(set(x) | set(y))
    observed = sum(a == b for a, b in zip(x, y)) / n
    expected = sum((x.count(c) / n) * (y.count(c) / n) for c in labels)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(ratings: list[list[str]]) -> float:
    """Fleiss' κ of items each rated by the same number of raters (ratings[item] = the raters'
    labels): (P̄ − P̄_e) / (1 − P̄_e)."""
    if not ratings:
        raise ValueError("no items")
    m = len(ratings[0])
    if m < 2 or any(len(r) != m for r in ratings):
        raise ValueError("every item rated by the same raters, at least two")
    labels = sorted({c for r in ratings for c in r})
    n = len(ratings)
    agreement = sum(sum(r.count(c) * (r.count(c) - 1) for c in labels) / (m * (m - 1)) for r in ratings) / n
    shares = [sum(r.count(c) for r in ratings) / (n * m) for c in labels]
    expected = sum(p * p for p in shares)
    return 1.0 if expected == 1 else (agreement - expected) / (1 - expected)


def majority(labels: list[str]) -> str:
    """The label more than half give, or a tie."""
    for c in set(labels):
        if labels.count(c) * 2 > len(labels):
            return c
    return "tie"


def win_tie_loss(outcomes: list[str]) -> dict[str, int]:
    """Outcomes in the models' terms -> name-a's win / tie / loss."""
    return {"win": outcomes.count("a"), "tie": outcomes.count("tie"), "loss": outcomes.count("b")}


def win_rate(counts: dict[str, int], halve_ties: bool) -> float | None:
    """name-a's share of wins, ties counted as half a win and half a loss (Figure 5) or apart."""
    n = counts["win"] + counts["tie"] + counts["loss"]
    if not n:
        return None
    return (counts["win"] + (counts["tie"] / 2 if halve_ties else 0)) / n


JUDGE_OUTCOME = {"win": "a", "loss": "b", "tie": "tie"}  # the judge's outcome for name-a, in the models' terms


def study_summary(directory: Path, judgments: list[tuple[dict, list[dict]]], halve_ties: bool = False) -> dict:
    """The figures of a finished (or partial) study in `directory`: each reviewer's win / tie /
    loss of name-a, overall and per aspect; the reviewers pooled (each item's majority of those
    who judged it; no majority is a tie), per group; Fleiss' κ over the items every reviewer
    judged, each pair's Cohen's κ; and for each judgments file of the same two models
    (judgments: (its setup info, its records)), Cohen's κ and the raw agreement of the judge
    with the doctors' majority and with each doctor, over the items both judged."""
    study = json.loads((directory / "study.json").read_text(encoding="utf-8"))
    setup, plans = study["setup"], study["plans"]
    verdicts, _ = read_verdicts(directory / "verdicts.jsonl")
    reviewers = range(setup["reviewers"])
    given = {r: {i: v for (rr, i), v in verdicts.items() if rr == r} for r in reviewers}
    summary = {"name_a": setup["name_a"], "name_b": setup["name_b"], "items": len(study["ids"]), "reviewers": []}
    for r in reviewers:
        mine = given[r]
        entry = {"reviewer": r + 1, "judged": len(mine)}
        for aspect in ("overall", *ASPECTS):
            counts = win_tie_loss([v[f"{aspect}_winner"] for v in mine.values() if v.get(f"{aspect}_winner")])
            entry[aspect] = dict(counts, win_rate=win_rate(counts, halve_ties))
        entry["first_a"] = sum(p == "a" for p in plans[r]["first"].values())
        summary["reviewers"].append(entry)
    pooled = {}
    for i in study["ids"]:
        labels = [given[r][i]["overall_winner"] for r in reviewers if i in given[r]]
        if labels:
            pooled[i] = majority(labels)
    groups = {}
    for i, outcome in pooled.items():
        groups.setdefault(study["groups"].get(i, "all"), []).append(outcome)
    summary["pooled"] = {
        g: dict(win_tie_loss(o), win_rate=win_rate(win_tie_loss(o), halve_ties)) for g, o in sorted(groups.items())
    }
    total = win_tie_loss(list(pooled.values()))
    summary["pooled"]["Total"] = dict(total, win_rate=win_rate(total, halve_ties))
    everyone = [i for i in study["ids"] if all(i in given[r] for r in reviewers)]
    if everyone and len(reviewers) >= 2:
        summary["fleiss_kappa"] = fleiss_kappa([[given[r][i]["overall_winner"] for r in reviewers] for i in everyone])
        summary["fleiss_items"] = len(everyone)
    summary["cohen_kappa_pairs"] = {}
    for r in reviewers:
        for s in reviewers:
            both = [i for i in study["ids"] if i in given[r] and i in given[s]]
            if r < s and both:
                summary["cohen_kappa_pairs"][f"{r + 1}-{s + 1}"] = cohen_kappa(
                    [given[r][i]["overall_winner"] for i in both], [given[s][i]["overall_winner"] for i in both]
                )
    summary["judges"] = []
    for info, records in judgments:
        swap = {info.get("a"), info.get("b")} == {setup["name_a"], setup["name_b"]} and info.get("a") != setup["name_a"]
        judge = {
            j["id"]: {"a": "b", "b": "a"}.get(JUDGE_OUTCOME[j["outcome"]], "tie")
            if swap
            else JUDGE_OUTCOME[j["outcome"]]
            for j in records
            if j["outcome"] in JUDGE_OUTCOME
        }
        both = [i for i in pooled if i in judge]
        entry = {"judgments": info.get("file"), "items": len(both)}
        if both:
            entry["vs_majority"] = {
                "cohen_kappa": cohen_kappa([judge[i] for i in both], [pooled[i] for i in both]),
                "agreement": sum(judge[i] == pooled[i] for i in both) / len(both),
            }
            entry["judge"] = win_tie_loss([judge[i] for i in both])
            entry["vs_reviewer"] = {}
            for r in reviewers:
                mine = [i for i in both if i in given[r]]
                if mine:
                    entry["vs_reviewer"][str(r + 1)] = {
                        "cohen_kappa": cohen_kappa(
                            [judge[i] for i in mine], [given[r][i]["overall_winner"] for i in mine]
                        ),
                        "agreement": sum(judge[i] == given[r][i]["overall_winner"] for i in mine) / len(mine),
                    }
        summary["judges"].append(entry)
    return summary

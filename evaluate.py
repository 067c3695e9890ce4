"""The paper's evaluation (§4): Table 2's generation metrics, and LLM-judged comparisons of
single-turn answers (Table 4, KUAKE-QIC) and of multi-turn consultations (Table 5, MedDialog).

    # Table 2: zero-shot answers on a test set in any of the three public formats, then metrics
    python evaluate.py bench   --model DIR --data test_datasets.jsonl --out runs/eval/huatuo26m [--limit 500]
    # Table 4: answers to KUAKE-QIC_100 by two models, judged pairwise (App. D prompt)
    python evaluate.py answer  --model DIR_A --data KUAKE-QIC_100.json --out a.jsonl
    python evaluate.py judge   --a a.jsonl --b b.jsonl --name-a HuatuoGPT --name-b Ziya --out judge_qic.jsonl
    # Table 5: each model consults with a simulated patient (the API plays the patient, App. A.2)
    python evaluate.py consult --model DIR_A --data Med-dialog_100.json --out a_dialogues.jsonl
    python evaluate.py judge   --a a_dialogues.jsonl --b b_dialogues.jsonl ... --out judge_dialog.jsonl
    # §4.3, App. F: three doctors review pairs blind in a browser (review.py), then their tallies and
    # their agreement with each other and with the judge in the report
    python evaluate.py review  --a a.jsonl --b b.jsonl --name-a HuatuoGPT --name-b ChatGPT --reviewers 3 \
                               --out runs/review [--sample 50]
    # the tables and SVG charts
    python evaluate.py report  --judgments judge_qic.jsonl judge_dialog.jsonl [--reviews runs/review] \
                               [--halve-ties] --out runs/eval/report

Every file is appended a line per finished item with a stable id, so an interrupted command
continues when run again. API calls use chat_api (retries; the key only from OPENAI_API_KEY).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from chat_api import (
    GOODBYE,
    OPENAI_BASE_URL,
    PROMPTS,
    APIError,
    ChatClient,
    Reject,
    dialogue_text,
    fill,
    prompt,
    run_jobs,
)
from data.readers import add_input_args, read
from data.schema import finished_ids, load_jsonl
from safety import (
    COUNT,
    NONNEGATIVE,
    NONNEGATIVE_INT,
    POSITIVE,
    TEMPERATURE,
    claim_output,
    file_digest,
    model_digest,
    number,
    refuse_to_replace,
    run_main,
    setup_record,
)
from data.template import render
from generate import (
    CompiledStep,
    ReplyText,
    add_device_args,
    add_sampling_args,
    device_and_dtype,
    generate,
    load,
    stream,
)
from metrics import compute_metrics
from plots import judged, svg_win_tie_loss
from review import ASPECTS, serve_review, study_summary, win_rate

VERDICT = re.compile(r"Assistant 1 is (better than|worse than|equal to) Assistant 2", re.IGNORECASE)
TABLE2 = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "GLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "Distinct-1", "Distinct-2"]

BATCH_SIZE = 8  # questions answered together (38.5 GiB on one GPU at 13B with the longest prompts: plan.py)


# -- the model under test ----------------------------------------------------------------------------


class Doctor:
    """A model answering with the HuatuoGPT template and the KV cache."""

    def __init__(
        self,
        path,
        max_new_tokens=256,
        temperature=0.0,
        top_p=None,
        repetition_penalty=1.0,
        seed=0,
        device="cpu",
        dtype=torch.float32,
        compile=False,
    ):
        self.path = path
        self.model, self.tok = load(path, device=device, dtype=dtype)
        compiled = CompiledStep(self.model) if compile else None  # --compile: held here, not on the model
        self.max_new = max_new_tokens
        self.sampling = dict(
            temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty, compiled=compiled
        )
        self.gen = torch.Generator(device).manual_seed(seed)

    def prompt(self, conversation: list[dict]):
        """The rendered prompt (data.template.Rendered) for the next turn, leaving room for
        max_new_tokens: older rounds that do not fit are left out (render's rule), and a
        question that alone does not fit raises ValueError."""
        return render(self.tok, conversation, max_len=self.model.config.max_position_embeddings - self.max_new)

    def reply(self, conversations: list[list[dict]]) -> list[str | None]:
        """The next assistant turn of each conversation (each ends with the user); None for one
        whose last question does not fit in the context beside max_new_tokens."""
        prompts = []
        for c in conversations:
            try:
                prompts.append(self.prompt(c).ids)
            except ValueError:
                prompts.append(None)
        fitting = [p for p in prompts if p is not None]
        if not fitting:
            return [None] * len(prompts)
        out = generate(
            self.model,
            fitting,
            max_new_tokens=self.max_new,
            eos_id=self.tok.eos_id,
            pad_id=self.tok.pad_id,
            vocab_limit=len(self.tok),
            generator=self.gen,
            **self.sampling,
        )
        answers = iter(self.tok.decode(t).strip() for t in out.tokens)
        return [None if p is None else next(answers) for p in prompts]

    def stream(self, ids: list[int]) -> Iterator[str]:
        """The reply to a prompt (self.prompt(...).ids), piece by piece as it is sampled
        (chat.py): the pieces add up to what reply() returns for that conversation."""
        text = ReplyText(self.tok, [], self.max_new)
        for token in stream(
            self.model,
            ids,
            max_new_tokens=self.max_new,
            eos_id=self.tok.eos_id,
            pad_id=self.tok.pad_id,
            vocab_limit=len(self.tok),
            generator=self.gen,
            **self.sampling,
        ):
            piece = text.push(token, self.tok.eos_id)
            if piece:
                yield piece
            if text.finish:
                break


def answer_all(doctor: Doctor, records: list[dict], out: Path, batch_size: int, keep_reference: bool):
    """Answer each record's question in batches; lines already in `out` are skipped, and so
    (counted) is a question too long for the context."""
    done = finished_ids(out)
    todo = [r for r in records if r["id"] not in done]
    too_long = 0
    with open(out, "a", encoding="utf-8") as f:
        for i in tqdm(range(0, len(todo), batch_size), desc="answering"):
            batch = todo[i : i + batch_size]
            prompts = [r["messages"][:1] for r in batch]  # zero-shot: the question alone
            for r, question, answer in zip(batch, prompts, doctor.reply(prompts)):
                if answer is None:
                    too_long += 1
                    continue
                rec = {
                    "id": r["id"],
                    "messages": question + [{"role": "assistant", "content": answer}],
                    "meta": r.get("meta", {}),
                }
                if keep_reference:
                    rec["reference"] = r["messages"][1]["content"]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
    if too_long:
        print(f"skipped {too_long} question(s) longer than the context less --max-new-tokens", file=sys.stderr)


def answer_setup(args, *prompts: str) -> tuple[dict, dict]:
    """What makes a model's answers what they are (claim_output): the weights, the data, the
    decoding, and for consult the simulated patient."""
    setup = {
        "command": args.cmd,
        "model": model_digest(args.model),
        "data": file_digest(args.data),
        "format": args.format,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "dtype": str(device_and_dtype(args)[1]),
    }
    setup.update({f"prompt {name}": file_digest(PROMPTS / f"{name}.txt") for name in prompts})
    return setup, {"model": str(args.model), "data": str(args.data)}


def cmd_bench(args):
    records = [r for r in read(args.data, args.format, encoding=args.encoding) if len(r["messages"]) >= 2][: args.limit]
    out = Path(args.out)
    claim_output(out / "predictions.jsonl", *answer_setup(args), inputs=[args.data])
    doctor = make_doctor(args)
    answer_all(doctor, records, out / "predictions.jsonl", args.batch_size, keep_reference=True)
    wanted = {r["id"] for r in records}
    preds = [p for p in load_jsonl(out / "predictions.jsonl") if p["id"] in wanted]
    m = compute_metrics([p["messages"][-1]["content"] for p in preds], [p["reference"] for p in preds])
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    print(f"{len(preds)} items of {args.data}")
    print("| model | " + " | ".join(TABLE2) + " |")
    print("|---" * (len(TABLE2) + 1) + "|")
    print(f"| {args.name or Path(args.model).name} | " + " | ".join(f"{m[k]:.2f}" for k in TABLE2) + " |")


def cmd_answer(args):
    records = list(read(args.data, args.format, encoding=args.encoding))[: args.limit]
    claim_output(args.out, *answer_setup(args), inputs=[args.data])
    answer_all(make_doctor(args), records, Path(args.out), args.batch_size, keep_reference=False)
    print(f"answers in {args.out}")


# -- simulated consultations --------------------------------------------------------------------------


def consult(doctor: Doctor, client: ChatClient, case: dict, max_rounds: int) -> dict:
    """The API plays the patient of a MedDialog case (App. A.2 patient prompt); the model under
    test plays the doctor, until the patient says 再见 (and is answered) or max_rounds."""
    patient = [{"role": "user", "content": fill(prompt("a2_patient"), medical_case=case["messages"][0]["content"])}]
    messages, ended = [], "turn limit"
    for _ in range(max_rounds):
        said = client.chat(patient).content.strip()
        if not said:
            raise Reject("the patient said nothing")
        messages.append({"role": "user", "content": said})
        answer = doctor.reply([messages])[0]
        if answer is None:
            raise Reject("the consultation outgrew the model's context")
        messages.append({"role": "assistant", "content": answer})
        patient += [{"role": "assistant", "content": said}, {"role": "user", "content": answer}]
        if GOODBYE in said:
            ended = "goodbye"
            break
    return {"id": case["id"], "messages": messages, "meta": dict(case.get("meta", {}), ended=ended)}


def cmd_consult(args):
    cases = list(read(args.data, args.format, encoding=args.encoding))[: args.limit]  # --limit: the first N cases
    setup, info = answer_setup(args, "a2_patient")
    setup.update(patient_model=args.patient_model, api_temperature=args.api_temperature, max_rounds=args.max_rounds)
    claim_output(args.out, setup, dict(info, base_url=args.base_url), inputs=[args.data])
    doctor = make_doctor(args)
    client = api_client(args)
    summary = run_jobs(
        [(c["id"], c) for c in cases],
        lambda c: [consult(doctor, client, c, args.max_rounds)],
        Path(args.out),
        rejects_path(args.out),
        workers=1,
        desc="consult",
    )
    print("\n".join(summary.lines("consult", "consultations")))
    return summary.exit_code


# -- the judge ------------------------------------------------------------------------------------------


def parse_verdict(text: str) -> str | None:
    """'better' / 'worse' / 'equal' for Assistant 1, read from the last line that states one."""
    for line in reversed([entry for entry in text.splitlines() if entry.strip()]):
        m = VERDICT.search(line)
        if m:
            return m.group(1).lower().split()[0]
    return None


def judge_order(seed: int, item_id: str) -> str:
    """'ab' (A shown as Assistant 1) or 'ba', drawn per item from (seed, id): reproducible."""
    return random.Random(f"{seed}:{item_id}").choice(["ab", "ba"])


def ask_verdict(client, first: dict, second: dict, retries: int) -> tuple[str | None, str]:
    text = fill(
        prompt("d_auto_evaluation"),
        Response_A=dialogue_text(first["messages"]),
        Response_B=dialogue_text(second["messages"]),
    )
    reply = ""
    for _ in range(1 + retries):  # an unparseable verdict is asked again, then recorded as such
        reply = client.chat([{"role": "user", "content": text}]).content
        verdict = parse_verdict(reply)
        if verdict:
            return verdict, reply
    return None, reply


OUTCOME_FOR_A = {
    ("ab", "better"): "win",
    ("ab", "worse"): "loss",
    ("ba", "better"): "loss",
    ("ba", "worse"): "win",
    ("ab", "equal"): "tie",
    ("ba", "equal"): "tie",
}


def judge_item(client, a: dict, b: dict, *, seed: int, both_orders: bool, retries: int) -> dict:
    orders = ["ab", "ba"] if both_orders else [judge_order(seed, a["id"])]
    outcomes, raw = [], []
    for order in orders:
        first, second = (a, b) if order == "ab" else (b, a)
        verdict, reply = ask_verdict(client, first, second, retries)
        outcomes.append(OUTCOME_FOR_A.get((order, verdict), "unparsed"))
        raw.append({"order": order, "verdict": verdict, "reply": reply})
    if "unparsed" in outcomes:
        outcome = "unparsed"
    elif len(set(outcomes)) == 1:
        outcome = outcomes[0]
    else:
        outcome = "tie"  # the two orders disagree: counted as a tie
    meta = a.get("meta", {})
    return {
        "id": a["id"],
        "group": meta.get("label") or meta.get("department") or "all",
        "outcome": outcome,
        "judgments": raw,
    }


def cmd_judge(args):
    a = {r["id"]: r for r in load_jsonl(args.a)}
    b = {r["id"]: r for r in load_jsonl(args.b)}
    common = [i for i in a if i in b][: args.limit]  # --limit: the first N items
    if not common:
        raise SystemExit(f"{args.a} and {args.b} share no ids")

    # The answers judged are fingerprinted by what produced them (their own setup record) when
    # they have one, else by their bytes.
    def produced(path):
        made_by = setup_record(path)
        return "made by " + file_digest(made_by) if made_by.is_file() else "file " + file_digest(path)

    client = api_client(args)
    out = Path(args.out)
    claim_output(
        out,
        {
            "a": produced(args.a),
            "b": produced(args.b),
            "judge_model": args.judge_model,
            "api_temperature": args.api_temperature,
            "seed": args.seed,
            "both_orders": args.both_orders,
            "prompt d_auto_evaluation": file_digest(PROMPTS / "d_auto_evaluation.txt"),
        },
        {"a": args.name_a, "b": args.name_b, "files": [args.a, args.b], "base_url": args.base_url},
        inputs=[args.a, args.b],
    )
    summary = run_jobs(
        [(i, i) for i in common],
        lambda i: [
            judge_item(client, a[i], b[i], seed=args.seed, both_orders=args.both_orders, retries=args.judge_retries)
        ],
        out,
        rejects_path(out),
        workers=args.workers,
        desc="judge",
    )
    print("\n".join(summary.lines("judge", "judgments")))
    if out.is_file():
        print(table(load_jsonl(out), args.name_a, args.name_b))
    return summary.exit_code


# -- the report ---------------------------------------------------------------------------------------


def tally(judgments: list[dict]) -> dict[str, dict[str, int]]:
    groups: dict[str, dict[str, int]] = {}
    for j in judgments:
        g = groups.setdefault(j["group"], {"win": 0, "tie": 0, "loss": 0, "unparsed": 0})
        g[j["outcome"]] += 1
    total = {k: sum(g[k] for g in groups.values()) for k in ("win", "tie", "loss", "unparsed")}
    return dict(sorted(groups.items())) | {"Total": total}


def table(judgments: list[dict], name_a: str, name_b: str) -> str:
    rows = [f"| {name_a} vs. {name_b} | win | tie | loss | unparsed |", "|---|---|---|---|---|"]
    for group, c in tally(judgments).items():
        rows.append(f"| {group} | {c['win']} | {c['tie']} | {c['loss']} | {c['unparsed']} |")
    return "\n".join(rows)


def judgment_files(paths) -> list[tuple[dict, list[dict]]]:
    """Each judgments file's setup info (the two names; A and B when it has no record) with
    its records."""
    out = []
    for path in map(Path, paths):
        made_by = setup_record(path)
        info = json.loads(made_by.read_text(encoding="utf-8"))["info"] if made_by.is_file() else {"a": "A", "b": "B"}
        out.append((dict(info, file=path.name), load_jsonl(path)))
    return out


def cmd_report(args):
    out = Path(args.out)
    written = ["report.md", "win_tie_loss.svg"] + (["summary.json", "doctors_vs_judge.svg"] if args.reviews else [])
    refuse_to_replace(out, written, overwrite=args.overwrite, what="report")
    out.mkdir(parents=True, exist_ok=True)
    lines, bars = ["# Evaluation report", ""], []
    files = judgment_files(args.judgments)
    for (meta, judgments), path in zip(files, args.judgments):
        lines += [
            f"## {meta['a']} vs. {meta['b']} ({Path(path).name}, {len(judgments)} items)",
            "",
            table(judgments, meta["a"], meta["b"]),
            "",
        ]
        if args.halve_ties:
            rate = win_rate(win_tie_loss_of(tally(judgments)["Total"]), True)
            lines += [f"{meta['a']}'s win rate, ties halved (Figure 5): {'-' if rate is None else f'{rate:.3f}'}", ""]
        bars.append((f"{meta['a']} vs. {meta['b']}", tally(judgments)["Total"]))
    if args.reviews:
        lines += doctors_section(Path(args.reviews), files, out, args.halve_ties)
    (out / "win_tie_loss.svg").unlink(missing_ok=True)
    if judged(bars):
        (out / "win_tie_loss.svg").write_text(svg_win_tie_loss("Win / tie / loss", bars), encoding="utf-8")
        lines += ["![win, tie and loss per opponent](win_tie_loss.svg)", ""]
    else:
        lines += ["No verdict could be parsed in any of these judgments, so there is no win/tie/loss chart.", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out / 'report.md'}" + (f" and {out / 'win_tie_loss.svg'}" if judged(bars) else ""))


def win_tie_loss_of(counts: dict) -> dict:
    return {k: counts[k] for k in ("win", "tie", "loss")}


def doctors_section(directory: Path, files, out: Path, halve_ties: bool) -> list[str]:
    """The doctors' study in the report (review.study_summary), its figures in OUT/summary.json
    and their win / tie / loss beside the judge's in OUT/doctors_vs_judge.svg."""
    s = study_summary(directory, files, halve_ties)
    (out / "summary.json").write_text(json.dumps(s, indent=1, ensure_ascii=False), encoding="utf-8")
    a, b = s["name_a"], s["name_b"]
    rate = "win rate (ties halved)" if halve_ties else "win rate (ties apart)"

    def num(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [f"## Doctors: {a} vs. {b} ({s['items']} items, {len(s['reviewers'])} reviewers, blind)", ""]
    lines += ["| reviewer | aspect | win | tie | loss | " + rate + " |", "|---|---|---|---|---|---|"]
    for r in s["reviewers"]:
        for aspect in ("overall", *ASPECTS):
            c = r[aspect]
            lines.append(
                f"| {r['reviewer']} | {aspect} | {c['win']} | {c['tie']} | {c['loss']} | {num(c['win_rate'])} |"
            )
    lines += ["", "The reviewers pooled (each item's majority; no majority is a tie):", ""]
    lines += ["| group | win | tie | loss | " + rate + " |", "|---|---|---|---|---|"]
    for group, c in s["pooled"].items():
        lines.append(f"| {group} | {c['win']} | {c['tie']} | {c['loss']} | {num(c['win_rate'])} |")
    lines.append("")
    if "fleiss_kappa" in s:
        lines.append(
            f"Agreement among the doctors: Fleiss' κ {s['fleiss_kappa']:.3f} over the {s['fleiss_items']} items all judged."
        )
    pairs = ", ".join(f"{k}: {v:.3f}" for k, v in s["cohen_kappa_pairs"].items())
    lines += [f"Each pair's Cohen's κ: {pairs or '-'}.", ""]
    bars = [("doctors (pooled)", dict(win_tie_loss_of(s["pooled"]["Total"]), unparsed=0))]
    for j in s["judges"]:
        if j["items"]:
            m = j["vs_majority"]
            each = ", ".join(f"doctor {r}: κ {v['cohen_kappa']:.3f}" for r, v in j["vs_reviewer"].items())
            lines.append(
                f"The LLM judge ({j['judgments']}) against the doctors' majority on the {j['items']} items both "
                f"judged: Cohen's κ {m['cohen_kappa']:.3f}, raw agreement {m['agreement']:.3f}; {each}."
            )
            bars.append((f"LLM judge ({j['judgments']})", dict(j["judge"], unparsed=0)))
    (out / "doctors_vs_judge.svg").unlink(missing_ok=True)
    if judged(bars):
        (out / "doctors_vs_judge.svg").write_text(
            svg_win_tie_loss(f"{a} vs. {b}: the doctors and the judge", bars), encoding="utf-8"
        )
        lines += ["", "![the doctors' win, tie and loss beside the judge's](doctors_vs_judge.svg)"]
    return lines + [""]


# -- command line ---------------------------------------------------------------------------------


def make_doctor(args) -> Doctor:
    device, dtype = device_and_dtype(args)
    return Doctor(
        args.model,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.repetition_penalty,
        args.seed,
        device=device,
        dtype=dtype,
        compile=args.compile,
    )


def api_client(args) -> ChatClient:
    """The judge's client, or the simulated patient's for consult."""
    model = args.patient_model if args.cmd == "consult" else args.judge_model
    return ChatClient(
        args.base_url, model, timeout=args.timeout, backoff=args.backoff, temperature=args.api_temperature
    )


def rejects_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".rejects.jsonl")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp):
        sp.add_argument("--model", required=True, help="an HF-format directory with tokenizer.model")
        sp.add_argument("--data", required=True)
        add_input_args(sp)
        sp.add_argument("--out", required=True)
        sp.add_argument("--limit", type=COUNT, help="only the first N items")
        sp.add_argument("--batch-size", type=COUNT, default=BATCH_SIZE)
        add_sampling_args(sp, max_new_tokens=256, temperature=0.0, top_p=None, repetition_penalty=1.0)
        add_device_args(sp)

    def api_args(sp, role: str):
        sp.add_argument("--base-url", default=OPENAI_BASE_URL)
        if role == "judge":  # §4: GPT-4 judges
            sp.add_argument("--judge-model", default="gpt-4", help="the API model that judges")
        else:  # §4.3: "we use ChatGPT to act as a patient"
            sp.add_argument("--patient-model", default="gpt-3.5-turbo", help="the API model that plays the patient")
        sp.add_argument("--api-temperature", type=TEMPERATURE, default=0.0)
        sp.add_argument("--timeout", type=POSITIVE, default=120.0)
        sp.add_argument("--backoff", type=NONNEGATIVE, default=1.0)

    b = sub.add_parser("bench", help="Table 2: zero-shot generation metrics")
    model_args(b)
    b.add_argument("--name", help="the row's label")
    a = sub.add_parser("answer", help="single-turn answers for the judge")
    model_args(a)
    c = sub.add_parser("consult", help="multi-turn consultations with a simulated patient")
    model_args(c)
    api_args(c, "patient")
    c.add_argument("--max-rounds", type=COUNT, default=6)
    j = sub.add_parser("judge", help="pairwise LLM judgments (App. D)")
    j.add_argument("--a", required=True)
    j.add_argument("--b", required=True)
    j.add_argument("--name-a", default="A")
    j.add_argument("--name-b", default="B")
    j.add_argument("--out", required=True)
    j.add_argument("--seed", type=int, default=0, help="draws each item's answer order")
    j.add_argument("--both-orders", action="store_true", help="judge both orders; disagreement is a tie")
    j.add_argument("--judge-retries", type=NONNEGATIVE_INT, default=2, help="re-asks for an unparseable verdict")
    j.add_argument("--workers", type=COUNT, default=4)
    j.add_argument("--limit", type=COUNT)
    api_args(j, "judge")
    v = sub.add_parser("review", help="the doctors' blind pairwise review, in a browser (§4.3, App. F)")
    v.add_argument("--a", required=True, help="answers or consultations of the first model (answer, consult)")
    v.add_argument("--b", required=True, help="the second model's, paired by id")
    v.add_argument("--name-a", default="A")
    v.add_argument("--name-b", default="B")
    v.add_argument("--reviewers", type=COUNT, default=3, help="doctors, each with a link and a key (§4.3: three)")
    v.add_argument("--sample", type=COUNT, help="N items drawn reproducibly (§4.3: 50 of the 100 cases)")
    v.add_argument("--seed", type=int, default=0, help="draws the sample, each reviewer's order and sides")
    v.add_argument("--host", default="127.0.0.1", help="a ward's address serves its network, over plain HTTP")
    v.add_argument("--port", type=number(int, least=0, most=65535), default=8100)
    v.add_argument("--out", required=True)
    r = sub.add_parser("report", help="Markdown tables and SVG charts")
    r.add_argument("--judgments", nargs="+", required=True)
    r.add_argument("--reviews", help="a review's --out: the doctors' tallies and agreement")
    r.add_argument("--halve-ties", action="store_true", help="win rates with ties split evenly (Figure 5)")
    r.add_argument("--out", required=True)
    r.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    args = p.parse_args(argv)
    try:
        code = {
            "bench": cmd_bench,
            "answer": cmd_answer,
            "consult": cmd_consult,
            "judge": cmd_judge,
            "review": serve_review,
            "report": cmd_report,
        }[args.cmd](args)
    except APIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(run_main(main))

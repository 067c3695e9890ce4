"""The distilled and polished SFT data (paper §3.1, App. A) and the mixed-feedback preference
scores (§3.2, App. B), through the OpenAI Chat Completions API or any compatible server.

    python distill.py instructions    --out distilled_instructions.jsonl            [--calls 10]
    python distill.py conversations   --input Med-dialog_100.json --out distilled_conversations.jsonl
    python distill.py polish-qa       --input huatuo26m.jsonl --out real_instructions.jsonl
    python distill.py polish-dialogue --input meddialog.jsonl --out real_conversations.jsonl
    python distill.py score           --input samples.jsonl --out pairs.jsonl

Common options: --base-url (default the OpenAI API; e.g. http://localhost:8000/v1 for vLLM),
--model, --workers, --limit, --dry-run (print the first prompt, call nothing). The key is read
from OPENAI_API_KEY only. Output is our schema (data/schema.py), appended one line per finished
item with a stable id, so rerunning the same command after a crash continues where it stopped.
Replies that cannot be used go to OUT.rejects.jsonl with the reason.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from chat_api import (
    GOODBYE,
    OPENAI_BASE_URL,
    PRICE_INPUT,
    PRICE_OUTPUT,
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
from data.schema import Report, check_prompt, load_jsonl
from safety import COUNT, NONNEGATIVE, POSITIVE, SHARE, TEMPERATURE, claim_output, file_digest, run_main

SEEDS = Path(__file__).resolve().parent / "data" / "prompts" / "seed_instructions.jsonl"
SEEDS_PER_CALL = 3  # human-written examples shown in each generation call (self-instruct)
DEDUP_ROUGE_L = 0.7  # self-instruct keeps an instruction only if ROUGE-L < 0.7 to every kept one
MAX_ROUNDS = 6  # simulated consultations end at 再见 or after this many patient turns


# -- shared text helpers ---------------------------------------------------------------------------


def lcs_similarity(a: str, b: str) -> float:
    """Character-level ROUGE-L F1, 2 * LCS / (len(a) + len(b)): self-instruct's near-duplicate test.
    (Not Table 2's ROUGE-L, which is metrics.rouge_l.)"""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return 2 * prev[-1] / (len(a) + len(b))


_TURN = re.compile(r"^\s*[\*#]*\s*(病人|患者|用户|医生|医疗大模型|HuatuoGPT|AI|助手)\s*[\*]*\s*[:：]\s*(.*)$")
_PATIENT_LABELS = {"病人", "患者", "用户"}


def parse_dialogue(text: str) -> list[dict]:
    """Turns of a rewritten dialogue; a line without a speaker label continues the last turn."""
    turns: list[dict] = []
    for line in text.splitlines():
        m = _TURN.match(line)
        if m:
            turns.append(
                {"role": "user" if m.group(1) in _PATIENT_LABELS else "assistant", "content": m.group(2).strip()}
            )
        elif line.strip() and turns:
            turns[-1]["content"] = (turns[-1]["content"] + "\n" + line.strip()).strip()
    return turns


_NUMBER = re.compile(r"^\s*(?:\d{1,2}\s*[.、．)）:：]|[（(]\d{1,2}[)）])\s*")
_LABEL = re.compile(r"^\s*[<〈《\[【]?\s*(角色|指令|输入)\s*[>〉》\]】]?\s*[:：]?\s*")


def parse_triples(text: str) -> list[dict]:
    """〈role, instruction, input〉 triples from a numbered list, with or without the labels
    角色/指令/输入; unlabelled blocks are read as role, instruction, input lines in order."""
    blocks, current = [], None
    for line in text.splitlines():
        if _NUMBER.match(line):
            current = []
            blocks.append(current)
            line = _NUMBER.sub("", line, count=1)
        if current is not None and line.strip():
            current.append(line.strip())
    triples = []
    for lines in blocks:
        fields, positional = {}, []
        for line in lines:
            m = _LABEL.match(line)
            if m:
                fields[{"角色": "role", "指令": "instruction", "输入": "input"}[m.group(1)]] = line[m.end() :].strip()
            else:
                positional.append(line)
        if not fields:
            fields = dict(zip(("role", "instruction", "input"), positional))
        if fields.get("instruction"):
            inp = fields.get("input", "")
            if inp in ("无", "空", "<无输入>", "（无）", "(无)", "None", "-"):
                inp = ""
            triples.append({"role": fields.get("role", ""), "instruction": fields["instruction"], "input": inp})
    return triples


_RATING = re.compile(
    r"Rating\s*A\s*[:：]\s*\[?\s*(\d+(?:\.\d+)?)\s*\]?\s*[;；,，]?\s*Rating\s*B\s*[:：]\s*\[?\s*(\d+(?:\.\d+)?)",
    re.IGNORECASE | re.DOTALL,
)


def parse_ratings(text: str) -> tuple[float, float]:
    """'Rating A: 8; Rating B: 6' -> (8.0, 6.0); the last such pair in the reply counts."""
    found = _RATING.findall(text)
    if not found:
        raise Reject(f"no ratings: expected 'Rating A: x; Rating B: y', got {text[:80]!r}")
    a, b = map(float, found[-1])
    if not (1 <= a <= 10 and 1 <= b <= 10):
        raise Reject(f"ratings out of range 1-10: {a}, {b}")
    return a, b


def ask(client, content: str, **kw) -> str:
    return client.chat([{"role": "user", "content": content}], **kw).content


# -- the five subcommands ------------------------------------------------------------------------
# Each returns (jobs, work, first_prompt): jobs are (stable id, payload), work(payload) -> records.


def instructions_generate(args, client):
    seeds = [
        json.loads(line) for line in Path(args.input or SEEDS).read_text(encoding="utf-8").splitlines() if line.strip()
    ]

    def render(k: int) -> str:
        rng = random.Random(f"{args.seed}:{k}")
        shown = rng.sample(seeds, min(SEEDS_PER_CALL, len(seeds)))
        examples = "\n".join(
            f"{i}. 角色：{s['role']}\n指令：{s['instruction']}\n输入：{s['input'] or '无'}"
            for i, s in enumerate(shown, start=1)
        )
        return prompt("a1_self_instruct") + "\n" + examples + f"\n{len(shown) + 1}."

    def work(k: int):
        text = ask(client, render(k))
        triples = parse_triples(f"{SEEDS_PER_CALL + 1}." + text if not _NUMBER.match(text) else text)
        if not triples:
            raise Reject(f"no triples parsed from the reply: {text[:80]!r}")
        return [dict(t, id=f"gen-{k}-{j}", job=f"gen-{k}") for j, t in enumerate(triples)]

    return [(f"gen-{k}", k) for k in range(args.calls)], work, lambda k: render(k), seeds


def keep_novel(triples: list[dict], seeds: list[dict]) -> tuple[list[dict], int]:
    """Self-instruct's filter: drop an instruction whose ROUGE-L to one already kept (or to a
    seed) is DEDUP_ROUGE_L or more. File order decides which of two near-duplicates stays."""
    kept, pool, dropped = [], [s["instruction"] for s in seeds], 0
    for t in triples:
        if any(lcs_similarity(t["instruction"], p) >= DEDUP_ROUGE_L for p in pool):
            dropped += 1
            continue
        kept.append(t)
        pool.append(t["instruction"])
    return kept, dropped


def instructions_answer(args, client, triples):
    def question(t):
        return t["instruction"] + ("\n" + t["input"] if t["input"] else "")

    def render(t):
        return fill(prompt("a1_role_answer"), **{"Medical Role": t["role"] or "医生", "Question": question(t)})

    def work(t):
        reply = ask(client, render(t)).strip()
        if not reply:
            raise Reject("empty reply")
        return [
            {
                "id": t["id"],
                "source": "distilled_instruction",
                "meta": {"role": t["role"]},
                "messages": [{"role": "user", "content": question(t)}, {"role": "assistant", "content": reply}],
            }
        ]

    return [(t["id"], t) for t in triples], work, render


def case_of(record: dict) -> tuple[str, str]:
    meta = record.get("meta", {})
    case = meta.get("medical_case") or record["messages"][0]["content"]
    diagnosis = meta.get("doctor_diagnosis") or meta.get("diagnosis")
    if not diagnosis:
        raise Reject(f"record {record['id']} has no doctor_diagnosis (or diagnosis) in meta")
    return case, diagnosis


def conversations(args, client, records):
    def render(r):
        return fill(prompt("a2_patient"), medical_case=case_of(r)[0])

    def work(r):
        case, diagnosis = case_of(r)
        # Two separate sessions: the patient sees the case, the doctor only the diagnosis.
        patient = [{"role": "user", "content": fill(prompt("a2_patient"), medical_case=case)}]
        doctor = [{"role": "system", "content": fill(prompt("a2_doctor"), doctor_diagnosis=diagnosis)}]
        messages, ended = [], "turn limit"
        for _ in range(args.max_rounds):
            said = client.chat(patient).content.strip()
            if not said:
                raise Reject("the patient said nothing")
            patient.append({"role": "assistant", "content": said})
            doctor.append({"role": "user", "content": said})
            answer = client.chat(doctor).content.strip()
            if not answer:
                raise Reject("the doctor said nothing")
            doctor.append({"role": "assistant", "content": answer})
            patient.append({"role": "user", "content": answer})
            messages += [{"role": "user", "content": said}, {"role": "assistant", "content": answer}]
            if GOODBYE in said:  # the doctor has answered the goodbye; the consultation is over
                ended = "goodbye"
                break
        return [
            {
                "id": r["id"],
                "source": "distilled_conversation",
                "messages": messages,
                "meta": {"medical_case": case, "doctor_diagnosis": diagnosis, "ended": ended},
            }
        ]

    return [(r["id"], r) for r in records], work, render


def polish_qa(args, client, records):
    def render(r):
        return fill(
            prompt("a3_polish_qa"),
            Patient_Question=r["messages"][0]["content"],
            Doctor_Response=r["messages"][1]["content"],
        )

    def work(r):
        reply = ask(client, render(r)).strip()
        reply = re.sub(r"^\s*<?HuatuoGPT回复>?\s*[:：]\s*", "", reply)
        if not reply:
            raise Reject("empty reply")
        return [
            {
                "id": r["id"],
                "source": "real_instruction",
                "meta": {"original_answer": r["messages"][1]["content"]},
                "messages": [r["messages"][0], {"role": "assistant", "content": reply}],
            }
        ]

    return [(r["id"], r) for r in records if len(r["messages"]) >= 2], work, render


def polish_dialogue(args, client, records):
    def render(r):
        return fill(prompt("a4_polish_dialogue"), dialogue=dialogue_text(r["messages"]))

    def work(r):
        reply = ask(client, render(r))
        turns = parse_dialogue(reply)
        want = [m["role"] for m in r["messages"]]
        got = [m["role"] for m in turns]
        if got != want or any(not t["content"] for t in turns):
            raise Reject(
                f"changed shape: {len(want)} turns became {len(got)} "
                f"({''.join('P' if x == 'user' else 'D' for x in got) or 'none'})"
            )
        return [{"id": r["id"], "source": "real_conversation", "messages": turns, "meta": {"original": r["messages"]}}]

    return [(r["id"], r) for r in records], work, render


def read_samples(path) -> list[dict]:
    """Sampling output: {"id", "messages" (history + question), "reference", "responses"}."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{where}: not valid JSON ({e.msg})")
        check_prompt(dict(r, source=r.get("source", "samples")), where)
        if not isinstance(r.get("reference"), str) or not r["reference"].strip():
            raise SystemExit(f"{where}: field 'reference' (the doctor's answer) must be a non-empty string")
        if not isinstance(r.get("responses"), list) or len(r["responses"]) < 2:
            raise SystemExit(f"{where}: field 'responses' must list at least two responses")
        finished = r.setdefault("finished", [True] * len(r["responses"]))
        if not (
            isinstance(finished, list)
            and len(finished) == len(r["responses"])
            and all(isinstance(x, bool) for x in finished)
        ):
            raise SystemExit(f"{where}: field 'finished' must list one true/false per response")
        out.append(r)
    return out


def score(args, client, samples):
    def render(job, swap=False):
        r, i, j = job
        a, b = (r["responses"][j], r["responses"][i]) if swap else (r["responses"][i], r["responses"][j])
        return fill(
            prompt("b_mixed_feedback"),
            History=dialogue_text(r["messages"][:-1]) or "无",
            Query=r["messages"][-1]["content"],
            Doctor_response=r["reference"],
            Response_A=a,
            Response_B=b,
        )

    def work(job):
        r, i, j = job
        # Each pair is rated twice with the positions swapped (App. B, §3.2); only a pair
        # preferred the same way in both orders is kept.
        a1, b1 = parse_ratings(ask(client, render(job)))
        a2, b2 = parse_ratings(ask(client, render(job, swap=True)))
        first = i if a1 > b1 else j if b1 > a1 else None
        second = i if b2 > a2 else j if a2 > b2 else None
        if first is None or first != second:
            raise Reject(f"inconsistent: ratings {a1}/{b1}, then {a2}/{b2} with positions swapped")
        loser = j if first == i else i
        return [
            {
                "id": f"{r['id']}:{i}-{j}",
                "source": "mixed_feedback",
                "messages": r["messages"],
                "chosen": r["responses"][first],
                "rejected": r["responses"][loser],
                "meta": {"ratings": [[a1, b1], [a2, b2]], "reference": r["reference"]},
            }
        ]

    # A response cut off at the sampler's max_new_tokens is not rated (train_rm.py sample marks
    # it): judged against a doctor's whole answer, it would teach the reward model little but
    # "longer is worse" or "shorter is worse".
    pairs = [(r, i, j) for r in samples for i in range(len(r["responses"])) for j in range(i + 1, len(r["responses"]))]
    jobs = [(f"{r['id']}:{i}-{j}", (r, i, j)) for r, i, j in pairs if r["finished"][i] and r["finished"][j]]
    if len(jobs) < len(pairs):
        print(
            f"{len(pairs) - len(jobs)} of {len(pairs)} pairs not rated: a response in them was cut off "
            "before eos (train_rm.py sample --max-new-tokens)",
            file=sys.stderr,
        )
    return jobs, work, render


# -- command line ---------------------------------------------------------------------------------


def read_records(path, report, fmt=None, encoding="utf-8"):
    return list(read(path, fmt, skip_bad=True, report=report, encoding=encoding))


# The prompt files each command sends (data/prompts/).
PROMPTS_USED = {
    "instructions": ["a1_self_instruct", "a1_role_answer"],
    "conversations": ["a2_patient", "a2_doctor"],
    "polish-qa": ["a3_polish_qa"],
    "polish-dialogue": ["a4_polish_dialogue"],
    "score": ["b_mixed_feedback"],
}


def distill_setup(args, sampling: dict) -> tuple[dict, dict]:
    """What makes this command's records what they are (safety.claim_output)."""
    source = Path(args.input) if args.input else SEEDS
    setup = {
        "command": args.command,
        "input": file_digest(source),
        "model": args.model,
        **sampling,
        "seed": args.seed,
        "max_rounds": args.max_rounds if args.command == "conversations" else None,
    }
    setup.update({f"prompt {name}": file_digest(PROMPTS / f"{name}.txt") for name in PROMPTS_USED[args.command]})
    return setup, {"input": str(source), "base_url": args.base_url}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["instructions", "conversations", "polish-qa", "polish-dialogue", "score"])
    p.add_argument("--input", help="input file (instructions: seed file, default data/prompts/seed_instructions.jsonl)")
    add_input_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rejects", type=Path, help="default: OUT with .rejects.jsonl")
    p.add_argument("--base-url", default=OPENAI_BASE_URL)
    p.add_argument("--model", default="gpt-3.5-turbo")
    p.add_argument("--temperature", type=TEMPERATURE, help="default: 1.0 to generate, 0 to score")
    p.add_argument("--top-p", type=SHARE)
    p.add_argument("--max-tokens", type=COUNT)
    p.add_argument("--workers", type=COUNT, default=4)
    p.add_argument("--limit", type=COUNT, help="process at most this many new items")
    p.add_argument("--timeout", type=POSITIVE, default=120.0, help="seconds per request")
    p.add_argument("--max-attempts", type=COUNT, default=6)
    p.add_argument("--backoff", type=NONNEGATIVE, default=1.0, help="first retry waits up to this many seconds")
    p.add_argument("--calls", type=COUNT, default=10, help="instructions: generation calls (20 triples each)")
    p.add_argument("--max-rounds", type=COUNT, default=MAX_ROUNDS, help="conversations: patient turns at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--price-input", type=NONNEGATIVE, default=PRICE_INPUT, help="USD per 1M prompt tokens")
    p.add_argument("--price-output", type=NONNEGATIVE, default=PRICE_OUTPUT, help="USD per 1M completion tokens")
    p.add_argument("--dry-run", action="store_true", help="print the first prompt and stop; no API call")
    return p


def sampling_settings(args) -> dict:
    """The API's sampling settings: those given, and temperature 1.0 to generate, 0 to score."""
    return {
        k: v
        for k, v in (
            (
                "temperature",
                args.temperature if args.temperature is not None else (0.0 if args.command == "score" else 1.0),
            ),
            ("top_p", args.top_p),
            ("max_tokens", args.max_tokens),
        )
        if v is not None
    }


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    rejects = args.rejects or args.out.with_name(args.out.stem + ".rejects.jsonl")
    if args.command != "instructions" and not args.input:
        p.error(f"{args.command} needs --input")
    sampling = sampling_settings(args)
    if not args.dry_run:
        claim_output(args.out, *distill_setup(args, sampling), inputs=[args.input])
    try:
        client = (
            None
            if args.dry_run
            else ChatClient(
                args.base_url,
                args.model,
                timeout=args.timeout,
                max_attempts=args.max_attempts,
                backoff=args.backoff,
                **sampling,
            )
        )
        report = Report()
        runs = []  # (label, summary)
        if args.command == "instructions":
            jobs, work, render, seeds = instructions_generate(args, client)
            triples_path = args.out.with_name(args.out.stem + ".triples.jsonl")
            if args.dry_run:
                print(render(jobs[0][1]))
                return 0
            runs.append(
                (
                    "generate",
                    run_jobs(
                        jobs, work, triples_path, rejects, workers=args.workers, limit=args.limit, desc="generate"
                    ),
                )
            )
            triples = load_jsonl(triples_path) if triples_path.is_file() else []
            kept, dropped = keep_novel(triples, seeds)
            print(
                f"{len(triples)} triples generated, {dropped} dropped as near-duplicates (ROUGE-L >= {DEDUP_ROUGE_L})"
            )
            jobs, work, render = instructions_answer(args, client, kept)
            if runs[-1][1].stopped:  # the API refuses us: answering would only fail too
                jobs = []
        else:
            data = (
                read_samples(args.input)
                if args.command == "score"
                else read_records(args.input, report, args.format, args.encoding)
            )
            builder = {
                "conversations": conversations,
                "polish-qa": polish_qa,
                "polish-dialogue": polish_dialogue,
                "score": score,
            }[args.command]
            jobs, work, render = builder(args, client, data)
            if report:
                print(report.summary())
        if args.dry_run:
            print(render(jobs[0][1]) if jobs else "nothing to do")
            return 0
        runs.append(
            (
                args.command,
                run_jobs(jobs, work, args.out, rejects, workers=args.workers, limit=args.limit, desc=args.command),
            )
        )
    except APIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished items are saved; rerun the same command to continue", file=sys.stderr)
        return 130
    s = client.stats
    for label, summary in runs:
        print("\n".join(summary.lines(label)))
    print(
        f"requests {s.requests}, retries {s.retries}, failed {s.failures}; tokens {s.prompt_tokens} in + "
        f"{s.completion_tokens} out; estimated cost ${client.cost(args.price_input, args.price_output):.4f} "
        f"(at ${args.price_input}/${args.price_output} per 1M tokens)"
    )
    print(f"output: {args.out}; rejects: {rejects}")
    return max(summary.exit_code for _, summary in runs)


if __name__ == "__main__":
    sys.exit(run_main(main))

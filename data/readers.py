"""Readers for the public medical data sets, as they are published, into the schema.

    format          what it reads                                            records
    huatuo-sft      HuatuoGPT SFT data v1: JSONL {"data": ["问：…", "答：…"]}   conversations
    huatuo26m       Huatuo-26M: JSONL {"questions", "answers"} (str or list)  Q&A
    cmedqa2         a cMedQA2 directory: question.csv, answer.csv,            Q&A (gold answer)
                    {split}_candidates.txt
    webmedqa        webMedQA medQA.{train,valid,test}.txt: tab-separated      Q&A (gold answer)
                    department, label, qid, question, answer
    meddialog       MedDialog-CN raw text: id=, URL, Description, Dialogue    conversations
    kuake-qic       KUAKE-QIC / KUAKE-QIC_100.json: [{id, query, label}]      prompts (+ intent)
    med-dialog-100  HuatuoGPT's Med-dialog_100.json:                          prompts (+ case)
                    [{id, medical_case, doctor_diagnosis, Department}]
    schema          our own JSONL                                             as written
    pairs           our preference pairs JSONL                                pairs

Every reader takes (path, *, skip_bad, report, encoding) and yields checked records. A
malformed record raises RecordError naming file, line and field, unless skip_bad is set.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Callable, Iterator

from data.schema import (
    Report,
    RecordError,
    check_conversation,
    check_pair,
    check_prompt,
    from_huatuo,
    read_jsonl,
    text_lines,
)

KUAKE_QIC_LABELS = (
    "病情诊断",
    "病因分析",
    "治疗方案",
    "就医建议",
    "指标解读",
    "疾病表述",
    "后果表述",
    "注意事项",
    "功效作用",
    "医疗费用",
    "其他",
)


def _guard(records: Iterator, skip_bad: bool, report: Report | None):
    """Run a generator of (where, thunk) pairs, raising or skipping RecordErrors. A thunk that
    returns None left its record out on purpose (it said why in the report)."""
    for where, make in records:
        try:
            record = make()
            if record is not None:
                yield record
        except RecordError as e:
            if not skip_bad:
                raise
            (report if report is not None else Report()).skip(str(e).split(": ", 1)[-1], where)


def _qa(id: str, source: str, question, answer, where: str, meta: dict | None = None) -> dict:
    for field, value in (("question", question), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"{where}: {field} must be a non-empty string, found {value!r:.40}")
    return check_conversation(
        {
            "id": id,
            "source": source,
            "messages": [
                {"role": "user", "content": question.strip()},
                {"role": "assistant", "content": answer.strip()},
            ],
            "meta": meta or {},
        },
        where,
    )


def _json_lines(path, encoding):
    for n, line in text_lines(path, encoding):
        if line.strip():
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")


def _json_list(path, encoding, keys: tuple[str, ...]):
    """A JSON file holding a list of objects; yields (where, object) with the item's index."""
    text = "\n".join(line for _, line in text_lines(path, encoding))
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise RecordError(f"{path}: expected a JSON list of objects, found {type(items).__name__}")
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            yield where, RecordError(f"{where}: expected an object")
            continue
        absent = [k for k in keys if k not in item]
        yield where, (RecordError(f"{where}: missing field {absent[0]!r}") if absent else item)


def _raise_or(value):
    if isinstance(value, RecordError):
        raise value
    return value


def read_huatuo_sft(path, *, skip_bad=False, report=None, encoding="utf-8"):
    def records():
        for i, (where, obj) in enumerate(_json_lines(path, encoding)):
            yield (
                where,
                lambda w=where, o=obj, i=i: from_huatuo(_raise_or(o), w, id=f"{Path(path).stem}-{i}", report=report),
            )

    return _guard(records(), skip_bad, report)


def read_huatuo26m(path, *, skip_bad=False, report=None, encoding="utf-8"):
    """Huatuo-26M: `questions` and `answers` are strings in the test set, lists in some
    training parts (then the first of each is taken)."""

    def make(where, obj, i):
        obj = _raise_or(obj)
        if not isinstance(obj, dict):
            raise RecordError(f"{where}: expected a JSON object")
        q, a = obj.get("questions"), obj.get("answers")
        if q is None or a is None:
            raise RecordError(f"{where}: missing field {'questions' if q is None else 'answers'!r}")
        q, a = (v[0] if isinstance(v, list) and v else v for v in (q, a))
        return _qa(str(obj.get("id", f"{Path(path).stem}-{i}")), "huatuo26m", q, a, where)

    def records():
        for i, (where, obj) in enumerate(_json_lines(path, encoding)):
            yield where, lambda w=where, o=obj, i=i: make(w, o, i)

    return _guard(records(), skip_bad, report)


def _csv_rows(path: Path, encoding: str, columns: tuple[str, ...], delimiter=","):
    """Rows of a CSV/TSV file with a header naming at least `columns`, as (where, dict).

    Read as the published files are written: a quoted field may hold the delimiter and line
    breaks (csv's rules over the whole file, not line by line), and an unquoted delimiter in
    the last column, free text in every file read here, stays part of that text. `where` is
    the line a row starts on."""
    starts: list[int] = []  # the file's line number of each physical line csv has read

    def lines():
        for n, line in text_lines(path, encoding):
            starts.append(n)
            yield line + "\n"

    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise RecordError(f"{path}: empty file") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise RecordError(f"{path}:1: header lacks column {missing[0]!r} (found {header})")
    consumed = reader.line_num
    for row in reader:
        where = f"{path}:{starts[consumed]}"
        consumed = reader.line_num
        if not any(field.strip() for field in row):
            continue
        if len(row) < len(header):
            yield where, RecordError(f"{where}: expected {len(header)} fields ({', '.join(header)}), found {len(row)}")
            continue
        if len(row) > len(header):
            row = row[: len(header) - 1] + [delimiter.join(row[len(header) - 1 :])]
        yield where, dict(zip(header, row))


def read_cmedqa2(path, *, split="test", skip_bad=False, report=None, encoding="utf-8"):
    """cMedQA2: one Q&A per question of `{split}_candidates.txt` that has a gold answer.

    test/dev candidates: question_id, ans_id, cnt, label (label 1 = gold); train candidates:
    question_id, pos_ans_id, neg_ans_id. The first gold answer is the reference; all gold
    answer ids are kept in meta.
    """
    root = Path(path)
    errors: list[tuple[str, RecordError]] = []  # malformed lines, raised or skipped in order
    questions, answers = {}, {}
    for where, row in _csv_rows(root / "question.csv", encoding, ("question_id", "content")):
        if isinstance(row, RecordError):
            errors.append((where, row))
        else:
            questions[row["question_id"]] = row["content"]
    for where, row in _csv_rows(root / "answer.csv", encoding, ("ans_id", "question_id", "content")):
        if isinstance(row, RecordError):
            errors.append((where, row))
        else:
            answers[row["ans_id"]] = row["content"]
    cand = root / f"{split}_candidates.txt"
    header = next(text_lines(cand, encoding))[1].split(",")
    cols = ("question_id", "pos_ans_id") if "pos_ans_id" in header else ("question_id", "ans_id", "label")
    gold: dict[str, list[str]] = {}  # question_id -> gold ans_ids, in file order
    first_line: dict[str, str] = {}
    for where, row in _csv_rows(cand, encoding, cols):
        if isinstance(row, RecordError):
            errors.append((where, row))
            continue
        qid = row["question_id"]
        first_line.setdefault(qid, where)
        gold.setdefault(qid, [])
        if "pos_ans_id" in row or row["label"].strip() == "1":
            ans = row.get("pos_ans_id") or row["ans_id"]
            if ans not in gold[qid]:
                gold[qid].append(ans)

    def make(qid, ans_ids):
        where = first_line[qid]
        if qid not in questions:
            raise RecordError(f"{where}: question_id {qid} is not in question.csv")
        if not ans_ids:
            raise RecordError(f"{where}: question_id {qid} has no gold answer (label 1)")
        if ans_ids[0] not in answers:
            raise RecordError(f"{where}: ans_id {ans_ids[0]} is not in answer.csv")
        return _qa(f"cmedqa2-{qid}", "cmedqa2", questions[qid], answers[ans_ids[0]], where, {"gold_ans_ids": ans_ids})

    items = [(w, lambda e=e: _raise_or(e)) for w, e in errors]
    items += [(first_line[q], lambda q=q, a=a: make(q, a)) for q, a in gold.items()]
    return _guard(iter(items), skip_bad, report)


def read_webmedqa(path, *, skip_bad=False, report=None, encoding="utf-8"):
    """webMedQA: tab-separated department, label, qid, question, answer; one Q&A per qid with
    a gold answer (label 1). The answer is free text: tabs in it are kept."""
    seen_gold: set[str] = set()
    pending: dict[str, str] = {}

    def records():
        for n, line in text_lines(path, encoding):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            fields = line.split("\t", 4)  # a tab inside the answer, the last column, stays in it
            if len(fields) != 5:
                yield (
                    where,
                    lambda w=where, k=len(fields): _raise_or(
                        RecordError(
                            f"{w}: expected 5 tab-separated fields (department, label, qid, question, answer), found {k}"
                        )
                    ),
                )
                continue
            dept, label, qid, question, answer = fields
            pending.setdefault(qid, where)
            if label.strip() == "1" and qid not in seen_gold:
                seen_gold.add(qid)
                yield (
                    where,
                    lambda w=where, d=dept, q=qid, qu=question, a=answer: _qa(
                        f"webmedqa-{q}", "webmedqa", qu, a, w, {"department": d}
                    ),
                )
            elif label.strip() not in ("0", "1"):
                yield (
                    where,
                    lambda w=where, lab=label: _raise_or(RecordError(f"{w}: label must be 0 or 1, found {lab!r}")),
                )
        for qid, where in pending.items():
            if qid not in seen_gold and report is not None:
                report.note("question without a gold answer (label 1) left out", where)

    return _guard(records(), skip_bad, report)


_SPEAKER = re.compile(r"^\s*(病人|医生)\s*[:：]\s*(.*)$")
_FIELD = re.compile(r"^\s*([^:：\s][^:：]{0,40})[:：]\s*(.*)$")
_SECTIONS = ("Doctor faculty", "Description", "Dialogue", "Diagnosis and suggestions")


def read_meddialog(path, *, skip_bad=False, report=None, encoding="utf-8"):
    """MedDialog-CN raw text, as published. Each consultation:

        id=123
        https://www.haodf.com/…
        Doctor faculty        (the department, on the next line)
        Description           (fields such as 疾病：, 病情描述：, 希望获得的帮助：, value after or below)
        Dialogue              (病人：/医生： turns, text inline or on the following lines)
        Diagnosis and suggestions   (sometimes)

    A consultation can hold several Description/Dialogue sections (follow-up visits): all are
    kept, in order, as rounds of one conversation. Each Description is a patient turn (its
    fields as "name：value" lines), as the dataset authors' own processed release opens every
    dialogue with it, so a doctor who speaks first answers it. The "Diagnosis and suggestions"
    text goes into meta["diagnosis"] (distill.py conversations reads it). Both full-width and
    ASCII colons occur. Consecutive turns of one speaker are joined and a final patient turn
    that got no answer is dropped, each counted in the report. A consultation that no doctor
    answered at all, or that has a Description and no Dialogue (the published files hold both),
    is left out and counted, skip_bad or not; one with neither section is malformed. Ids are
    "meddialog-{file stem}-{id}": the raw ids restart in every file.
    """
    stem = Path(path).stem

    def blocks():
        block, start = [], 0
        for n, line in text_lines(path, encoding):
            if re.match(r"^id\s*=\s*\d+\s*$", line):
                if block:
                    yield start, block
                block, start = [line], n
            elif block:
                block.append(line)
            elif line.strip():
                yield n, [line]  # text before the first id=: reported as malformed
        if block:
            yield start, block

    def parse(start, lines):
        if not re.match(r"^id\s*=\s*\d+", lines[0]):
            raise RecordError(f"{path}:{start}: expected a line 'id=N' to start a consultation")
        ident = lines[0].split("=", 1)[1].strip()
        where = f"{path}:{start} (id={ident})"  # the reason after it names a kind, so skips group by kind
        url = next((line.strip() for line in lines[1:4] if line.strip().startswith("http")), "")
        sections: list[tuple[str, list[str]]] = []  # in order; a section may come back
        for line in lines[1:]:
            if line.strip() in _SECTIONS:
                sections.append((line.strip(), []))
            elif sections:
                sections[-1][1].append(line)
        names = [name for name, _ in sections]
        if "Dialogue" not in names:
            if "Description" not in names:
                raise RecordError(f"{where}: neither a 'Description' nor a 'Dialogue' section")
            # Published so: a patient's description that got no dialogue at all (74 of the 1,393
            # consultations of COVID-Dialogue's Chinese file, id=122 the first). Left out, counted.
            if report is not None:
                report.skip("a consultation with no dialogue (as published)", where)
            return None
        merged, descriptions, diagnosis = _meddialog_turns(sections, lambda what: _note(what, where))
        while merged and merged[0][0] == "医生":  # only with no Description at all
            merged.pop(0)
            _note("doctor turn before any patient text dropped", where)
        if merged and all(s == "病人" for s, _ in merged):
            # Published so: a consultation the doctor never answered (COVID-Dialogue's
            # Chinese file has some). Nothing to learn from, nothing malformed: left out, counted.
            if report is not None:
                report.skip("a consultation no doctor answered (as published)", where)
            return None
        if merged and merged[-1][0] == "病人":
            merged.pop()
            _note("final unanswered patient turn dropped", where)
        if not merged:
            raise RecordError(f"{where}: no patient turn answered by a doctor")
        if names.count("Dialogue") > 1:
            _note("several Description/Dialogue sections kept as rounds of one conversation", where)
        meta = {
            "url": url,
            "department": " ".join(
                line.strip() for name, body in sections if name == "Doctor faculty" for line in body if line.strip()
            ),
        }
        meta["description"] = descriptions[0] if descriptions else {}
        if diagnosis:
            meta["diagnosis"] = "\n".join(d for d in diagnosis if d)
        messages = [{"role": "user" if s == "病人" else "assistant", "content": t} for s, t in merged]
        return check_conversation(
            {"id": f"meddialog-{stem}-{ident}", "source": "meddialog", "messages": messages, "meta": meta}, where
        )

    def _note(what, where):
        if report is not None:
            report.note(what, where)

    return _guard(((f"{path}:{s}", lambda s=s, b=b: parse(s, b)) for s, b in blocks()), skip_bad, report)


def _meddialog_turns(sections: list, note) -> tuple[list, list, list]:
    """A MedDialog consultation's sections -> (its turns, consecutive ones of a speaker joined;
    each Description's fields; the Diagnosis texts). Each Description is a patient turn."""
    turns: list[list] = []
    descriptions, diagnosis = [], []
    for name, body in sections:
        if name == "Description":
            fields = _fields(body)
            descriptions.append(fields)
            text = "\n".join(f"{k}：{v}" for k, v in fields.items() if v) or " ".join(line.strip() for line in body)
            turns.append(["病人", [text]])
        elif name == "Dialogue":
            for line in body:
                m = _SPEAKER.match(line)
                if m:
                    turns.append([m.group(1), [m.group(2)] if m.group(2).strip() else []])
                elif line.strip() and turns:
                    turns[-1][1].append(line.strip())
        elif name == "Diagnosis and suggestions":
            diagnosis.append(" ".join(line.strip() for line in body if line.strip()))
    merged: list[tuple[str, str]] = []
    for speaker, text in turns:
        text = "".join(t.strip() for t in text)
        if not text:
            continue
        if merged and merged[-1][0] == speaker:
            merged[-1] = (speaker, merged[-1][1] + " " + text)
            note("consecutive turns of one speaker joined")
        else:
            merged.append((speaker, text))
    return merged, descriptions, diagnosis


def _fields(lines: list[str]) -> dict[str, str]:
    """'疾病：' / '病情描述（…）：' field lines, each value inline or on the lines below."""
    out: dict[str, str] = {}
    key = None
    for line in lines:
        m = _FIELD.match(line)
        if m and len(m.group(1)) <= 40 and not line.strip().startswith(("http", "id=")):
            key = re.sub(r"[（(].*?[)）]", "", m.group(1)).strip()
            out[key] = m.group(2).strip()
        elif key and line.strip():
            out[key] = (out[key] + " " + line.strip()).strip()
    return out


def read_kuake_qic(path, *, skip_bad=False, report=None, encoding="utf-8"):
    """KUAKE-QIC (and HuatuoGPT's KUAKE-QIC_100.json): [{id, query, label}] -> prompts."""

    def make(where, item):
        item = _raise_or(item)
        if item["label"] not in KUAKE_QIC_LABELS:
            raise RecordError(f"{where}: label {item['label']!r} is not one of the 11 KUAKE-QIC intents")
        return check_prompt(
            {
                "id": str(item["id"]),
                "source": "kuake-qic",
                "messages": [{"role": "user", "content": item["query"]}],
                "meta": {"label": item["label"]},
            },
            where,
        )

    return _guard(
        ((w, lambda w=w, i=i: make(w, i)) for w, i in _json_list(path, encoding, ("id", "query", "label"))),
        skip_bad,
        report,
    )


def read_med_dialog_100(path, *, skip_bad=False, report=None, encoding="utf-8"):
    """HuatuoGPT's Med-dialog_100.json: cases for the simulated-patient evaluation. The prompt
    is the medical case; the doctor's diagnosis and the department go to meta."""

    def make(where, item):
        item = _raise_or(item)
        return check_prompt(
            {
                "id": str(item["id"]),
                "source": "med-dialog-100",
                "messages": [{"role": "user", "content": item["medical_case"]}],
                "meta": {"doctor_diagnosis": item["doctor_diagnosis"], "department": item["Department"]},
            },
            where,
        )

    keys = ("id", "medical_case", "doctor_diagnosis", "Department")
    return _guard(((w, lambda w=w, i=i: make(w, i)) for w, i in _json_list(path, encoding, keys)), skip_bad, report)


def read_schema(path, *, skip_bad=False, report=None, encoding="utf-8"):
    """Our JSONL: conversations ending with an answer or prompts ending with a question."""
    return read_jsonl(
        path, lambda r, w: check_conversation(r, w, ending="any"), skip_bad=skip_bad, report=report, encoding=encoding
    )


def read_pairs(path, *, skip_bad=False, report=None, encoding="utf-8"):
    return read_jsonl(path, check_pair, skip_bad=skip_bad, report=report, encoding=encoding)


def _json_items(path, encoding, keys: tuple[str, ...]):
    """A JSON list of objects or JSON lines of objects (dumps of one data set come both ways)."""
    head = next((line for _, line in text_lines(path, encoding) if line.strip()), "")
    if head.lstrip().startswith("["):
        yield from _json_list(path, encoding, keys)
        return
    for where, obj in _json_lines(path, encoding):
        if not isinstance(obj, (dict, RecordError)):
            obj = RecordError(f"{where}: expected a JSON object")
        elif isinstance(obj, dict) and any(k not in obj for k in keys):
            obj = RecordError(f"{where}: missing field {next(k for k in keys if k not in obj)!r}")
        yield where, obj


def read_alpaca(path, *, skip_bad=False, report=None, encoding="utf-8"):
    """Alpaca-style instructions, the general-domain instruction data of paper App. E (Chinese
    Alpaca, Peng et al. 2023): {"instruction", "input", "output"} objects. The question is the
    instruction, then the input on a line of its own when there is one."""

    def make(where, item, i):
        item = _raise_or(item)
        for field in ("instruction", "input", "output"):
            if item.get(field) is not None and not isinstance(item[field], str):
                raise RecordError(f"{where}: field {field!r} must be a string")
        question = item["instruction"].strip() + (
            "\n" + item["input"].strip() if (item.get("input") or "").strip() else ""
        )
        return _qa(
            str(item.get("id", f"{Path(path).stem}-{i}")), "general_instruction", question, item["output"], where
        )

    items = _json_items(path, encoding, ("instruction", "output"))
    return _guard(((w, lambda w=w, it=it, i=i: make(w, it, i)) for i, (w, it) in enumerate(items)), skip_bad, report)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant"}


def read_sharegpt(path, *, skip_bad=False, report=None, encoding="utf-8"):
    """ShareGPT conversations, the general-domain conversation data of paper App. E:
    {"id", "conversations": [{"from": "human" | "gpt", "value"}, …]} objects. Turns of one
    speaker in a row are joined; system and empty turns, assistant turns before the first
    question and a last unanswered question are dropped; each is counted. The raw dumps
    (philschmid/sharegpt-raw) keep the web page's HTML in `value`: it is read as it is."""

    def note(what, where):
        if report is not None:
            report.note(what, where)

    def make(where, item, i):
        item = _raise_or(item)
        if not isinstance(item["conversations"], list):
            raise RecordError(f"{where}: field 'conversations' must be a list")
        messages: list[dict] = []
        for k, turn in enumerate(item["conversations"]):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise RecordError(f"{where}: conversations[{k}] must be an object with a string 'value'")
            speaker = str(turn.get("from", "")).lower()
            if speaker == "system" or not turn["value"].strip():
                note("system or empty turn dropped", where)
                continue
            if speaker not in SHAREGPT_ROLES:
                raise RecordError(f"{where}: conversations[{k}].from is {turn.get('from')!r}, expected human or gpt")
            role, text = SHAREGPT_ROLES[speaker], turn["value"].strip()
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + text
                note("consecutive turns of one speaker joined", where)
            else:
                messages.append({"role": role, "content": text})
        while messages and messages[0]["role"] == "assistant":
            messages.pop(0)
            note("assistant turn before the first question dropped", where)
        if messages and messages[-1]["role"] == "user":
            messages.pop()
            note("final unanswered question dropped", where)
        if not messages:
            raise RecordError(f"{where}: no question with an answer")
        return check_conversation(
            {
                "id": str(item.get("id", f"{Path(path).stem}-{i}")),
                "source": "general_conversation",
                "messages": messages,
                "meta": {},
            },
            where,
        )

    items = _json_items(path, encoding, ("conversations",))
    return _guard(((w, lambda w=w, it=it, i=i: make(w, it, i)) for i, (w, it) in enumerate(items)), skip_bad, report)


READERS: dict[str, Callable] = {
    "schema": read_schema,
    "pairs": read_pairs,
    "huatuo-sft": read_huatuo_sft,
    "huatuo26m": read_huatuo26m,
    "cmedqa2": read_cmedqa2,
    "webmedqa": read_webmedqa,
    "meddialog": read_meddialog,
    "kuake-qic": read_kuake_qic,
    "med-dialog-100": read_med_dialog_100,
    "alpaca": read_alpaca,
    "sharegpt": read_sharegpt,
}


def guess_format(path, encoding: str = "utf-8") -> str:
    """The format of a file or directory from its name and first line."""
    p = Path(path)
    if p.is_dir():
        if (p / "question.csv").is_file():
            return "cmedqa2"
        raise RecordError(f"{p}: a directory, but not cMedQA2 (no question.csv); name the format with --format")
    first = next((line for _, line in text_lines(p, encoding) if line.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        obj = None
    # Our own files first, whatever their name: what `convert` writes must always read back
    # (its output for KUAKE-QIC_100 is naturally called kuake_qic_100.jsonl).
    if isinstance(obj, dict) and "chosen" in obj:
        return "pairs"
    if isinstance(obj, dict) and "messages" in obj:
        return "schema"
    # Alpaca and ShareGPT dumps: JSON lines, or one JSON list whose first object is read here.
    item = obj[0] if isinstance(obj, list) and obj else obj
    if not isinstance(item, dict) and first.lstrip().startswith("["):
        head = "".join(line for _, (_, line) in zip(range(200), text_lines(p, encoding)))
        item = {k: None for k in re.findall(r'"(conversations|instruction|output)"\s*:', head)}
    if isinstance(item, dict) and "conversations" in item:
        return "sharegpt"
    if isinstance(item, dict) and "instruction" in item and "output" in item:
        return "alpaca"
    name = p.name.lower()
    if name.startswith("medqa.") and name.endswith(".txt"):
        return "webmedqa"
    if "med-dialog" in name or "med_dialog" in name:
        return "med-dialog-100"
    if "kuake-qic" in name or "kuake_qic" in name:
        return "kuake-qic"
    if name.endswith(".txt") and first.startswith("id"):
        return "meddialog"
    if isinstance(obj, dict):
        if "data" in obj:
            return "huatuo-sft"
        if "questions" in obj:
            return "huatuo26m"
    raise RecordError(f"{p}: cannot tell the format from the first line; name it with --format")


def add_input_args(p, *, formats: bool = True):
    """--format and --encoding, for every command that reads data files."""
    if formats:
        p.add_argument("--format", choices=sorted(READERS), help="the input files' format (default: guessed per file)")
    p.add_argument(
        "--encoding", default="utf-8", help="the input files' text encoding (Chinese data sets are sometimes gbk)"
    )


def read(path, fmt: str | None = None, **kw) -> Iterator[dict]:
    fmt = fmt or guess_format(path, kw.get("encoding", "utf-8"))
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(READERS)}")
    return READERS[fmt](path, **kw)

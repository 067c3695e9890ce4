"""One record format for every conversation, and its JSONL files.

A conversation (all four SFT sources of the paper's Table 3, evaluation prompts, RM prompts):

    {"id": "dq-0001", "source": "real_instruction",
     "messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}, …],
     "meta": {…}}                                  # optional: department, diagnosis, label, …

Roles alternate, starting with the user. Training data ends with an assistant turn; a prompt
(for sampling or evaluation) ends with a user turn. A preference pair for the reward model is
a prompt plus two candidate replies: {"id", "source", "messages", "chosen", "rejected", "meta"}.

Every reader here checks each record and stops at the first bad one, naming the file, line and
field; with skip_bad=True it skips such records instead and counts them in a Report, which the
caller prints. Nothing is dropped silently. (What a command's outputs are checked against, and
how its errors end, is safety.py's: claim_output, refuse_to_replace, run_main.)
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

from safety import RecordError  # the one error a user's bad record ends in (safety.run_main prints it)

ROLES = ("user", "assistant")
# The paper's four SFT parts (§3.1, Table 3); free-form names are allowed for other sources.
SFT_SOURCES = ("distilled_instruction", "real_instruction", "distilled_conversation", "real_conversation")


class Report:
    """What readers skipped or changed, with reasons, for the summary a user reads."""

    def __init__(self):
        self.skipped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, where: str):
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)

    def note(self, what: str, where: str = ""):
        self.notes[what] += 1
        self.examples.setdefault(what, where)

    def __bool__(self):
        return bool(self.skipped or self.notes)

    def summary(self) -> str:
        lines = [f"skipped {n} record(s): {r} (first at {self.examples[r]})" for r, n in self.skipped.items()]
        lines += [f"{n} x {w} (first at {self.examples[w]})" for w, n in self.notes.items()]
        return "\n".join(lines)


def check_messages(messages, where: str, ending: str = "assistant") -> list[dict]:
    """Validate alternating user/assistant messages; ending is 'assistant', 'user' or 'any'."""
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise RecordError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        expected = ROLES[i % 2]
        if m["role"] != expected:
            raise RecordError(
                f"{where}: messages[{i}].role is {m['role']!r}, expected {expected!r} (turns alternate, user first)"
            )
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise RecordError(f"{where}: messages[{i}].content must be a non-empty string")
        try:
            m["content"].encode("utf-8")  # a JSON "\ud800" is a lone surrogate, which no tokenizer takes
        except UnicodeEncodeError as e:
            raise RecordError(
                f"{where}: messages[{i}].content is not valid Unicode text (a lone surrogate at character {e.start})"
            ) from None
    last = messages[-1]["role"]
    if ending != "any" and last != ending:
        raise RecordError(f"{where}: the last message is from the {last}, expected the {ending}")
    return messages


def check_conversation(record, where: str, ending: str = "assistant") -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, found {type(record).__name__}")
    for field in ("id", "source"):
        if not isinstance(record.get(field), str) or not record[field]:
            raise RecordError(f"{where}: field {field!r} must be a non-empty string")
    check_messages(record.get("messages"), where, ending)
    if not isinstance(record.get("meta", {}), dict):
        raise RecordError(f"{where}: field 'meta' must be an object")
    return record


def check_prompt(record, where: str) -> dict:
    return check_conversation(record, where, ending="user")


def check_pair(record, where: str) -> dict:
    """A preference pair: a prompt (history + question) and a chosen and a rejected reply."""
    check_conversation(record, where, ending="user")
    for field in ("chosen", "rejected"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise RecordError(f"{where}: field {field!r} must be a non-empty string")
    if record["chosen"] == record["rejected"]:
        raise RecordError(f"{where}: 'chosen' and 'rejected' are the same text")
    return record


def text_lines(
    path: str | os.PathLike, encoding: str = "utf-8", on_bad_line: Callable[[RecordError], None] | None = None
) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file; a BOM is dropped. A line that is not valid in
    `encoding` is named, with the byte of that line where it goes wrong: an error, or given to
    on_bad_line (a reader's --skip-bad) and passed over. Lines are split and decoded one by one
    (a decoder fed blocks would name the block's byte and a line before the bad one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    utf8 = encoding.lower().replace("_", "-") in ("utf-8", "utf8")
    hint = " (Chinese data sets are sometimes GBK: try --encoding gbk)" if utf8 else ""
    if "\n".encode("utf-8" if utf8 else encoding) != b"\n":  # UTF-16 and the like: no line split on b"\n"
        with open(path, encoding=encoding, newline="") as f:
            yield from ((n, line.rstrip("\r\n")) for n, line in enumerate(f, start=1))
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if utf8 and n == 1 else "utf-8" if utf8 else encoding)
            except UnicodeDecodeError as e:
                error = RecordError(
                    f"{path}:{n}: not valid {encoding}: {e.reason} at byte {e.start + 1} of the line{hint}"
                )
                if on_bad_line is None:
                    raise error from None
                on_bad_line(error)
                continue
            yield n, line.rstrip("\r\n")


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    return "\n".join(line for _, line in text_lines(path, encoding))


def read_jsonl(
    path,
    check: Callable = check_conversation,
    *,
    skip_bad: bool = False,
    report: Report | None = None,
    encoding: str = "utf-8",
) -> Iterator[dict]:
    """Yield the checked records of a JSONL file; blank lines are allowed."""

    def bad_line(e: RecordError):
        if not skip_bad:
            raise e
        (report if report is not None else Report()).skip(str(e).split(": ", 1)[1], str(e).split(": ", 1)[0])

    for n, line in text_lines(path, encoding, bad_line):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield check(record, where)
        except RecordError as e:
            if not skip_bad:
                raise
            (report if report is not None else Report()).skip(str(e).split(": ", 1)[1], where)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], if_empty: str | None = None) -> int:
    """Write records atomically (a temporary file renamed into place); returns the count. With
    `if_empty`, no record is a RecordError with that message, and an existing file stays. An
    error writing names `path`, the file the user asked for, not the temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        if n == 0 and if_empty:
            raise RecordError(if_empty)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename == str(tmp):
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return n


def finished_ids(*paths: Path) -> set[str]:
    """Ids already written. A last line cut short by a crash is removed (its job reruns)."""
    done: set[str] = set()
    for path in paths:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:  # drop the partial last line
                f.truncate(data.rfind(b"\n") + 1)
            data = data[: data.rfind(b"\n") + 1]
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                done.add(rec.get("job", rec["id"]))  # "job": a record that is one of several from a job
    return done


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSONL file this project wrote (predictions, judgments), unchecked but
    for being JSON objects: a bad line is a RecordError naming the file and line."""
    return list(read_jsonl(path, _an_object))


def _an_object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object")
    return record


# -- the released HuatuoGPT SFT layout: {"data": ["问：…", "答：…", "问：…", …]} ------------------

_Q = re.compile(r"^\s*问\s*[:：]\s*")
_A = re.compile(r"^\s*答\s*[:：]\s*")


def to_huatuo(record: dict) -> dict:
    """Our record -> one line of the HuatuoGPT SFT data (a trailing user turn is not kept)."""
    msgs = record["messages"]
    msgs = msgs[: len(msgs) - len(msgs) % 2]
    return {"data": [("问：" if m["role"] == "user" else "答：") + m["content"] for m in msgs]}


def from_huatuo(obj, where: str, *, id: str, source: str = "huatuo_sft", report: Report | None = None) -> dict:
    """One HuatuoGPT SFT line -> our record; an odd trailing turn is dropped and reported."""
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise RecordError(f"{where}: field 'data' must be a list of strings")
    turns = obj["data"]
    if len(turns) % 2:
        turns = turns[:-1]
        if report is not None:
            report.note("odd trailing turn dropped", where)
    if not turns:
        raise RecordError(f"{where}: field 'data' holds no complete question and answer")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise RecordError(f"{where}: data[{i}] must be a string")
        prefix = _Q if i % 2 == 0 else _A
        messages.append({"role": ROLES[i % 2], "content": prefix.sub("", turn, count=1)})
    return check_conversation({"id": id, "source": source, "messages": messages}, where)

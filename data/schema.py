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
caller prints. Nothing is dropped silently.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

ROLES = ("user", "assistant")
# The paper's four SFT parts (§3.1, Table 3); free-form names are allowed for other sources.
SFT_SOURCES = ("distilled_instruction", "real_instruction", "distilled_conversation", "real_conversation")


class RecordError(ValueError):
    """A record that does not fit its format; the message names the file, line and field."""

    for_the_user = True  # run_main prints it as one line


def run_main(main: Callable, argv: list[str] | None = None) -> int:
    """A command line's main(argv), with a user's mistake ending as one line on stderr,
    `error: …`, and exit status 2 instead of a traceback: a bad record or a refused output
    (RecordError), a refusal (SystemExit with a message), a missing file, a full or read-only
    disk. Anything else is a bug and keeps its traceback."""
    try:
        return main(argv) or 0
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    except ValueError as e:  # RecordError, model.CheckpointError: what the user gave, named
        if not getattr(e, "for_the_user", False):
            raise
        message = str(e)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        message = f"{e.filename}: {e.strerror.lower()}" if e.filename else str(e)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise
        message = (f"{e.filename or 'writing'}: {errno.errorcode[e.errno]}, {e.strerror}; nothing written before "
                   "was removed: free space or give a writable path, then rerun (trainers: add --resume)")
    print(f"error: {message}", file=sys.stderr)
    return 2


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
            raise RecordError(f"{where}: messages[{i}].role is {m['role']!r}, expected {expected!r} (turns alternate, user first)")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise RecordError(f"{where}: messages[{i}].content must be a non-empty string")
        try:
            m["content"].encode("utf-8")  # a JSON "\ud800" is a lone surrogate, which no tokenizer takes
        except UnicodeEncodeError as e:
            raise RecordError(f"{where}: messages[{i}].content is not valid Unicode text (a lone surrogate at "
                              f"character {e.start})") from None
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


def text_lines(path: str | os.PathLike, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file; a BOM is dropped, a wrong encoding named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    n = 0
    with open(path, encoding=codec, newline="") as f:
        try:
            for n, line in enumerate(f, start=1):
                yield n, line.rstrip("\r\n")
        except UnicodeDecodeError as e:
            hint = " (Chinese data sets are sometimes GBK: try --encoding gbk)" if codec == "utf-8-sig" else ""
            raise RecordError(f"{path}:{n + 1}: not valid {encoding}: {e.reason} at byte {e.start}{hint}") from None


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    return "\n".join(line for _, line in text_lines(path, encoding))


def read_jsonl(path, check: Callable = check_conversation, *, skip_bad: bool = False,
               report: Report | None = None, encoding: str = "utf-8") -> Iterator[dict]:
    """Yield the checked records of a JSONL file; blank lines are allowed."""
    for n, line in text_lines(path, encoding):
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


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records atomically (a temporary file renamed into place); returns the count."""
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
        os.replace(tmp, path)
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


# -- outputs a command replaces ------------------------------------------------------------------


def refuse_to_replace(where: Path, names: list[str], *, overwrite: bool, what: str = "output",
                      resume: bool = False) -> list[str]:
    """The one rule for outputs a command would replace, the trainers', the converters' and the
    main job's alike: when any of `names` exists in `where`, refuse, naming them, unless
    --overwrite; with it, say what is replaced. (Outputs that resume, such as distill.py's, are
    continued instead, see claim_output.) Returns the names that exist."""
    earlier = [n for n in names if (Path(where) / n).exists()]
    if earlier and not overwrite:
        how = "add --resume to continue it, or --overwrite to start over there" if resume else \
            "add --overwrite to replace it"
        raise SystemExit(f"{where} holds an earlier {what} ({', '.join(earlier)}): {how}, or choose another --out")
    if earlier:
        print(f"--overwrite: replacing {', '.join(earlier)} in {where}", flush=True)
    return earlier


# -- what produced a resumable output --------------------------------------------------------------


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def model_digest(path: str | os.PathLike) -> str:
    """A fingerprint of an HF-format model directory, cheap at any size: config.json,
    tokenizer.model, and of every weight file its size, its header (tensor names, shapes,
    offsets) and 1 MiB from its middle and its end. Two trainings' weights differ there."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.model"):
        if (path / name).is_file():
            h.update(name.encode() + (path / name).read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for start in (0, size // 2, max(0, size - (1 << 20))):
                fh.seek(start)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def setup_record(out: str | os.PathLike) -> Path:
    """Where claim_output records what produced `out`: OUT.setup.json beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".setup.json")


def claim_output(out: str | os.PathLike, setup: dict, info: dict | None = None) -> Path:
    """Make sure resumable output `out` is this setup's: a file beside it (OUT.setup.json)
    records what produced it — `setup` (fingerprints and settings that change the records)
    and `info` (paths, labels: shown, not compared). A rerun with another setup is refused
    with the differences named, so one model's records are never continued, or counted, as
    another's. An output that holds nothing yet takes the new setup. Returns the record's path."""
    out = Path(out)
    record = setup_record(out)
    setup = json.loads(json.dumps(setup))  # as it will read back
    beside = [out, *out.parent.glob(f"{glob.escape(out.stem)}.*.jsonl")]  # its rejects, a first stage's records
    holds = any(p.exists() and (any(p.iterdir()) if p.is_dir() else p.stat().st_size > 0) for p in beside)
    if holds and record.is_file():
        before = json.loads(record.read_text(encoding="utf-8"))["setup"]
        diff = [f"{k}: {before.get(k)!r} -> {setup.get(k)!r}" for k in sorted(set(before) | set(setup))
                if before.get(k) != setup.get(k)]
        if diff:
            raise RecordError(f"{out} holds the output of another setup ({'; '.join(diff)}): write to another "
                              f"--out, or delete {out} and the files beside it named {out.stem}.* to start over")
    elif holds:
        raise RecordError(f"{out} exists but says nothing of what produced it (no {record.name}): write to "
                          f"another --out, or delete it to start over")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"setup": setup, "info": info or {}}, ensure_ascii=False, indent=1) + "\n",
                   encoding="utf-8")
    os.replace(tmp, record)
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

"""The OpenAI Chat Completions client and the resumable job runner that distill.py and
evaluate.py's judge share.

ChatClient   POST {base_url}/chat/completions with `requests`; any OpenAI-compatible server
             (vLLM, llama.cpp, ...) works through --base-url. Retries 429, 5xx, timeouts,
             connection errors and truncated bodies with exponential backoff and full jitter,
             honouring Retry-After, for a bounded number of attempts; other 4xx fail at once.
             --timeout bounds a whole request, a body that trickles in included. The key comes
             only from OPENAI_API_KEY and is never printed, logged or written, not even in part.
run_jobs     runs jobs on a thread pool and appends one JSON line per finished job to the
             output, or to the rejects file when the reply's content made the job fail for
             good (unparseable, wrong shape). A job the transport failed (retries exhausted,
             a 4xx) is written nowhere and runs again next time; a 401/403, or a run of
             failures in a row, stops the run at once. A rerun after a crash, Ctrl-C or
             SIGKILL skips every id already in either file: no duplicates, nothing lost.
prompt / fill  the paper's prompts, read verbatim from data/prompts/, placeholders replaced;
             dialogue_text shows a conversation to them.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import os
import random
import re
import sys
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import requests
from tqdm import tqdm

from data.schema import finished_ids

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts"
OPENAI_BASE_URL = "https://api.openai.com/v1"
# Prices used for the cost estimate, USD per million tokens: OpenAI's list price for
# gpt-3.5-turbo-0125 (the paper used ChatGPT). Pass --price-input/--price-output for others.
PRICE_INPUT, PRICE_OUTPUT = 0.5, 1.5


# The paper's simulated consultations (App. A.2): the patient ends the consultation with 再见.
GOODBYE = "再见"
PATIENT, DOCTOR = "病人", "医生"


def dialogue_text(messages: list[dict]) -> str:
    """'病人：…' / '医生：…', one turn a line: how conversations are shown to the API."""
    return "\n".join(f"{PATIENT if m['role'] == 'user' else DOCTOR}：{m['content']}" for m in messages)


def prompt(name: str) -> str:
    """A prompt file of data/prompts/, exactly as stored."""
    return (PROMPTS / f"{name}.txt").read_text(encoding="utf-8")


def fill(template: str, **values: str) -> str:
    """Replace the paper's placeholders (`${name}`, `{name}` or `[name]`, spelled as in the
    paper) by exact string replacement; a placeholder that is missing is an error."""
    for key, value in values.items():
        for spelling in ("${%s}" % key, "{%s}" % key, "[%s]" % key):
            if spelling in template:
                template = template.replace(spelling, value)
                break
        else:
            raise KeyError(f"the prompt has no placeholder {key!r}")
    return template


class APIError(RuntimeError):
    """A request the transport failed: retries exhausted, or a status retrying will not mend
    (400, 404, ...). Says nothing about the item: a later run tries it again."""


class FatalAPIError(APIError):
    """A failure every other request would meet as well (no key, 401, 403): stop the run."""


class Reject(Exception):
    """A reply that cannot be used (unparseable, wrong shape); recorded with its reason."""


@dataclass
class Reply:
    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Stats:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


class ChatClient:
    def __init__(
        self,
        base_url: str = OPENAI_BASE_URL,
        model: str = "gpt-3.5-turbo",
        *,
        timeout: float = 120.0,
        max_attempts: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        **sampling,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.sampling = model, timeout, sampling
        self.max_attempts, self.backoff, self.max_backoff = max_attempts, backoff, max_backoff
        self._key = os.environ.get("OPENAI_API_KEY", "")
        if not self._key and base_url.rstrip("/") == OPENAI_BASE_URL:
            raise FatalAPIError(
                "OPENAI_API_KEY is not set (it is needed for the OpenAI API; a local "
                "OpenAI-compatible server given by --base-url may not need one)"
            )
        url = urllib.parse.urlsplit(self.url)
        if self._key and url.scheme == "http" and not is_loopback(url.hostname or ""):
            print(
                f"warning: OPENAI_API_KEY will be sent unencrypted (plain http) to {url.hostname}; "
                "use https, or unset the key if that server needs none",
                file=sys.stderr,
            )
        self.stats = Stats()
        self._local = threading.local()  # one requests.Session per worker thread

    def __repr__(self):  # never show the key
        return f"ChatClient({self.url!r}, model={self.model!r})"

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _redact(self, text: str) -> str:
        return redact(text, self._key)

    def chat(self, messages: list[dict], **overrides) -> Reply:
        body = {"model": self.model, "messages": messages, **self.sampling, **overrides}
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        last = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            self.stats.add(requests=1)
            wait_for = None
            try:
                status, reply_headers, data = self._post(body, headers)
            except (requests.Timeout, requests.ConnectionError, _BodyTimeout) as e:
                last = f"{type(e).__name__}"
            else:
                if status == 200:
                    try:
                        data = json.loads(data)
                        content = data["choices"][0]["message"]["content"]
                        usage = data.get("usage") or {}
                        self.stats.add(
                            prompt_tokens=usage.get("prompt_tokens", 0),
                            completion_tokens=usage.get("completion_tokens", 0),
                        )
                        return Reply(content or "", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                    except (ValueError, KeyError, IndexError, TypeError):
                        last = f"a malformed or truncated response body ({len(data)} bytes)"
                elif status == 429 or status >= 500:
                    last = f"HTTP {status}"
                    wait_for = retry_after(reply_headers.get("Retry-After"))
                else:  # retrying will not help; 401/403 will fail for every other item too
                    self.stats.add(failures=1)
                    text = self._redact(f"{self.url}: HTTP {status}: {data[:300].decode('utf-8', 'replace')}")
                    if status in (401, 403):
                        raise FatalAPIError(text + " (check OPENAI_API_KEY and --base-url)")
                    raise APIError(text)
            if attempt == self.max_attempts:
                break
            self.stats.add(retries=1)
            if wait_for is None:  # exponential backoff with full jitter
                wait_for = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            time.sleep(min(wait_for, self.max_backoff))
        self.stats.add(failures=1)
        raise APIError(f"{self.url}: gave up after {self.max_attempts} attempts; last: {last}")

    def _post(self, body: dict, headers: dict) -> tuple[int, dict, bytes]:
        """One request; its whole time is bounded by self.timeout (plus at most one socket read
        of that length): `requests`' timeout alone bounds each read, so a server that sends a
        byte a second would never time out."""
        deadline = time.monotonic() + self.timeout
        with self._session().post(self.url, json=body, headers=headers, timeout=self.timeout, stream=True) as r:
            read = getattr(r.raw, "read1", None)  # returns what has arrived (urllib3 >= 2)
            chunks = []
            while True:
                if time.monotonic() > deadline:
                    raise _BodyTimeout(f"the reply took longer than {self.timeout:g} s")
                try:
                    chunk = read(65536, decode_content=True) if read else r.raw.read(1024, decode_content=True)
                except Exception as e:  # a read timeout or a connection cut mid-body
                    raise requests.ConnectionError(f"reading the reply failed ({type(e).__name__})") from None
                if not chunk:
                    return r.status_code, r.headers, b"".join(chunks)
                chunks.append(chunk)

    def cost(self, price_input: float = PRICE_INPUT, price_output: float = PRICE_OUTPUT) -> float:
        return (self.stats.prompt_tokens * price_input + self.stats.completion_tokens * price_output) / 1e6


class _BodyTimeout(Exception):
    pass


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date; None
    (use the backoff) for anything else."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_KEYISH = re.compile(r"[A-Za-z0-9_\-]+(?:(?:\*+|\.{3}|…)[A-Za-z0-9_\-]*)*")


def redact(text: str, key: str) -> str:
    """`text` with the key, and any echo of a part of it, replaced by [OPENAI_API_KEY]. Servers
    that refuse a key often echo it shortened ("sk-proj-abcd****wxyz"): a key-like word that
    begins with the key's first 8 characters or ends with its last 4 is redacted whole."""
    if not key:
        return text
    text = text.replace(key, "[OPENAI_API_KEY]")
    head, tail = key[:8], key[-4:]

    def hide(m):
        word = m.group(0)
        shown = word.replace("…", "").replace("...", "").replace("*", "")
        if len(shown) >= 4 and (word.startswith(head) or (len(word) > 4 and word.endswith(tail))):
            return "[OPENAI_API_KEY]"
        return word

    return _KEYISH.sub(hide, text) if len(key) >= 12 else text


# -- resumable jobs ----------------------------------------------------------------------------


@dataclass
class Summary:
    done: int = 0  # jobs that ended this run: written or rejected
    written: int = 0  # records written (a job may make several)
    rejected: int = 0  # jobs whose reply's content failed them: final, in the rejects file
    failed: int = 0  # jobs the transport failed: not recorded, tried again next run
    skipped: int = 0  # jobs already finished by an earlier run
    left: int = 0  # jobs still to do after this run (failed, never started, beyond --limit)
    stopped: str = ""  # why the run stopped early, if it did
    fatal: bool = False  # stopped by a failure every request meets (401, 403)
    reasons: dict = field(default_factory=dict)  # reject reason -> count
    failures: dict = field(default_factory=dict)  # transport failure -> count

    def reject(self, reason: str):
        """A job's reply failed it (final): counted under the reason's category."""
        self.rejected += 1
        category = reason.split(":", 1)[0][:80]  # the reason's category, before the details
        self.reasons[category] = self.reasons.get(category, 0) + 1

    def fail(self, reason: str, fatal: bool, in_a_row: int, limit: int) -> bool:
        """The transport failed a job (left for the next run) -> whether the run stops here: at
        a fatal failure or at `limit` failures in a row, the first such failure giving the reason."""
        self.failed += 1
        self.failures[reason[:200]] = self.failures.get(reason[:200], 0) + 1
        if self.stopped or not (fatal or in_a_row >= limit):
            return False
        self.fatal = fatal
        self.stopped = reason if fatal else f"{in_a_row} requests in a row failed; the last: {reason}"
        return True

    def lines(self, label: str, noun: str = "records") -> list[str]:
        """What a command prints about one run of jobs."""
        out = [
            f"{label}: {self.done} done ({self.written} {noun} written, {self.rejected} rejected), "
            f"{self.skipped} already finished"
        ]
        out += [f"  rejected {n} x {reason}" for reason, n in self.reasons.items()]
        out += [f"  failed {n} x {reason}" for reason, n in self.failures.items()]
        if self.stopped:
            out.append(f"  stopped early: {self.stopped}")
        if self.left:
            out.append(
                f"  {self.left} item(s) left to do"
                + (" (the API failed them; nothing was recorded for them)" if self.failed else "")
                + ": run the same command again to do them"
            )
        return out

    @property
    def exit_code(self) -> int:
        """0: every job ended; 1: some were left because the transport failed them; 2: the API
        refused us (a wrong key, no access): a user error."""
        return 2 if self.fatal else 1 if self.failed or self.stopped else 0


def append_lines(f, records: list[dict]):
    """Append `records` to the open file `f`, a JSON line each, and flush: a run stopped at any
    point leaves whole lines."""
    for rec in records:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()


def run_jobs(
    jobs: Iterable[tuple[str, object]],
    work: Callable,
    out: Path,
    rejects: Path,
    *,
    workers: int = 4,
    limit: int | None = None,
    desc: str = "jobs",
    max_failures_in_a_row: int = 10,
) -> Summary:
    """Run work(payload) -> list of records for every (id, payload) not finished yet; each
    record has the job's id as "id" or, when a job makes several records, as "job". Records
    are appended to `out`; a Reject is appended to `rejects` as {"id", "reason"} (final: the
    content decided). An APIError is counted and the job left for the next run. A
    FatalAPIError, or max_failures_in_a_row APIErrors with nothing in between (an outage, a
    bad parameter), stops the run: no new job starts, those running finish and are kept.
    Only the main thread writes, one whole line at a time, flushed."""
    out, rejects = Path(out), Path(rejects)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(out, rejects)
    summary = Summary()
    todo = []
    for job_id, payload in jobs:
        if job_id in done:
            summary.skipped += 1
        else:
            todo.append((job_id, payload))
    summary.left = len(todo)
    todo = todo[:limit] if limit is not None else todo
    if not todo:
        return summary

    def call(payload):
        try:
            return "ok", work(payload)
        except Reject as e:
            return "reject", str(e)
        except FatalAPIError as e:
            return "fatal", str(e)
        except APIError as e:
            return "failed", str(e)

    in_a_row = 0
    with (
        open(out, "a", encoding="utf-8") as fo,
        open(rejects, "a", encoding="utf-8") as fr,
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(todo), desc=desc) as bar,
    ):
        pending, queue = {}, iter(todo)
        try:
            while True:
                while not summary.stopped and len(pending) < 2 * workers:  # a bounded window
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    pending[pool.submit(call, nxt[1])] = nxt[0]
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job_id = pending.pop(fut)
                    if fut.cancelled():
                        continue
                    kind, result = fut.result()
                    if kind in ("fatal", "failed"):  # left for the next run
                        in_a_row += 1
                        if summary.fail(result, kind == "fatal", in_a_row, max_failures_in_a_row):
                            for f in pending:  # the running ones finish and are kept
                                f.cancel()
                    else:
                        if kind == "ok":
                            append_lines(fo, result)
                            summary.written += len(result)
                        else:
                            append_lines(fr, [{"id": job_id, "reason": result}])
                            summary.reject(result)
                        in_a_row = 0
                        summary.done += 1
                        summary.left -= 1
                    bar.update(1)
        except KeyboardInterrupt:
            for fut in pending:
                fut.cancel()
            raise
    return summary

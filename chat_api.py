"""The OpenAI Chat Completions client and the resumable job runner that distill.py and
evaluate.py's judge share.

ChatClient   POST {base_url}/chat/completions with `requests`; any OpenAI-compatible server
             (vLLM, llama.cpp, ...) works through --base-url. Retries 429, 5xx, timeouts,
             connection errors and truncated bodies with exponential backoff and full jitter,
             honouring Retry-After, for a bounded number of attempts; other 4xx fail at once.
             The key comes only from OPENAI_API_KEY and is never printed, logged or written.
run_jobs     runs jobs on a thread pool and appends one JSON line per finished job to the
             output (or, with the reason, to the rejects file). A rerun after a crash, Ctrl-C
             or SIGKILL skips every id already in either file: no duplicates, nothing lost.
prompt / fill  the paper's prompts, read verbatim from data/prompts/, placeholders replaced;
             dialogue_text shows a conversation to them.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
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
    """A request that failed for good: a non-retryable status, or retries exhausted."""


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
    def __init__(self, base_url: str = OPENAI_BASE_URL, model: str = "gpt-3.5-turbo", *, timeout: float = 120.0,
                 max_attempts: int = 6, backoff: float = 1.0, max_backoff: float = 60.0, **sampling):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.sampling = model, timeout, sampling
        self.max_attempts, self.backoff, self.max_backoff = max_attempts, backoff, max_backoff
        self._key = os.environ.get("OPENAI_API_KEY", "")
        if not self._key and base_url.rstrip("/") == OPENAI_BASE_URL:
            raise APIError("OPENAI_API_KEY is not set (it is needed for the OpenAI API; a local "
                           "OpenAI-compatible server given by --base-url may not need one)")
        self.stats = Stats()
        self._local = threading.local()  # one requests.Session per worker thread

    def __repr__(self):  # never show the key
        return f"ChatClient({self.url!r}, model={self.model!r})"

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[OPENAI_API_KEY]") if self._key else text

    def chat(self, messages: list[dict], **overrides) -> Reply:
        body = {"model": self.model, "messages": messages, **self.sampling, **overrides}
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        last = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            self.stats.add(requests=1)
            wait_for = None
            try:
                r = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as e:
                last = f"{type(e).__name__}"
            else:
                if r.status_code == 200:
                    try:
                        data = r.json()
                        content = data["choices"][0]["message"]["content"]
                        usage = data.get("usage") or {}
                        self.stats.add(prompt_tokens=usage.get("prompt_tokens", 0),
                                       completion_tokens=usage.get("completion_tokens", 0))
                        return Reply(content or "", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                    except (ValueError, KeyError, IndexError, TypeError):
                        last = f"a malformed or truncated response body ({len(r.content)} bytes)"
                elif r.status_code == 429 or r.status_code >= 500:
                    last = f"HTTP {r.status_code}"
                    wait_for = retry_after(r.headers.get("Retry-After"))
                else:  # 400, 401, 404...: retrying will not help
                    self.stats.add(failures=1)
                    raise APIError(self._redact(f"{self.url}: HTTP {r.status_code}: {r.text[:300]}"))
            if attempt == self.max_attempts:
                break
            self.stats.add(retries=1)
            if wait_for is None:  # exponential backoff with full jitter
                wait_for = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            time.sleep(min(wait_for, self.max_backoff))
        self.stats.add(failures=1)
        raise APIError(f"{self.url}: gave up after {self.max_attempts} attempts; last: {last}")

    def cost(self, price_input: float = PRICE_INPUT, price_output: float = PRICE_OUTPUT) -> float:
        return (self.stats.prompt_tokens * price_input + self.stats.completion_tokens * price_output) / 1e6


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


# -- resumable jobs ----------------------------------------------------------------------------


@dataclass
class Summary:
    done: int = 0
    written: int = 0
    rejected: int = 0
    skipped: int = 0
    reasons: dict = field(default_factory=dict)


def run_jobs(jobs: Iterable[tuple[str, object]], work: Callable, out: Path, rejects: Path, *, workers: int = 4,
             limit: int | None = None, desc: str = "jobs") -> Summary:
    """Run work(payload) -> list of records for every (id, payload) not finished yet; each
    record has the job's id as "id" or, when a job makes several records, as "job". Records
    are appended to `out`; a Reject or APIError is appended to `rejects` as {"id", "reason"}.
    Only the main thread writes, one whole line at a time, flushed."""
    out, rejects = Path(out), Path(rejects)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(out, rejects)
    summary = Summary()
    todo = []
    for job_id, payload in jobs:
        if job_id in done:
            summary.skipped += 1
        elif limit is None or len(todo) < limit:
            todo.append((job_id, payload))
    if not todo:
        return summary

    def call(payload):
        try:
            return "ok", work(payload)
        except Reject as e:
            return "reject", str(e)
        except APIError as e:
            return "reject", f"API error: {e}"

    with open(out, "a", encoding="utf-8") as fo, open(rejects, "a", encoding="utf-8") as fr, \
            ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(todo), desc=desc) as bar:
        pending, queue = {}, iter(todo)
        try:
            while True:
                while len(pending) < 2 * workers:  # a bounded window: memory stays flat
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    pending[pool.submit(call, nxt[1])] = nxt[0]
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job_id = pending.pop(fut)
                    kind, result = fut.result()
                    if kind == "ok":
                        for rec in result:
                            fo.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        fo.flush()
                        summary.written += len(result)
                    else:
                        fr.write(json.dumps({"id": job_id, "reason": result}, ensure_ascii=False) + "\n")
                        fr.flush()
                        summary.rejected += 1
                        key = result.split(":", 1)[0][:80]  # the reason's category, before the details
                        summary.reasons[key] = summary.reasons.get(key, 0) + 1
                    summary.done += 1
                    bar.update(1)
        except KeyboardInterrupt:
            for fut in pending:
                fut.cancel()
            raise
    return summary

"""An OpenAI-compatible chat server for any checkpoint in the HF layout, on the standard library.

    python serve.py --model runs/quickstart/ppo/final [--port 8000] [--name huatuo]
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "huatuo", "messages": [{"role": "user", "content": "我头痛三天了"}]}'

Whatever speaks the Chat Completions protocol can then use the model: the official `openai`
client, and this project's own distill.py and evaluate.py judge/consult (`--base-url
http://127.0.0.1:8000/v1`), which is how the main job (quickstart.py) runs them offline.

Endpoints: POST /v1/chat/completions (with and without `"stream": true`), GET /v1/models and
/v1/models/{name}, and GET / the chat page (serve.html: a multi-turn consultation in the
browser, streamed from this API; no build step, nothing loaded from elsewhere). Honoured:
messages (an optional system message, then user and assistant turns alternating, ending with
the user's), temperature, top_p, max_tokens (or max_completion_tokens), stop (up to 4
strings), n, seed, stream_options.include_usage. Parameters this server cannot honour (tools,
logprobs, penalties other than 0, ...) are refused with a 400 rather than ignored.

Messages become token ids through data.template.render, the one template function that training
uses too; a system message replaces the paper's system text. A conversation longer than the
context loses its oldest rounds (render's rule); a question that alone does not fit is a 400.

Requests that arrive together are decoded as one batch (generate.decode_steps, left-padded):
one worker thread owns the model and takes every waiting request whose sampling settings match
the first one's, up to --max-batch sequences. Each request ends on its own (eos, a stop string,
its max_tokens) while the batch runs on for the others.

Limits: the server listens on 127.0.0.1 unless --host says otherwise; a bearer key is required
when the environment variable SERVE_API_KEY is set; a body larger than --max-body is refused
with 413, and more than --max-concurrent requests at once with 429 (and Retry-After); stop
strings are at most 4 of MAX_STOP_CHARS characters. A client that leaves, streaming or not,
frees its rows at the next step; a seeded request is reproducible whatever it is batched with
(a generator per row); each request is one access-log line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from safety import COUNT, number, run_main
from data.template import render
from chat_api import _loopback
from generate import ReplyText, add_device_args, decode_steps, device_and_dtype, load
from model import Transformer
from tokenizer import Tokenizer

MAX_TOKENS = 512  # the default reply length (the official demo's max_new_tokens); a request may ask for more
MAX_STOP = 4  # as OpenAI's API: at most 4 stop sequences ...
MAX_STOP_CHARS = 2048  # ... of at most this many characters each: the order of a reply's length at most
MAX_N = 8
MIN_TEMPERATURE = 1e-4  # above 0 and below this, logits / temperature overflows float32: 0 is greedy
# Accepted only at these values: anything else asks for behaviour this server does not have.
ONLY = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logprobs": (False, None),
        "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
        "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, False, True),
        "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
        "web_search_options": (None,)}
# Fields read (or harmless: who the caller is, what to store of the exchange); any other is refused,
# naming it, rather than ignored ("max_token" for "max_tokens" would otherwise run to the default).
FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "seed",
          "stream", "stream_options", "response_format", "user", "metadata", "store", *ONLY}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# -- a request, checked ------------------------------------------------------------------------------


@dataclass
class Request:
    ids: list[int]  # the rendered prompt
    max_tokens: int
    n: int = 1
    stop: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    rounds_dropped: int = 0

    def sampling_key(self) -> tuple:
        """Requests decode in one batch only with equal settings (decode_steps takes one set; the
        seed is each row's own)."""
        return self.temperature, self.top_p


def _number(body, name, lo, hi, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {value!r}", name)
    return kind(value)


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (newer clients send those)."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts", where + ".content")
    try:
        content.encode("utf-8")  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes
    except UnicodeEncodeError as e:
        raise BadRequest(f"{where}.content is not valid Unicode text (a lone surrogate at character {e.start})",
                         where + ".content") from None
    return content


def parse_request(body, tok: Tokenizer, context: int, default_max_tokens: int = MAX_TOKENS) -> Request:
    """The JSON body of a chat completion -> Request, or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for name in body:
        if name not in FIELDS:
            raise BadRequest(f"unknown field {name!r}", name, code="unknown_parameter")
    for name, allowed in ONLY.items():
        if name in body and body[name] not in allowed:
            raise BadRequest(f"'{name}' is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest("only response_format {'type': 'text'} is supported", "response_format")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    system, turns = None, []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object", where)
        role = m.get("role")
        if role in ("system", "developer"):
            if turns or system is not None:
                raise BadRequest(f"{where}: a system message may only come first", where + ".role")
            system = _text(m.get("content"), where)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise BadRequest(f"{where}.role is {role!r}; the conversation must alternate user and assistant "
                             f"turns starting with the user's, so {expected!r} was expected", where + ".role")
        turns.append({"role": role, "content": _text(m.get("content"), where)})
    if not turns or turns[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's: the model answers it", "messages")

    n = _number(body, "n", 1, MAX_N, 1, int)
    temperature = _number(body, "temperature", 0, 2, 1.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise BadRequest(f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature!r}",
                         "temperature")
    top_p = _number(body, "top_p", 0, 1, None)
    if top_p is not None and float(torch.tensor(top_p, dtype=torch.float32)) == 0:  # as sampling sees it
        raise BadRequest(f"'top_p' must be greater than 0 in float32, got {top_p!r}", "top_p")
    seed = _number(body, "seed", -2**63, 2**63 - 1, None, int)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise BadRequest(f"'stop' must be a non-empty string of at most {MAX_STOP_CHARS} characters or a list of at "
                         f"most {MAX_STOP} of them", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or (options and not stream):
        raise BadRequest("'stream_options' is an object, and only for stream: true", "stream_options")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, 1, context, None, int)

    kw = {} if system is None else {"system": system}
    try:
        # With no max_tokens the reply gets what the prompt leaves, up to the default.
        rendered = render(tok, turns, max_len=context - (max_tokens or 1), generation_prompt=True, **kw)
    except ValueError as e:
        raise BadRequest(f"the prompt does not fit the model's context of {context} tokens with max_tokens "
                         f"{max_tokens or 1}: {e}", "messages", code="context_length_exceeded") from None
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - len(rendered.ids))
    return Request(rendered.ids, max_tokens, n, stop, temperature, top_p, seed, stream,
                   bool(options.get("include_usage")), rendered.rounds_dropped)


# -- the engine: one thread owns the model and decodes waiting requests together ------------------------


class Job:
    def __init__(self, request: Request):
        self.request = request
        self.events: queue.Queue = queue.Queue()  # ("delta", index, text) ("finish", index, reason) ("done", usage) ("error", message)
        self.cancelled = False
        self.usage: dict | None = None


class Engine:
    def __init__(self, model: Transformer, tok: Tokenizer, *, max_batch: int = 8, seed: int = 0):
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(seed)  # for requests without a seed
        self.waiting: list[Job] = []
        self.cond = threading.Condition()
        self.batches: list[int] = []  # sequences per batch decoded, for tests and logs
        self.cancelled = 0  # requests whose client left before the reply was done
        threading.Thread(target=self._loop, name="engine", daemon=True).start()

    def submit(self, request: Request) -> Job:
        job = Job(request)
        with self.cond:
            self.waiting.append(job)
            self.cond.notify()
        return job

    def row_seed(self, seed: int | None, choice: int) -> int:
        if seed is None:
            return int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return seed % 2**63 if choice == 0 else (seed * 1_000_003 + choice) % 2**63

    def _take(self) -> list[Job]:
        """The first waiting job and every later one that can share its batch."""
        with self.cond:
            while not self.waiting:
                self.cond.wait()
            first = self.waiting.pop(0)
            batch, rows = [first], first.request.n
            longest, most = len(first.request.ids), first.request.max_tokens
            for job in list(self.waiting):
                r = job.request
                fits = max(longest, len(r.ids)) + max(most, r.max_tokens) <= self.context
                if r.sampling_key() == first.request.sampling_key() and rows + r.n <= self.max_batch and fits:
                    self.waiting.remove(job)
                    batch.append(job)
                    rows += r.n
                    longest, most = max(longest, len(r.ids)), max(most, r.max_tokens)
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            try:
                self._decode(batch)
            except Exception as e:  # the model failed: every request of the batch hears it, the server lives on
                for job in batch:
                    job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))

    @torch.no_grad()
    def _decode(self, batch: list[Job]):
        rows = [(job, i, ReplyText(self.tok, job.request.stop, job.request.max_tokens))
                for job in batch for i in range(job.request.n)]
        first = batch[0].request
        # Each row samples from a generator of its own, seeded from its request's seed and its
        # choice's index: a seeded reply is the same alone, batched with others, or as choice 0
        # of n. Rows without a seed take theirs from the server's generator.
        generators = [torch.Generator(self.device).manual_seed(self.row_seed(job.request.seed, i)) for job, i, _ in rows]
        self.batches.append(len(rows))
        steps = decode_steps(self.model, [job.request.ids for job, _, _ in rows],
                             max_new_tokens=max(job.request.max_tokens for job in batch), eos_id=self.tok.eos_id,
                             pad_id=self.tok.pad_id, temperature=first.temperature, top_p=first.top_p,
                             vocab_limit=len(self.tok), generator=generators)
        try:
            for tokens, _, _ in steps:
                for k, (job, index, reply) in enumerate(rows):
                    if reply.finish is not None:
                        continue
                    if job.cancelled:
                        reply.finish = "cancelled"
                        continue
                    piece = reply.push(int(tokens[k]), self.tok.eos_id)
                    if piece:
                        job.events.put(("delta", index, piece))
                    if reply.finish is not None:
                        job.events.put(("finish", index, reply.finish))
                if all(reply.finish is not None for _, _, reply in rows):
                    break
        finally:
            steps.close()
        for job in batch:
            if job.cancelled:
                self.cancelled += 1
            completion = sum(reply.tokens for j, _, reply in rows if j is job)
            job.events.put(("done", {"prompt_tokens": len(job.request.ids), "completion_tokens": completion,
                                     "total_tokens": len(job.request.ids) + completion}))


# -- HTTP ---------------------------------------------------------------------------------------------------


class Page:
    """serve.html, the chat page at /, and the Content-Security-Policy that lets it run its own
    inline script and style (by their sha256) and talk to this server only."""

    def __init__(self, path: Path):
        self.html = path.read_bytes()
        text = self.html.decode("utf-8")
        digests = {}
        for tag in ("script", "style"):
            body = text.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
            digests[tag] = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode()
        self.policy = (f"default-src 'none'; script-src 'sha256-{digests['script']}'; "
                       f"style-src 'sha256-{digests['style']}'; connect-src 'self'; img-src 'self'; "
                       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


PAGE = Page(Path(__file__).with_name("serve.html"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams are sent chunked
    timeout = 60  # seconds a client may take to send its request
    server: "ChatServer"

    def handle_one_request(self):
        """One request, and one access-log line for it (when the server keeps one): the client,
        method, path, status, completion tokens and seconds; never what was asked or answered."""
        self._began, self._status, self._tokens = time.monotonic(), None, None
        super().handle_one_request()
        if self._status is not None:
            self.server.log(f'{self.client_address[0]} "{self.command} {self.path.split("?")[0]}" {self._status} '
                            f"{self._tokens if self._tokens is not None else '-'} {time.monotonic() - self._began:.2f}s")

    def log_request(self, code="-", size="-"):  # send_response's own line: kept for the access log above
        self._status = code

    def log_message(self, fmt, *args):  # http.server's complaints (a bad request line): one line
        self.server.log(f"{self.client_address[0]} {fmt % args}")

    def _send_json(self, status: int, obj: dict, headers: dict | None = None):
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_page(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE.html)))
        self.send_header("Content-Security-Policy", PAGE.policy)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(PAGE.html)

    def _error(self, e: BadRequest, headers: dict | None = None):
        if e.status in (411, 413) or self.close_connection:  # the body was not read: no next request on it
            self.close_connection = True
            headers = dict(headers or {}, Connection="close")
        self._send_json(e.status, e.body(), headers)

    def _authorised(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return True
        self._error(BadRequest("a valid bearer key is required (Authorization: Bearer ...)", status=401,
                               code="invalid_api_key", kind="authentication_error"))
        return False

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "":  # the chat page: static, no data of anyone's, so no key; what it asks the API needs one
            self._send_page()
            return
        if not self._authorised():
            return
        card = {"id": self.server.name, "object": "model", "created": self.server.created, "owned_by": "huatuogpt"}
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [card]})
        elif path == f"/v1/models/{self.server.name}":
            self._send_json(200, card)
        elif path.startswith("/v1/models/"):
            self._error(BadRequest(f"no model {path[len('/v1/models/'):]!r}; this server serves "
                                   f"{self.server.name!r}", "model", 404, "model_not_found"))
        else:
            self._error(BadRequest(f"no such endpoint: GET {path}", status=404, code="not_found"))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/chat/completions":
            length = self._body_length(quiet=True)
            if length is None:  # a body not read: what follows it cannot be told from a next request
                self.close_connection = True
                self._send_json(404, BadRequest(f"no such endpoint: POST {path}", code="not_found").body(),
                                {"Connection": "close"})
                return
            self.rfile.read(length)
            self._error(BadRequest(f"no such endpoint: POST {path}", status=404, code="not_found"))
            return
        length = self._body_length()
        if length is None:
            return
        body = self.rfile.read(length)
        if not self._authorised():
            return
        if not self.server.slots.acquire(blocking=False):
            self._error(BadRequest(f"the server is busy ({self.server.max_concurrent} requests at once); "
                                   "try again shortly", status=429, code="server_busy", kind="rate_limit_error"),
                        {"Retry-After": "1"})
            return
        try:
            self._chat(body)
        finally:
            self.server.slots.release()

    def _body_length(self, quiet: bool = False) -> int | None:
        """The body's length by its one Content-Length, or None (refused, said unless quiet): no
        Content-Length, a chunked body, more than one Content-Length or a Transfer-Encoding beside it
        (requests framed two ways are how one request is smuggled inside another), too long."""
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1 or (lengths and self.headers.get("Transfer-Encoding") is not None):
            if not quiet:
                self._error(BadRequest("the body's length is given more than once (Content-Length, "
                                       "Transfer-Encoding): send one Content-Length", status=400))
                self.close_connection = True
            return None
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            if not quiet:
                self._error(BadRequest("a Content-Length header is required", status=411))
            return None
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if not 0 <= length <= self.server.max_body:
            if not quiet:
                self._error(BadRequest(f"the body must be at most {self.server.max_body} bytes; "
                                       f"Content-Length is {self.headers['Content-Length']}", status=413))
            return None
        return length

    def _chat(self, raw: bytes):
        try:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not valid JSON ({e})") from None
            except RecursionError:
                raise BadRequest("the body's JSON is nested too deeply") from None
            if isinstance(body, dict) and "model" not in body:
                raise BadRequest(f"'model' is required: this server serves {self.server.name!r}", "model")
            if isinstance(body, dict) and body["model"] != self.server.name:
                raise BadRequest(f"no model {body['model']!r}; this server serves {self.server.name!r}",
                                 "model", 404, "model_not_found")
            request = parse_request(body, self.server.engine.tok, self.server.engine.context, self.server.max_tokens)
        except BadRequest as e:
            self._error(e)
            return
        job = self.server.engine.submit(request)
        head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": self.server.name}
        try:
            (self._stream if request.stream else self._complete)(job, head)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled = True  # the client left: its rows stop at the next step
            self.close_connection = True
        self._tokens = job.usage.get("completion_tokens") if job.usage else None

    def _client_gone(self) -> bool:
        """Whether the client closed its end while it waits for a reply: readable with nothing
        to read. (Bytes waiting, a pipelined next request, are not a goodbye.)"""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _complete(self, job: Job, head: dict):
        texts, finish = [""] * job.request.n, [None] * job.request.n
        while True:
            try:
                event = job.events.get(timeout=0.2)
            except queue.Empty:
                if self._client_gone():  # nobody will read the reply: stop making it, free the slot
                    job.cancelled = True
                    self.close_connection = True
                    return
                continue
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "finish":
                finish[event[1]] = event[2]
            elif event[0] == "error":
                self._error(BadRequest(event[1], status=500, kind="server_error"))
                return
            else:
                job.usage = event[1]
                choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                            "logprobs": None} for i, (t, f) in enumerate(zip(texts, finish))]
                self._send_json(200, dict(head, object="chat.completion", choices=choices, usage=event[1]))
                return

    def _stream(self, job: Job, head: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(obj):
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def chunk(index, delta, finish=None):
            return dict(head, object="chat.completion.chunk",
                        choices=[{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}])

        for i in range(job.request.n):
            send(chunk(i, {"role": "assistant", "content": ""}))
        while True:
            event = job.events.get()
            if event[0] == "delta":
                send(chunk(event[1], {"content": event[2]}))
            elif event[0] == "finish":
                send(chunk(event[1], {}, event[2]))
            elif event[0] == "error":  # the status line is gone: an error object in the stream, as OpenAI does
                send(BadRequest(event[1], status=500, kind="server_error").body())
                break
            else:
                job.usage = event[1]
                if job.request.include_usage:
                    send(dict(head, object="chat.completion.chunk", choices=[], usage=event[1]))
                break
        send(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: Engine, name: str, host: str = "127.0.0.1", port: int = 8000, *,
                 api_key: str | None = None, max_body: int = 1 << 20, max_concurrent: int = 16,
                 max_tokens: int = MAX_TOKENS, access_log: bool = False):
        self.engine, self.name, self.api_key, self.access_log = engine, name, api_key or None, access_log
        self.max_body, self.max_concurrent, self.max_tokens = max_body, max_concurrent, max_tokens
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.created = int(time.time())
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), Handler)
        except OSError as e:  # a port in use, a host that is not this machine's: one line, not a trace
            raise SystemExit(f"cannot serve on {host} port {port}: {e.strerror or e}") from None

    def log(self, line: str):
        if self.access_log:
            print(line, file=sys.stderr, flush=True)

    def handle_error(self, request, client_address):
        """A connection that broke (a client that left, a timeout) is one log line, not a
        traceback; anything else is a bug, and keeps its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.log(f"{client_address[0]} connection closed: {type(error).__name__}")
        else:
            super().handle_error(request, client_address)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def start(model_dir, name: str | None = None, *, device="cpu", dtype=torch.float32, compile: bool = False, port: int = 0,
          **kw) -> ChatServer:
    """Load a model and serve it on a background thread (the main job and the tests use this);
    server.base_url is where to point a client, server.shutdown() stops it."""
    model, tok = load(model_dir, device=device, dtype=dtype, compile=compile)
    engine = Engine(model, tok, max_batch=kw.pop("max_batch", 8), seed=kw.pop("seed", 0))
    server = ChatServer(engine, name or Path(model_dir).name, port=port, **kw)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an HF-format directory with tokenizer.model")
    p.add_argument("--name", help="the model's id in the API (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves every interface: set SERVE_API_KEY then")
    p.add_argument("--port", type=number(int, least=0, most=65535), default=8000)
    p.add_argument("--max-batch", type=COUNT, default=8, help="sequences decoded together at most")
    p.add_argument("--max-concurrent", type=COUNT, default=16, help="requests in flight at most; more get 429")
    p.add_argument("--max-body", type=COUNT, default=1 << 20, help="bytes per request body at most")
    p.add_argument("--max-tokens", type=COUNT, default=MAX_TOKENS, help="reply length when a request gives none")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling for requests that give no seed")
    p.add_argument("--quiet", action="store_true", help="no access log (one line a request on stderr)")
    add_device_args(p)
    args = p.parse_args(argv)
    key = os.environ.get("SERVE_API_KEY")
    if not _loopback(args.host) and not key:
        print(f"warning: serving on {args.host} without a key: anyone who can reach it can use the model "
              "(set SERVE_API_KEY)", file=sys.stderr)
    device, dtype = device_and_dtype(args)
    server = start(args.model, args.name, device=device, dtype=dtype, compile=args.compile, port=args.port, api_key=key,
                   max_body=args.max_body, max_concurrent=args.max_concurrent, max_tokens=args.max_tokens,
                   max_batch=args.max_batch, seed=args.seed, access_log=not args.quiet, host=args.host)
    print(f"serving {server.name!r} at {server.base_url} ({args.model}; a request names it as its \"model\"; "
          "Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(run_main(main))

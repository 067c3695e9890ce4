"""An OpenAI-compatible chat server for any checkpoint in the HF layout, on the standard library.

    python serve.py --model runs/quickstart/ppo/final --name huatuo [--port 8000]
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
strings), n, seed, stream_options.include_usage, logprobs and top_logprobs (the model's own
log-probabilities, over its whole vocabulary). Parameters this server cannot honour (tools,
penalties other than 0, ...) are refused with a 400 rather than ignored.

Messages become token ids through data.template.render, the one template function that training
uses too; a system message replaces the paper's system text. A conversation longer than the
context loses its oldest rounds (render's rule); a question that alone does not fit is a 400.

One worker thread owns the model and schedules at every step (Engine): a request that arrives
while others decode joins them at the next step, in one of --max-batch rows of one
KV cache, with its own temperature, top_p, seed, stop strings and max_tokens; a long prompt is
prefilled a chunk a step; a reply that ends frees its row at once. docs/serving.md explains it.

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
import ipaddress
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from safety import COUNT, number, run_main
from chat_api import is_loopback
from generate import add_device_args, device_and_dtype, load
from protocol import CONTROL_CHARACTERS, MAX_TOKENS, BadRequest, parse_request
from engine import PREFILL_CHUNK, Engine, Failed, Finished, Job, Text


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
        self.policy = (
            f"default-src 'none'; script-src 'sha256-{digests['script']}'; "
            f"style-src 'sha256-{digests['style']}'; connect-src 'self'; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )

    def send(self, handler: BaseHTTPRequestHandler):
        """The page as a handler's 200, with its policy, no sniffing and no Referer."""
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html; charset=utf-8")
        handler.send_header("Content-Length", str(len(self.html)))
        handler.send_header("Content-Security-Policy", self.policy)
        handler.send_header("X-Content-Type-Options", "nosniff")
        handler.send_header("Referrer-Policy", "no-referrer")
        handler.end_headers()
        handler.wfile.write(self.html)


PAGE = Page(Path(__file__).with_name("serve.html"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams are sent chunked
    timeout = 60  # seconds a client may take to send its request
    server: "ChatServer"

    disable_nagle_algorithm = True  # TCP_NODELAY: a response's last write is not held for the client's ACK

    def handle_one_request(self):
        """One request, and one access-log line for it (when the server keeps one): the client,
        method, path, status, completion tokens and seconds from the request's first byte (not
        from when a kept-alive connection began to wait); never what was asked or answered."""
        self._status, self._tokens = None, None
        try:
            self.rfile.peek(1)  # wait for the request's first byte (b"" when the client closed)
        except TimeoutError:  # a kept-alive connection left idle: closed, as http.server does
            self.close_connection = True
            return
        self._began = time.monotonic()
        super().handle_one_request()
        if self._status is not None:
            self.server.log(
                f'{self.client_address[0]} "{self.command} {self.path.split("?")[0]}" {self._status} '
                f"{self._tokens if self._tokens is not None else '-'} {time.monotonic() - self._began:.2f}s"
            )

    def log_request(self, code="-", size="-"):  # send_response's own line: kept for the access log above
        self._status = code

    def log_message(self, fmt, *args):  # http.server's complaints (a bad request line): one line
        self.server.log(f"{self.client_address[0]} {fmt % args}")

    def _own_host(self) -> bool:
        """A Host header that names this server, or refused (403, connection closed). A web page
        whose name was rebound to this machine's address (DNS rebinding) sends its own name: it
        must not read this server's replies. Accepted: no Host (HTTP/1.0), an IP address (a
        page at an address is that address's own origin), localhost, --host and --allow-host."""
        host = self.headers.get("Host")
        if host is None or self.server.serves_host(host):
            return True
        self.close_connection = True
        self._error(
            BadRequest(
                f"Host {host!r} is not this server's name; an operator who serves it under that "
                "name starts serve.py with --allow-host NAME",
                status=403,
                code="host_not_allowed",
                kind="permission_error",
            )
        )
        return False

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
        PAGE.send(self)

    def _error(self, e: BadRequest, headers: dict | None = None):
        if e.status in (411, 413) or self.close_connection:  # the body was not read: no next request on it
            self.close_connection = True
            headers = dict(headers or {}, Connection="close")
        self._send_json(e.status, e.body(), headers)

    def _authorised(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        # The scheme's name is case-insensitive (RFC 9110 section 11.1); the key is compared whole.
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return True
        self._error(
            BadRequest(
                "the API key was refused" if scheme else "a valid bearer key is required (Authorization: Bearer ...)",
                status=401,
                code="invalid_api_key",
                kind="authentication_error",
            )
        )
        return False

    def do_GET(self):
        if not self._own_host():
            return
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
            self._error(
                BadRequest(
                    f"no model {path[len('/v1/models/') :]!r}; this server serves {self.server.name!r}",
                    "model",
                    404,
                    "model_not_found",
                )
            )
        else:
            self._error(BadRequest(f"no such endpoint: GET {path}", status=404, code="not_found"))

    def do_POST(self):
        if not self._own_host():
            return
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/chat/completions":
            length = self._body_length(quiet=True)
            if length is None:  # a body not read: what follows it cannot be told from a next request
                self.close_connection = True
                self._send_json(
                    404, BadRequest(f"no such endpoint: POST {path}", code="not_found").body(), {"Connection": "close"}
                )
                return
            self.rfile.read(length)
            self._error(BadRequest(f"no such endpoint: POST {path}", status=404, code="not_found"))
            return
        length = self._body_length()
        if length is None:
            return
        body = self.rfile.read(length)
        media = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media != "application/json":  # a form or text/plain: what another web page may send without asking
            self._error(
                BadRequest(
                    f"the body must be JSON sent as Content-Type: application/json, not {media or 'none'}",
                    status=415,
                    code="unsupported_media_type",
                )
            )
            return
        if not self._authorised():
            return
        if not self.server.enter():
            self._error(
                BadRequest(
                    f"the server is busy ({self.server.max_concurrent} requests at once); try again shortly",
                    status=429,
                    code="server_busy",
                    kind="rate_limit_error",
                ),
                {"Retry-After": "1"},
            )
            return
        try:
            self._chat(body)
        finally:
            self.server.leave()

    def _body_length(self, quiet: bool = False) -> int | None:
        """The body's length by its one Content-Length, or None (refused, said unless quiet): no
        Content-Length, a chunked body, more than one Content-Length or a Transfer-Encoding beside it
        (requests framed two ways are how one request is smuggled inside another), too long."""
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1 or (lengths and self.headers.get("Transfer-Encoding") is not None):
            if not quiet:
                self._error(
                    BadRequest(
                        "the body's length is given more than once (Content-Length, "
                        "Transfer-Encoding): send one Content-Length",
                        status=400,
                    )
                )
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
                self._error(
                    BadRequest(
                        f"the body must be at most {self.server.max_body} bytes; "
                        f"Content-Length is {self.headers['Content-Length']}",
                        status=413,
                    )
                )
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
                raise BadRequest(
                    f"no model {body['model']!r}; this server serves {self.server.name!r}",
                    "model",
                    404,
                    "model_not_found",
                )
            request = parse_request(body, self.server.engine.tok, self.server.engine.context, self.server.max_tokens)
            job = self.server.engine.submit(request)
        except BadRequest as e:
            self._error(e)
            return
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
        logprobs = [[] for _ in range(job.request.n)]
        while True:
            try:
                event = job.events.get(timeout=0.2)
            except queue.Empty:
                if self._client_gone():  # nobody will read the reply: stop making it, free the slot
                    job.cancelled = True
                    self.close_connection = True
                    return
                continue
            if isinstance(event, (Text, Finished)):
                if isinstance(event, Text):
                    texts[event.choice] += event.text
                else:
                    finish[event.choice] = event.reason
                logprobs[event.choice] += event.logprobs or []
            elif isinstance(event, Failed):
                self._error(BadRequest(event.message, status=500, kind="server_error"))
                return
            else:
                job.usage = event.usage
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": t},
                        "finish_reason": f,
                        "logprobs": {"content": lp, "refusal": None} if job.request.logprobs else None,
                    }
                    for i, (t, f, lp) in enumerate(zip(texts, finish, logprobs))
                ]
                self._send_json(200, dict(head, object="chat.completion", choices=choices, usage=event.usage))
                return

    def _stream(self, job: Job, head: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(obj):
            data = (
                b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"
            )
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def chunk(index, delta, finish=None, logprobs=None):
            return dict(
                head,
                object="chat.completion.chunk",
                choices=[
                    {
                        "index": index,
                        "delta": delta,
                        "finish_reason": finish,
                        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                    }
                ],
            )

        for i in range(job.request.n):
            send(chunk(i, {"role": "assistant", "content": ""}))
        while True:
            try:
                event = job.events.get(timeout=0.2)
            except queue.Empty:  # no text for a while (held back, or a long prefill): is anyone there?
                if self._client_gone():
                    job.cancelled = True
                    self.close_connection = True
                    return
                continue
            if isinstance(event, Text):
                send(chunk(event.choice, {"content": event.text}, logprobs=event.logprobs))
            elif isinstance(event, Finished):
                send(chunk(event.choice, {}, event.reason, event.logprobs))
            elif isinstance(event, Failed):  # the status line is gone: an error object in the stream, as OpenAI does
                send(BadRequest(event.message, status=500, kind="server_error").body())
                break
            else:
                job.usage = event.usage
                if job.request.include_usage:
                    send(dict(head, object="chat.completion.chunk", choices=[], usage=event.usage))
                break
        send(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def host_allowed(hosts: set[str], header: str) -> bool:
    """Whether a Host header ("name", "name:port", "[v6]:port") is one a server known by `hosts`
    (lower case; "*" for any) answers to: one of them, or an IP address."""
    name = header.strip().lower()
    if name.startswith("["):  # [v6] or [v6]:port
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:  # name:port (a bare v6 address has more colons)
        name = name.partition(":")[0]
    if "*" in hosts or name in hosts:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        engine: Engine,
        name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        api_key: str | None = None,
        max_body: int = 1 << 20,
        max_concurrent: int = 16,
        max_tokens: int = MAX_TOKENS,
        access_log: bool = False,
        allow_hosts: tuple[str, ...] = (),
    ):
        self.engine, self.name, self.api_key, self.access_log = engine, name, api_key or None, access_log
        self.hosts = {h.lower().strip("[]") for h in ("localhost", host, *allow_hosts)}
        self.max_body, self.max_concurrent, self.max_tokens = max_body, max_concurrent, max_tokens
        self.in_flight, self.in_flight_lock = 0, threading.Lock()  # requests being answered
        self.created = int(time.time())
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), Handler)
        except OSError as e:  # a port in use, a host that is not this machine's: one line, not a trace
            raise SystemExit(f"cannot serve on {host} port {port}: {e.strerror or e}") from None

    def enter(self) -> bool:
        """A request starts being answered, unless --max-concurrent already are."""
        with self.in_flight_lock:
            if self.in_flight >= self.max_concurrent:
                return False
            self.in_flight += 1
            return True

    def leave(self):
        with self.in_flight_lock:
            self.in_flight -= 1

    def serves_host(self, header: str) -> bool:
        return host_allowed(self.hosts, header)

    def log(self, line: str):
        """A line of the access log, its control characters escaped (a path may carry ESC
        sequences that would rewrite the operator's terminal), as http.server's own log does."""
        if self.access_log:
            print(line.translate(CONTROL_CHARACTERS), file=sys.stderr, flush=True)

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


def start(model_dir, name: str | None = None, *, device="cpu", dtype=torch.float32, port: int = 0, **kw) -> ChatServer:
    """Load a model and serve it on a background thread (the main job and the tests use this);
    server.base_url is where to point a client, server.shutdown() stops it."""
    model, tok = load(model_dir, device=device, dtype=dtype)
    engine = Engine(
        model,
        tok,
        max_batch=kw.pop("max_batch", 8),
        seed=kw.pop("seed", 0),
        prefill_chunk=kw.pop("prefill_chunk", None),
    )
    server = ChatServer(engine, name or Path(model_dir).name, port=port, **kw)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an HF-format directory with tokenizer.model")
    p.add_argument("--name", help="the model's id in the API (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves every interface: set SERVE_API_KEY then")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name clients reach this server by, besides --host, localhost and IP addresses "
        "(repeatable; * for any: behind a proxy that checks it)",
    )
    p.add_argument("--port", type=number(int, least=0, most=65535), default=8000)
    p.add_argument("--max-batch", type=COUNT, default=8, help="sequences decoded together at most (rows of the cache)")
    p.add_argument(
        "--prefill-chunk",
        type=COUNT,
        help="prompt tokens prefilled a step while others decode "
        f"(default: {PREFILL_CHUNK['cuda']} on a GPU, "
        f"{PREFILL_CHUNK['cpu']} on a CPU)",
    )
    p.add_argument("--max-concurrent", type=COUNT, default=16, help="requests in flight at most; more get 429")
    p.add_argument("--max-body", type=COUNT, default=1 << 20, help="bytes per request body at most")
    p.add_argument("--max-tokens", type=COUNT, default=MAX_TOKENS, help="reply length when a request gives none")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling for requests that give no seed")
    p.add_argument("--quiet", action="store_true", help="no access log (one line a request on stderr)")
    add_device_args(p, compile=False)  # the engine steps eagerly: its rows change every step
    args = p.parse_args(argv)
    key = os.environ.get("SERVE_API_KEY")
    if not is_loopback(args.host) and not key:
        print(
            f"warning: serving on {args.host} without a key: anyone who can reach it can use the model "
            "(set SERVE_API_KEY)",
            file=sys.stderr,
        )
    device, dtype = device_and_dtype(args)
    server = start(
        args.model,
        args.name,
        device=device,
        dtype=dtype,
        port=args.port,
        api_key=key,
        max_body=args.max_body,
        max_concurrent=args.max_concurrent,
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        seed=args.seed,
        access_log=not args.quiet,
        host=args.host,
        allow_hosts=tuple(args.allow_host),
    )
    print(
        f'serving {server.name!r} at {server.base_url} ({args.model}; a request names it as its "model"; Ctrl-C stops)',
        flush=True,
    )
    try:
        # Short waits: SIGINT may land on another thread (the engine's, torch's), and Python raises
        # KeyboardInterrupt in the main thread only when it next runs, not while it blocks in a wait.
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:
        return stop(server)


def stop(server: ChatServer, timeout: float = 10.0) -> int:
    """Ctrl-C: the engine stops between two steps, at once, and every reply in flight hears so
    (a stream gets an error object and [DONE]); no new connection; the handlers get `timeout`
    seconds to send that; one line, exit status 130."""
    in_flight = server.in_flight
    server.engine.close(timeout=0)  # the engine stops at once, not after the server's next poll
    server.shutdown()
    server.engine.close(timeout)
    deadline = time.monotonic() + timeout
    while server.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f"stopped (Ctrl-C); {in_flight} request(s) in flight were told the server is stopping", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(run_main(main))

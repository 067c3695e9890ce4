"""A scripted OpenAI-compatible Chat Completions server on 127.0.0.1 for the tests.

`respond(messages) -> str` makes the reply content; `faults` is a queue of misbehaviours the
next requests meet, in order: "429" (with Retry-After), "500", "slow" (longer than the client's
timeout), "truncated" (a cut JSON body), "400" (a bad request, echoing the Authorization header),
"401" (a refused key, echoed shortened as OpenAI does), "429-soon" (an unparseable Retry-After),
"trickle" (the body sent a byte every 0.2 s). `always` is a fault every request meets (an outage).
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, respond, delay: float = 0.0):
        self.respond, self.delay = respond, delay
        self.faults: list[str] = []
        self.always: str | None = None
        self.log: list[dict] = []  # {"messages", "authorization", "fault"}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    fault = server.faults.pop(0) if server.faults else server.always
                    server.log.append(
                        {
                            "messages": body["messages"],
                            "model": body.get("model"),
                            "fault": fault,
                            "authorization": self.headers.get("Authorization", ""),
                        }
                    )
                if fault == "429":
                    return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "1"})
                if fault == "429-soon":
                    return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "soon"})
                if fault == "401":
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    echo = json.dumps({"error": {"message": f"Incorrect API key provided: {key[:8]}****{key[-4:]}."}})
                    return self._send(401, echo.encode())
                if fault == "500":
                    return self._send(500, b'{"error": "boom"}')
                if fault == "400":
                    echo = json.dumps({"error": "bad request", "auth": self.headers.get("Authorization", "")})
                    return self._send(400, echo.encode())
                if fault == "slow":
                    time.sleep(1.5)
                if server.delay:
                    time.sleep(server.delay)
                content = server.respond(body["messages"])
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                    }
                ).encode()
                if fault == "truncated":
                    data = data[: len(data) // 2]
                self._send(200, data, trickle=fault == "trickle")

            def _send(self, status, data, headers=None, trickle=False):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    if trickle:
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(0.2)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

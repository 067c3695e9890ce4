"""serve.py under load: its scheduler against another checkout's (--repo), in one run.

Each server is serve.py in a process of its own (one of --repo's, then this checkout's), on
loopback, serving the same randomly initialised model (--model: tiny or bench-50m) with the
same flags; the clients run here. Figures:

  short behind long   a request for 8 tokens sent 1 s after a 1,800-token reply began: the
                      time to its last token ÷ the same request alone (issue 36: ~190 with a
                      batch that ran to its end before the next began; goal <= 1.5)
  32 clients          32 streaming requests at once, mixed temperature, top_p, max_tokens (16
                      to 256) and prompt length: completion tokens a second (all of them ÷
                      the time until the last ends), p50 and p99 time to the first token
  long prompt         a 1,500-token reply streaming while a request with a 2,000-token prompt
                      arrives: the reply's median and longest gap between tokens from then
                      until that request's last token, each ÷ its median gap before (goal
                      <= 2), and that request's time to its first token
  kept alive          issue 35 item 3.3: the median of --requests GET /v1/models on one kept-
                      alive connection ÷ the same on fresh connections (headers and body in two
                      writes without TCP_NODELAY waited ~40 ms for the client's delayed ACK)

A random model rarely says eos, so replies run to their max_tokens. Times are medians of
--repeats runs where a figure is a ratio measured within one server's run.

    python bench/bench_serve.py [--repo OLD_CHECKOUT] [--model tiny] [--repeats 3]
"""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import CONFIGS, Transformer  # noqa: E402
from pretrained import save_model  # noqa: E402
from training import train_tiny_tokenizer  # noqa: E402

QUESTION = "我最近三天一直头痛，晚上睡不好，需要去医院吗？"


class Server:
    """serve.py of a checkout, in a process of its own, until closed."""

    def __init__(self, repo: Path, model: Path, *flags: str):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(repo / "serve.py"),
                "--model",
                str(model),
                "--port",
                "0",
                "--quiet",
                "--max-concurrent",
                "64",
                *flags,
            ],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if " at " not in line:
            raise SystemExit(f"{repo}/serve.py did not start: {line!r}")
        self.url = line.split(" at ")[1].split()[0]
        self.host, self.port = self.url.removeprefix("http://").split("/")[0].rsplit(":", 1)

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def stream(
    server: Server, content: str, max_tokens: int, temperature: float = 1.0, top_p: float | None = None, seed: int = 0
) -> tuple[float, list[float], int]:
    """One streaming request: (the time it was sent, the times of its content chunks, its
    completion tokens)."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if top_p is not None:
        body["top_p"] = top_p
    sent, times, tokens = time.perf_counter(), [], 0
    with requests.post(server.url + "/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in event["choices"]):
                times.append(time.perf_counter())
    return sent, times, tokens


def in_thread(fn, *args, **kw):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fn(*args, **kw)))
    thread.start()
    return thread, out


def short_behind_long(server: Server) -> float:
    sent, times, _ = stream(server, QUESTION, 8, temperature=0)
    alone = times[-1] - sent
    thread, _ = in_thread(stream, server, QUESTION, 1800, temperature=0)
    time.sleep(1.0)
    sent, times, _ = stream(server, QUESTION, 8, temperature=0)
    behind = times[-1] - sent
    thread.join()
    return behind / alone


def many_clients(server: Server, n: int = 32) -> tuple[float, float, float]:
    """(completion tokens a second, p50 and p99 seconds to the first token)."""
    # Settings and lengths that vary independently (3 temperatures x 2 top_p; lengths by i % 4
    # and i % 5), so that requests sharing settings still differ in length.
    settings = [
        dict(
            temperature=[0, 0.7, 1.0][i % 3],
            top_p=[None, 0.9][i % 2],
            max_tokens=[16, 64, 256, 128][i % 4],
            content=QUESTION * (1 + i % 5),
            seed=i,
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    threads = [in_thread(stream, server, **s) for s in settings]
    for thread, _ in threads:
        thread.join()
    wall = time.perf_counter() - start
    results = [out["result"] for _, out in threads]
    first = sorted(times[0] - sent for sent, times, _ in results if times)
    return (
        sum(tokens for _, _, tokens in results) / wall,
        first[len(first) // 2],
        first[min(len(first) - 1, round(0.99 * len(first)))],
    )


def question_of(tok_path: Path, tokens: int) -> str:
    """A question whose rendered prompt is about `tokens` tokens long (at most)."""
    from data.template import render
    from tokenizer import Tokenizer

    tok, text = Tokenizer(tok_path), ""
    while (
        len(render(tok, [{"role": "user", "content": text + QUESTION}], max_len=10**6, generation_prompt=True).ids)
        <= tokens
    ):
        text += QUESTION
    return text


def long_prompt(server: Server, question: str) -> tuple[float, float, float]:
    """(median gap ÷ steady, longest gap ÷ steady, the long prompt's seconds to its first token)."""
    thread, out = in_thread(stream, server, QUESTION, 1500, temperature=0)
    time.sleep(2.0)
    arrival, (_, long_times, _) = time.perf_counter(), stream(server, question, 8, temperature=0)
    thread.join()
    _, times, _ = out["result"]
    gaps = [(b - a, b) for a, b in zip(times, times[1:])]
    steady = statistics.median(g for g, t in gaps if t < arrival)
    during = [g for g, t in gaps if arrival <= t <= long_times[-1]] or [float("nan")]
    return statistics.median(during) / steady, max(during) / steady, long_times[0] - arrival


def kept_alive(server: Server, n: int = 50) -> float:
    def timed(conn):
        start = time.perf_counter()
        conn.request("GET", "/v1/models")
        conn.getresponse().read()
        return time.perf_counter() - start

    kept = http.client.HTTPConnection(server.host.strip("[]"), int(server.port), timeout=30)
    timed(kept)
    alive = statistics.median(timed(kept) for _ in range(n))
    kept.close()
    fresh = []
    for _ in range(n):
        conn = http.client.HTTPConnection(server.host.strip("[]"), int(server.port), timeout=30)
        fresh.append(timed(conn))
        conn.close()
    return alive / statistics.median(fresh)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, help="another checkout whose serve.py runs first (today's engine: before)")
    p.add_argument("--model", default="tiny", choices=["tiny", "bench-50m"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--flags",
        action="append",
        default=[],
        help="serve.py flags for another run of this checkout's server (repeatable: one server each)",
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tiny_tokenizer(Path(tmp) / "tokenizer.model", vocab_size=min(CONFIGS[args.model].vocab_size, 2048))
        save_model(Transformer.from_config(CONFIGS[args.model], seed=0), Path(tmp) / "m", tokenizer=tok)
        print(
            f"serve.py, {args.model} (random weights, fp32), {torch.get_num_threads()} threads; "
            f"medians of {args.repeats}"
        )
        print(
            f"{'checkout (flags)':<34} {'short behind long':>18} {'32 clients tok/s':>17} {'TTFT p50 s':>11} "
            f"{'TTFT p99 s':>11} {'gap median':>11} {'gap max':>8} {'its TTFT s':>11} {'kept alive':>11}"
        )
        question = question_of(Path(tmp) / "tokenizer.model", 2000)
        runs = [(ROOT, flags.split()) for flags in args.flags or [""]]
        for repo, flags in ([(args.repo, [])] if args.repo else []) + runs:
            server = Server(repo, Path(tmp) / "m", *flags)
            try:
                rows = [
                    (
                        short_behind_long(server),
                        *many_clients(server),
                        *long_prompt(server, question),
                        kept_alive(server),
                    )
                    for _ in range(args.repeats)
                ]
            finally:
                server.close()
            med = [statistics.median(col) for col in zip(*rows)]
            label = f"{str(repo)[-20:]} {' '.join(flags)}"
            print(
                f"{label:<34} {med[0]:18.2f} {med[1]:17.1f} {med[2]:11.2f} {med[3]:11.2f} {med[4]:11.2f} "
                f"{med[5]:8.2f} {med[6]:11.2f} {med[7]:11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

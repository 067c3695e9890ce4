"""serve.py's latency per request on a kept-alive connection, against fresh connections.

Issue 35 item 3.3: the server wrote a response's headers and its body in two writes, and
without TCP_NODELAY the second waited for the client's delayed ACK of the first (Nagle's
algorithm), ~40 ms on every request after a connection's first. This bench serves the tiny
model on loopback and times --requests GET /v1/models and --requests one-token chat
completions, each on one kept-alive connection (http.client, as the openai client keeps one)
and each on a fresh connection a request. Both with the server's sockets as they are now
(TCP_NODELAY) and as they were (Nagle's algorithm on), in one run, alternating; medians.

    python bench/bench_serve.py [--requests 50]
"""

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve  # noqa: E402
from model import CONFIGS, Transformer  # noqa: E402
from training import train_tiny_tokenizer  # noqa: E402

CHAT = json.dumps({"model": "m", "max_tokens": 1, "temperature": 0,
                   "messages": [{"role": "user", "content": "头痛"}]}).encode()


def timed(conn: http.client.HTTPConnection, what: str) -> float:
    start = time.perf_counter()
    if what == "models":
        conn.request("GET", "/v1/models")
    else:
        conn.request("POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()
    return time.perf_counter() - start


def medians(server, what: str, n: int) -> tuple[float, float]:
    """(median seconds a request on one kept-alive connection, the same on fresh ones)."""
    address = server.server_address[:2]
    kept = http.client.HTTPConnection(*address, timeout=30)
    timed(kept, what)  # the connection's first request is not a kept-alive one
    alive = [timed(kept, what) for _ in range(n)]
    kept.close()
    fresh = []
    for _ in range(n):
        conn = http.client.HTTPConnection(*address, timeout=30)
        fresh.append(timed(conn, what))
        conn.close()
    return statistics.median(alive), statistics.median(fresh)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tiny_tokenizer(Path(tmp) / "tokenizer.model")
        Transformer.from_config(CONFIGS["tiny"], seed=0).save_pretrained(Path(tmp) / "m", tokenizer=tok)
        server = serve.start(Path(tmp) / "m", "m")
        try:
            print(f"{args.requests} requests each, medians in ms; serve.py tiny model on loopback")
            print(f"{'request':<10} {'sockets':<18} {'kept alive':>10} {'fresh':>8} {'kept ÷ fresh':>13}")
            for what in ("models", "chat"):
                for nodelay in (True, False, True, False):  # alternated: the machine's noise on both
                    serve.Handler.disable_nagle_algorithm = nodelay
                    alive, fresh = medians(server, what, args.requests)
                    label = "TCP_NODELAY (now)" if nodelay else "Nagle (before)"
                    print(f"{what:<10} {label:<18} {alive * 1e3:10.1f} {fresh * 1e3:8.1f} {alive / fresh:13.2f}",
                          flush=True)
        finally:
            serve.Handler.disable_nagle_algorithm = True
            server.shutdown()


if __name__ == "__main__":
    main()

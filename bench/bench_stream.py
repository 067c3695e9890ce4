"""Streaming a reply's text: tokenizer.StreamDecoder's window against decoding the whole reply on
each token (the scheme before it), on the same ids, in the same process.

Each token's text is found by decoding; the whole-reply scheme decodes all n tokens so far on
each of them, n(n+1)/2 ids for a reply, where the window decodes the tokens since the last two
emissions. Replies are the shipped corpus's text, joined up to each length, in a tokenizer
trained on it as the embedded default trains its own (4,096 pieces).

    python bench/bench_stream.py [--lengths 128 512 2048] [--repeats 5]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import StreamDecoder, corpus_sentences, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def whole_reply(tok, ids) -> str:
    """The scheme before the window: decode everything so far, emit what is new."""
    emitted, out = "", []
    for i in range(1, len(ids) + 1):
        text = tok.decode(ids[:i])
        if not text.endswith("\ufffd"):
            out.append(text[len(emitted) :])
            emitted = text
    out.append(tok.decode(ids)[len(emitted) :])
    return "".join(out)


def window(tok, ids) -> str:
    dec = StreamDecoder(tok)
    return "".join([dec.push(i) for i in ids] + [dec.flush()])


def seconds(fn, tok, ids) -> float:
    start = time.perf_counter()
    text = fn(tok, ids)
    elapsed = time.perf_counter() - start
    assert text == tok.decode(ids)
    return elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    files = sorted((ROOT / "data" / "sft").glob("*.jsonl"))
    sentences = list(corpus_sentences(files))
    model = Path(tempfile.mkdtemp()) / "tokenizer.model"
    tok = train_tokenizer(sentences, model)
    ids = tok.encode("".join(sentences))
    print("| reply, tokens | whole reply, ms | window, ms | window ÷ whole |")
    print("|---|---|---|---|")
    for n in args.lengths:
        reply = ids[:n]
        runs = {fn: [] for fn in (whole_reply, window)}
        for _ in range(args.repeats):  # alternating, medians kept
            for fn in runs:
                runs[fn].append(seconds(fn, tok, reply))
        whole, win = (statistics.median(runs[fn]) * 1e3 for fn in (whole_reply, window))
        print(f"| {len(reply):,} | {whole:.1f} | {win:.1f} | {win / whole:.3f} |")


if __name__ == "__main__":
    main()

"""Inspect, convert and mix data files.

    python -m data stats FILE…  [--format F] [--tokenizer tok.model]
    python -m data convert INPUT --out OUT.jsonl [--format F] [--split test] [--skip-bad] [--encoding gbk]
    python -m data mix --source FILE[:weight=W][:cap=N] … --out-dir DIR [--val-fraction 0.05] [--seed 0]
    python -m data export-huatuo IN.jsonl --out OUT.jsonl      (our schema -> HuatuoGPT's {"data": […]})

Formats: see data/readers.py (guessed from the file name and first line when --format is not
given). Every command prints what it skipped or changed; nothing is dropped silently. An
existing output is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from data.mixing import Source, length_stats, mix
from data.readers import add_input_args, read
from pathlib import Path

from data.schema import RecordError, Report, to_huatuo, write_jsonl
from safety import COUNT, FRACTION, POSITIVE, refuse_to_replace, run_main
from data.template import MAX_LEN, render


def token_lengths(records, tokenizer_path, max_len):
    from tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    lengths, dropped, cut = [], 0, 0
    for r in records:
        msgs = r["messages"] + ([{"role": "assistant", "content": r["chosen"]}] if "chosen" in r else [])
        out = render(tok, msgs, max_len=max_len, generation_prompt=msgs[-1]["role"] == "user")
        if out is None:
            dropped += 1
        else:
            lengths.append(len(out.ids))
            cut += out.rounds_dropped > 0
    return lengths, dropped, cut


def print_table(rows: list[dict]):
    cols = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(str(c).rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)))


def cmd_stats(args):
    for path in args.files:
        report = Report()
        records = list(read(path, args.format, skip_bad=args.skip_bad, report=report, encoding=args.encoding))
        sources = Counter(r["source"] for r in records)
        rounds = [(len(r["messages"]) + 1) // 2 for r in records]
        chars = [sum(len(m["content"]) for m in r["messages"]) for r in records]
        print(f"{path}: {len(records)} records; sources {dict(sources)}")
        print(f"  rounds      {length_stats(rounds)}")
        print(f"  characters  {length_stats(chars)}")
        if args.tokenizer:
            lengths, dropped, cut = token_lengths(records, args.tokenizer, args.max_len)
            print(
                f"  tokens      {length_stats(lengths)}  (template included; {dropped} too long for one "
                f"round of {args.max_len}, {cut} lose later rounds)"
            )
        if report:
            print("  " + report.summary().replace("\n", "\n  "))


def cmd_convert(args):
    replacing(args.out, args, [args.input])
    report = Report()
    n = write_jsonl(
        args.out,
        read(
            args.input,
            args.format,
            skip_bad=args.skip_bad,
            report=report,
            encoding=args.encoding,
            **({"split": args.split} if args.split else {}),
        ),
    )
    print(f"wrote {n} records to {args.out}")
    if report:
        print(report.summary())


def replacing(out: str, args, inputs: list):
    """An existing --out is replaced only with --overwrite (the project's one rule), and never
    when it is one of the inputs."""
    refuse_to_replace(Path(out).parent, [Path(out).name], overwrite=args.overwrite, inputs=inputs)


def parse_source(spec: str) -> tuple[str, float, int | None]:
    """'file.jsonl:weight=2:cap=1000' -> (path, weight, cap)."""
    path, *opts = spec.split(":")
    weight, cap = 1.0, None
    for opt in opts:
        key, _, value = opt.partition("=")
        kind = {"weight": POSITIVE, "cap": COUNT}.get(key)
        if kind is None:
            raise ValueError(f"--source {spec}: unknown option {opt!r} (use weight=W or cap=N)")
        try:
            parsed = kind(value)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--source {spec}: {key}: {e}") from None
        weight, cap = (parsed, cap) if key == "weight" else (weight, parsed)
    return path, weight, cap


def cmd_mix(args):
    refuse_to_replace(
        Path(args.out_dir),
        ["train.jsonl", "val.jsonl"],
        overwrite=args.overwrite,
        inputs=[parse_source(spec)[0] for spec in args.source],
    )
    sources, report = [], Report()
    for spec in args.source:
        path, weight, cap = parse_source(spec)
        records = list(read(path, args.format, skip_bad=args.skip_bad, report=report, encoding=args.encoding))
        for r in records:
            if r["messages"][-1]["role"] == "user":
                report.note(
                    "record ends with a question: a trainer drops that turn, or the record if it has no answer",
                    f"{path}: {r['id']}",
                )
        sources.append(Source(path, records, weight, cap))
    train, val, rows = mix(sources, seed=args.seed, val_fraction=args.val_fraction)
    if args.tokenizer:  # over what is written (after dedup, cap and weight), not what was read
        written = Counter(id(r) for r in train + val)
        for row, src in zip(rows, sources):
            kept = [r for r in src.records for _ in range(written[id(r)])]
            stats = length_stats(token_lengths(kept, args.tokenizer, args.max_len)[0])
            row.update(tokens=stats["total"], p50=stats["p50"], p90=stats["p90"], p99=stats["p99"], max=stats["max"])
    print_table(rows)
    if not train:
        raise ValueError(f"--source {' '.join(args.source)}: no training record left to write; nothing written")
    write_jsonl(f"{args.out_dir}/train.jsonl", train)
    write_jsonl(f"{args.out_dir}/val.jsonl", val)
    print(f"wrote {len(train)} training and {len(val)} validation records to {args.out_dir}")
    if report:
        print(report.summary())


def cmd_export(args):
    """The HuatuoGPT layout holds question/answer pairs: a prompt-only record (a question and
    no answer) has nothing to write and is skipped, a last unanswered question is dropped;
    both are counted. What is written reads back with the huatuo-sft reader."""
    replacing(args.out, args, [args.input])
    report = Report()

    def exportable():
        for r in read(args.input, "schema"):
            if len(r["messages"]) < 2:
                report.skip("a question with no answer", f"{args.input}: {r['id']}")
                continue
            if r["messages"][-1]["role"] == "user":
                report.note("last unanswered question dropped", f"{args.input}: {r['id']}")
            yield to_huatuo(r)

    n = write_jsonl(args.out, exportable(), if_empty=f"{args.input}: no conversation to export; nothing written")
    print(f"wrote {n} lines in the HuatuoGPT SFT layout to {args.out}")
    if report:
        print(report.summary())


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        add_input_args(sp)
        sp.add_argument("--skip-bad", action="store_true", help="skip malformed records (counted) instead of stopping")

    def overwrite(sp):
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output")

    s = sub.add_parser("stats", help="counts and length percentiles")
    s.add_argument("files", nargs="+")
    s.add_argument("--tokenizer")
    s.add_argument("--max-len", type=COUNT, default=MAX_LEN)
    common(s)
    c = sub.add_parser("convert", help="a public format -> our schema")
    c.add_argument("input")
    c.add_argument("--out", required=True)
    c.add_argument("--split", help="cMedQA2: which candidates file (test, dev, train)")
    common(c)
    overwrite(c)
    m = sub.add_parser("mix", help="sources -> train.jsonl and val.jsonl")
    m.add_argument("--source", nargs="+", required=True)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--val-fraction", type=FRACTION, default=0.05)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tokenizer")
    m.add_argument("--max-len", type=COUNT, default=MAX_LEN)
    common(m)
    overwrite(m)
    e = sub.add_parser("export-huatuo", help="our schema -> the HuatuoGPT SFT data layout")
    e.add_argument("input")
    e.add_argument("--out", required=True)
    overwrite(e)
    args = p.parse_args(argv)
    try:
        {"stats": cmd_stats, "convert": cmd_convert, "mix": cmd_mix, "export-huatuo": cmd_export}[args.cmd](args)
    except (RecordError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

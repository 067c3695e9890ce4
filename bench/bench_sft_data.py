"""Host memory and time to the first step of train_sft.py at the paper's data size (issue 34 item 1).

A synthetic SFT corpus of --conversations conversations (default: the 226,042 of Table 3's
medical parts) of about --tokens tokens each with the embedded tokenizer (default 1,024, so
~231M tokens) is written once in the project's schema, from sentences of the shipped corpus
(so that it tokenizes as real text does) with a serial number in each, so that none is a
duplicate, with 64 more as the --val-data file. train_sft.py --model tiny --max-steps 1 then
runs on it, on --nproc ranks, twice into the same --out: a first run, and a rerun
(--overwrite) that finds the rendered corpus in its cache (OUT/data-cache). For each: the
seconds until the first step's metrics line, the seconds in all, and the largest peak RSS of
any of its processes (wait4's ru_maxrss). --repo runs another checkout's train_sft.py on the
same corpus (before and after, in one session).

--prompts measures PPO's prompts from the same corpus instead (ppo_setup.read_prompts: every
patient turn with its history), each in a process of its own: held as lists in memory (before:
what every rank did at every start), rendered into the data cache (data.corpus, rank 0 once),
and mapped from it (every rank, every rerun): seconds, peak RSS, and the prompts' tokens.

    python bench/bench_sft_data.py [--conversations 226042] [--nproc 1] [--keep DIR] [--repo DIR]
    python bench/bench_sft_data.py --prompts [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sentences() -> list[str]:
    """The shipped SFT corpus cut at its full stops: the pieces synthetic turns are made of."""
    out = []
    for f in sorted((ROOT / "data" / "sft").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            for m in json.loads(line)["messages"]:
                out += [s + "。" for s in m["content"].split("。") if s.strip()]
    return out


def write_corpus(path: Path, n: int, chars: int, seed: int = 0):
    """n conversations of 1 to 3 rounds and about `chars` characters each, numbered."""
    rng, pool = random.Random(seed), sentences()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rounds = rng.randint(1, 3)
            messages = []
            for r in range(rounds):
                for role, share in (("user", 0.25), ("assistant", 0.75)):
                    text, want = f"第{i}例，", chars * share / rounds
                    while len(text) < want:
                        text += rng.choice(pool)
                    messages.append({"role": role, "content": text})
            f.write(
                json.dumps({"id": f"syn-{i}", "source": "synthetic", "messages": messages}, ensure_ascii=False) + "\n"
            )


def chars_for(tokens: int, tok_path: Path) -> int:
    """Characters a conversation needs for about `tokens` tokens with the embedded tokenizer."""
    from data.template import render
    from tokenizer import Tokenizer

    tok = Tokenizer(tok_path)
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.jsonl"
        write_corpus(sample, 200, 1000, seed=1)
        records = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines()]
    n_chars = sum(len(m["content"]) for r in records for m in r["messages"])
    n_tokens = sum(len(render(tok, r["messages"], max_len=10**6).ids) for r in records)
    return round(tokens * n_chars / n_tokens)


def run(cmd: list[str], root: Path, metrics: Path) -> tuple[float, float, float]:
    """(seconds to the first step's metrics line, seconds in all, the largest peak RSS in MiB
    of the command's processes: wait4's ru_maxrss, the largest of the child's and of every
    descendant it waited for)."""
    start, first = time.perf_counter(), float("nan")
    pid = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)  # Popen.poll would reap it, usage and all
        if done:
            break
        if first != first and metrics.is_file() and '"loss"' in metrics.read_text(encoding="utf-8"):
            first = time.perf_counter() - start
        time.sleep(0.2)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} exited with {os.waitstatus_to_exitcode(status)}")
    return first, time.perf_counter() - start, usage.ru_maxrss / 1024


def prompts_child(how: str, corpus: Path, cache: Path):
    """One of --prompts' measurements, in this process: prints seconds and the prompts' count."""
    from data.corpus import Corpus
    from data.schema import Report
    from tokenizer import Tokenizer
    from train_ppo import read_prompts
    from training import rendered_once
    from distributed import init_distributed

    tok, start = Tokenizer(corpus.parent / "tokenizer.model"), time.perf_counter()
    if how == "lists":
        prompts = list(read_prompts([corpus], [], tok, 2048 - 512, Report()))
    else:
        d = init_distributed()
        report = Report()
        entry, _ = rendered_once(
            cache,
            cache,
            {"bench": str(corpus)},
            lambda: ({"prompts": read_prompts([corpus], [], tok, 2048 - 512, report)}, report),
            d,
            labels=False,
        )
        prompts = Corpus(entry / "prompts")
        d.close()
    tokens = sum(len(prompts[i]) for i in range(0, len(prompts), 97))  # a sample of them read, as a round does
    print(json.dumps({"seconds": time.perf_counter() - start, "prompts": len(prompts), "sampled_tokens": tokens}))


def bench_prompts(corpus: Path, work: Path):
    cache = work / "prompt-cache"
    shutil.rmtree(cache, ignore_errors=True)
    print(f"PPO's prompts from {corpus.name}: each line a process of its own")
    print(f"{'':<34} {'s':>7} {'prompts':>9} {'peak RSS MiB':>13}")
    for name, how in (
        ("before: lists on every rank", "lists"),
        ("after: rendered into the cache", "cache"),
        ("after: a rerun maps the cache", "cache"),
    ):
        out = work / "prompts-child.json"
        with open(out, "w") as f:
            pid = subprocess.Popen(
                [sys.executable, __file__, "--child", how, "--keep", str(work), "--corpus", str(corpus)],
                cwd=ROOT,
                stdout=f,
            ).pid
            _, status, usage = os.wait4(pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"the {how} child exited with {os.waitstatus_to_exitcode(status)}")
        line = json.loads(out.read_text().splitlines()[-1])
        print(f"{name:<34} {line['seconds']:7.1f} {line['prompts']:9,} {usage.ru_maxrss / 1024:13,.0f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=226_042)
    p.add_argument("--tokens", type=int, default=1024, help="tokens a conversation, about")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--keep", type=Path, help="write (or reuse) the corpus and the runs here")
    p.add_argument(
        "--repo", type=Path, default=ROOT, help="the checkout whose train_sft.py runs (an older one: before)"
    )
    p.add_argument("--prompts", action="store_true", help="PPO's prompts instead (see above)")
    p.add_argument("--child", choices=["lists", "cache"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return prompts_child(args.child, args.corpus, args.keep / "prompt-cache")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_sft_data-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, val = work / f"synthetic-{args.conversations}-{args.tokens}.jsonl", work / f"val-{args.tokens}.jsonl"
    if not corpus.is_file():
        from training import train_tiny_tokenizer

        train_tiny_tokenizer(work / "tokenizer.model")
        chars = chars_for(args.tokens, work / "tokenizer.model")
        t = time.perf_counter()
        write_corpus(corpus.with_suffix(".tmp"), args.conversations, chars)
        corpus.with_suffix(".tmp").rename(corpus)
        write_corpus(val, 64, chars, seed=2)  # validation from a file of its own, as the paper's run
        print(
            f"wrote {corpus} ({corpus.stat().st_size / 2**20:,.0f} MiB, {chars} characters a conversation) "
            f"in {time.perf_counter() - t:.0f} s"
        )
    if args.prompts:
        return bench_prompts(corpus, work)
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
        if args.nproc > 1
        else [sys.executable]
    )
    out = work / f"run-{args.nproc}"
    cmd = [
        *launch,
        "train_sft.py",
        "--model",
        "tiny",
        "--data",
        str(corpus),
        "--val-data",
        str(val),
        "--out",
        str(out),
        "--max-steps",
        "1",
        "--batch-size",
        str(8 * args.nproc),
        "--max-len",
        "2048",
        "--overwrite",
    ]
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"{args.repo}/train_sft.py --model tiny --max-steps 1 on {args.conversations:,} conversations, "
        f"{args.nproc} rank(s), {os.cpu_count()} CPUs"
    )
    print(f"{'run':<8} {'s to step 1':>12} {'s in all':>9} {'peak RSS MiB (largest process)':>32}")
    for name in ("first", "rerun"):
        first, seconds, peak = run(cmd, args.repo, out / "metrics.jsonl")
        print(f"{name:<8} {first:12.1f} {seconds:9.1f} {peak:32,.0f}", flush=True)
        (out / "metrics.jsonl").unlink()


if __name__ == "__main__":
    main()

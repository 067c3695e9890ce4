"""Training throughput and memory of train_sft.py on the CPU: 1 rank vs 2 ranks, with and
without activation checkpointing, on the ~46M-parameter `bench-50m` config; then, on 2 ranks
with gradient accumulation, reduce-scattering gradients after every micro-batch (--grad-sync
every, the default) against once after the last (--grad-sync last).

Each configuration is a real train_sft.py run (FSDP2, gloo) of a few optimizer steps on the
shipped SFT data; the first step is skipped as warm-up and the median tokens/s of the others is
taken, with the peak resident memory per rank. The machine's cores are split evenly among the
ranks, so 1 and 2 ranks use the same hardware. Figures are printed as ratios against the
1-rank run without checkpointing, made in the same session.

    python bench/bench_sft.py [--steps 6] [--micro-batch-size 4]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, ac: bool, args, grad_sync: str = "every", micro_batch: int | None = None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    threads = max(1, (os.cpu_count() or 2) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    )
    data = sorted(str(f) for f in (ROOT / "data" / "sft").glob("*.jsonl"))
    cmd = launcher + [
        str(ROOT / "train_sft.py"),
        "--model",
        args.model,
        "--data",
        *data,
        "--out",
        str(out),
        "--batch-size",
        str(args.batch_size),
        "--micro-batch-size",
        str(micro_batch or args.micro_batch_size),
        "--grad-sync",
        grad_sync,
        "--max-steps",
        str(args.steps),
        "--lr",
        "1e-4",
        "--save-every",
        "100000",
        "--eval-every",
        "100000",
    ]
    if ac:
        cmd.append("--activation-checkpointing")
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "tokens_per_s" in r][1:]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in steps),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench-50m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    args = p.parse_args()
    rows = {}
    for nproc in (1, 2):
        for ac in (False, True):
            rows[(nproc, ac)] = run(nproc, ac, args)
    ref = rows[(1, False)]
    print(f"{args.model}, global batch {args.batch_size}, micro-batch {args.micro_batch_size}, CPU, fp32")
    print("ranks  checkpointing   tokens/s  (ratio)   peak GB per rank  (ratio)")
    for (nproc, ac), r in rows.items():
        print(
            f"{nproc:5d}  {'on ' if ac else 'off':>13s}  {r['tokens_per_s']:9.1f}  ({r['tokens_per_s'] / ref['tokens_per_s']:4.2f}x)"
            f"   {r['peak_mem_gb']:16.3f}  ({r['peak_mem_gb'] / ref['peak_mem_gb']:4.2f}x)"
        )
    # Accumulation: 2 ranks, micro-batch 1, so each rank runs batch/2 micro-batches a step.
    sync = {mode: run(2, False, args, grad_sync=mode, micro_batch=1) for mode in ("every", "last")}
    ref = sync["every"]
    print(f"2 ranks, micro-batch 1 ({args.batch_size // 2} micro-batches a step per rank)")
    print("--grad-sync   tokens/s  (ratio)   peak GB per rank  (ratio)")
    for mode, r in sync.items():
        print(
            f"{mode:>11s}  {r['tokens_per_s']:9.1f}  ({r['tokens_per_s'] / ref['tokens_per_s']:4.2f}x)"
            f"   {r['peak_mem_gb']:16.3f}  ({r['peak_mem_gb'] / ref['peak_mem_gb']:4.2f}x)"
        )


if __name__ == "__main__":
    main()

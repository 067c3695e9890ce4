"""Rank 0's host memory while a trainer loads its base model (issue 34 item 3), on one process.

A checkpoint of --params million parameters (random, fp32, a LLaMA of width 1,024) is written
in shard files of --shard-mb MB; a child process then loads it as a trainer does
(training.load_model, then shard_and_load on a one-process group), in one of two ways:

- by file: read_weights' groups scattered as they are read (distributed.load_sharded), the
  trainers' way now;
- whole: every group gathered into one state dict first, then scattered: the trainers' way
  before, when rank 0 held the whole model in fp32 (48.8 GiB at 13B).

Each child reports its peak resident memory above what it held before the load (sampled
from /proc/self/statm every 2 ms; mapped file pages count);
on one rank the sharded model itself is the whole model, so "by file" should add about one
file to it and "whole" the model once more. Ratios in the same session only.

    python bench/bench_load.py [--params 300] [--shard-mb 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from pretrained import save_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(path: str, whole: bool):
    import torch

    from training import load_model
    from distributed import init_distributed, shard_and_load

    torch.set_num_threads(1)
    d = init_distributed()
    model, read_weights, _ = load_model(path, Path(tempfile.mkdtemp()), d)
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():  # the resident set every 2 ms while the load runs (ru_maxrss keeps older peaks)
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    weights = read_weights()
    if whole:
        weights = {k: v for group in weights for k, v in group.items()}
    shard_and_load(model, weights, d, bf16=False)
    del weights
    done.set()
    sampler.join()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    d.close()
    print(json.dumps({"added_mb": peak[0] - before, "model_mb": model_bytes / 2**20}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=300, help="millions of parameters")
    p.add_argument("--shard-mb", type=float, default=100)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.whole)

    import torch

    from model import ModelConfig, Transformer
    from training import train_tiny_tokenizer

    layers = max(1, round((args.params * 1e6 - 2 * 32000 * 1024) / (12.6 * 1024 * 1024)))
    config = ModelConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.model"
        train_tiny_tokenizer(tok)
        with torch.device("meta"):
            model = Transformer(config)
        sd = {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items()}
        save_model(model, Path(tmp) / "ckpt", tokenizer=tok, state_dict=sd, max_shard_bytes=int(args.shard_mb * 2**20))
        del sd
        files = sorted((Path(tmp) / "ckpt").glob("*.safetensors"))
        largest = max(f.stat().st_size for f in files) / 2**20
        rows = {}
        for name, flag in (("by file", []), ("whole", ["--whole"])):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(Path(tmp) / "ckpt"), *flag],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            ).stdout
            rows[name] = json.loads(out.strip().splitlines()[-1])
    model_mb = rows["by file"]["model_mb"]
    print(
        f"{config.num_params() / 1e6:.0f}M parameters, {len(files)} files, the largest {largest:.0f} MiB; "
        f"the sharded model on one rank {model_mb:.0f} MiB"
    )
    for name, r in rows.items():
        print(
            f"  {name:8s} peak RSS added by the load: {r['added_mb']:.0f} MiB "
            f"(the model + {r['added_mb'] - model_mb:.0f} MiB)"
        )
    extra = [rows[n]["added_mb"] - model_mb for n in rows]
    print(f"  rank 0's memory beyond the model, by file / whole: {extra[0] / max(extra[1], 1):.2f}")


if __name__ == "__main__":
    main()

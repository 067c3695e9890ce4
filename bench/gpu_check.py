"""One command that settles on a real GPU what the CPU simulation predicts (issue 34 item 4).

docs/scale.md's figures come from plan.py: this code run on fake tensors over fake ranks,
memory tracked by FSDPMemTracker, and times from a FLOP and byte model at an assumed MFU and
bandwidth. No GPU has checked them. Given one, this runs, on one rank, a ~1.3B LLaMA (width
2,048, 24 blocks; --layers to change) in bf16 mixed precision, and prints one table:

- an SFT step (train_sft.train_step and AdamW, micro-batches of --micro-batch at --seq tokens):
  its real peak (torch.cuda.max_memory_allocated) against plan.simulate_training of the same
  step, and its MFU (plan.train_flops over the measured time, at --peak-tflops);
- a PPO round's parts (simulate.measure_ppo, the placement train_ppo.py uses): the real peak of the
  whole, against the simulation's largest part;
- a decoding step (generate.decode_steps, batch --decode-batch, bf16 weights): its time against
  the floor of reading every weight and the KV cache once at --hbm-tbps (costs.decode_step at
  full bandwidth).

On a GPU it takes a few minutes (the PPO simulation is the longest part). With --dry-run it runs
the same plumbing on the CPU with a tiny config, where "real" is FSDPMemTracker on real
tensors (a CPU has no allocator peak) and the times are the CPU's; a test runs that.

    python bench/gpu_check.py [--peak-tflops 989 --hbm-tbps 4.8]   # e.g. an H200's datasheet figures
    python bench/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import costs  # noqa: E402

import simulate  # noqa: E402

import plan  # noqa: E402
import train_ppo  # noqa: E402
import train_sft  # noqa: E402
from model import CONFIGS, ModelConfig  # noqa: E402

GIB = 2**30
# The sizes of each part: (on a GPU, with --dry-run on the CPU, what it is).
SIZES = {
    "seq": (2048, 64, "SFT sequence length"),
    "micro_batch": (1, 1, "SFT micro-batch"),
    "repeats": (5, 2, "timed SFT steps (the median is kept)"),
    "ppo_prompt": (512, 16, "PPO prompt tokens"),
    "ppo_new_tokens": (512, 8, "PPO response tokens"),
    "decode_batch": (8, 2, "decoding batch"),
    "decode_prompt": (512, 16, "decoding prompt tokens"),
    "decode_tokens": (64, 8, "timed decoding steps"),
}


def config_for(args) -> ModelConfig:
    if args.dry_run:  # the tiny config's layout at a tenth of its width: the plumbing, in seconds
        return replace(
            CONFIGS["tiny"],
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    return ModelConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
    )


def sft_step(args, config, d, mesh):
    """(the real peak in bytes, seconds a step, FLOPs a step) of train_sft.train_step + AdamW."""
    from training import make_optimizer
    from distributed import shard

    bf16 = d.device.type == "cuda"
    with torch.device("meta"):
        model = simulate.lm_model(config, "sft", args.activation_checkpointing)
    shard(model, model.layers, bf16=bf16, mesh=mesh)
    model.to_empty(device=d.device)
    simulate.fill_(model)
    model.train()
    opt = make_optimizer(model, 1e-5, 0.1)
    step_fn = simulate.lm_step("sft", args.seq, train_sft.train_step)
    n = 2 * args.micro_batch  # two micro-batches a step, as simulate.measure_training runs it

    def step():
        step_fn(model, d, n, micro_batch=args.micro_batch, grad_clip=1.0, grad_sync="every")
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # Adam's state made, as every step but the first finds it
    if d.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with simulate.tracking(model, opt) as m:
            step()
        peak = m.total
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    flops = plan.train_flops(config, n * args.seq, args.seq, args.activation_checkpointing)
    return peak, sorted(times)[len(times) // 2], flops


def ppo_kwargs(args):
    """A small round, the same for the simulation and the real run: 8 experiences in chunks and
    minibatches of 4 (4 in 2s on the CPU). The paper's, 64 in chunks of 8 on 8 ranks, is what
    `train_ppo.py --dry-run --simulate` simulates; this checks the simulation, not that round."""
    size = 2 if args.dry_run else 4
    return dict(
        trainable_blocks=2,
        rollout_size=2 * size,
        chunk_size=size,
        score_batch_size=size,
        bottom_batch_size=size,
        batch_size=size,
        micro_batches=[1],
        prompt_len=args.ppo_prompt,
        new_tokens=args.ppo_new_tokens,
        bf16=not args.dry_run,
    )


def decode(args, config, device):
    """(seconds a decoding step, its floor in seconds): the step's time per token after the
    prefill, and every weight (bf16) and the KV cache read once at --hbm-tbps."""
    from generate import decode_steps
    from model import Transformer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Transformer.from_config(config, seed=0).to(device=device, dtype=dtype).eval()
    prompts = [[1] + [3] * (args.decode_prompt - 1)] * args.decode_batch

    def step_seconds() -> float:
        """Seconds a step after the prefill and the first token, timed from then (never the
        difference of two runs, which a busy machine can make negative)."""
        with torch.no_grad():
            steps = decode_steps(model, prompts, max_new_tokens=1 + args.decode_tokens, eos_id=None, temperature=0)
            next(steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, n = time.perf_counter(), sum(1 for _ in steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    step_seconds()  # warm-up
    step = statistics.median(step_seconds() for _ in range(3))
    weight_bytes = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    floor = costs.decode_step(
        config,
        args.decode_batch,
        args.decode_prompt + args.decode_tokens // 2,
        weight_bytes=weight_bytes,
        hbm_tbps=args.hbm_tbps,
        mbu=1.0,
        mfu=1.0,
        peak_tflops=args.peak_tflops,
    )["seconds"]
    return step, floor


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same plumbing on the CPU, a tiny config")
    p.add_argument("--layers", type=int, default=24, help="blocks of the ~1.3B config (width 2,048)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=plan.PEAK_TFLOPS, help="the GPU's dense bf16 peak")
    p.add_argument("--hbm-tbps", type=float, default=plan.HBM_TBPS, help="the GPU's memory bandwidth, TB/s")
    for name, (gpu, dry, what) in SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"{what} (default: {gpu}; --dry-run: {dry})")
    args = p.parse_args(argv)
    for name, (gpu, dry, _) in SIZES.items():
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
        setattr(args, name, value or (dry if args.dry_run else gpu))
    if args.layers < 3 or not (args.peak_tflops > 0 and args.hbm_tbps > 0):
        raise SystemExit("--layers must be at least 3 (PPO trains the top 2), --peak-tflops and --hbm-tbps positive")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run it with --dry-run, or on a machine with one")
    config = config_for(args)
    context = config.max_position_embeddings
    if max(args.seq, args.ppo_prompt + args.ppo_new_tokens, args.decode_prompt + args.decode_tokens) > context:
        raise SystemExit(
            f"--seq, --ppo-prompt + --ppo-new-tokens and --decode-prompt + --decode-tokens must fit the "
            f"model's context of {context}"
        )
    bf16 = not args.dry_run

    # 1. The simulations first: they make a fake process group, and the real run a real one.
    sim_sft = plan.simulate_training(
        lambda: simulate.lm_model(config, "sft", args.activation_checkpointing),
        simulate.lm_step("sft", args.seq, train_sft.train_step),
        world=1,
        micro_batch=args.micro_batch,
        bf16=bf16,
    )
    sim_ppo = plan.simulate_ppo(config, train_ppo.plan_parts(), world=1, **ppo_kwargs(args))

    # 2. The same on real tensors, one rank.
    from distributed import device_mesh, init_distributed

    d = init_distributed()
    try:
        mesh = device_mesh(d.device.type, 1)
        sft_peak, sft_s, sft_flops = sft_step(args, config, d, mesh)
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        real_ppo = simulate.measure_ppo(d, mesh, config, train_ppo.plan_parts(), **ppo_kwargs(args))
        ppo_peak = (
            torch.cuda.max_memory_allocated() if d.device.type == "cuda" else max(m.total for m in real_ppo.values())
        )
        step_s, floor_s = decode(args, config, d.device)
    finally:
        d.close()

    sim_ppo_peak = max(m.total for m in sim_ppo.values())
    mfu = sft_flops / sft_s / (args.peak_tflops * 1e12)
    where = "CPU, tracked on real tensors" if args.dry_run else torch.cuda.get_device_name()
    print(
        f"{config.num_params() / 1e9:.2f}B parameters ({'a tiny config, --dry-run' if args.dry_run else 'bf16 mixed'}), "
        f"one rank on {where}"
    )
    rows = [
        ("SFT step peak, GiB", sft_peak / GIB, sim_sft.total / GIB, sft_peak / sim_sft.total),
        ("PPO round peak, GiB", ppo_peak / GIB, sim_ppo_peak / GIB, ppo_peak / sim_ppo_peak),
        ("SFT step MFU", mfu, plan.MFU, mfu / plan.MFU),
        ("decode step, ms", step_s * 1e3, floor_s * 1e3, step_s / floor_s),
    ]
    print("| | measured | plan.py (simulated peak; assumed MFU; the HBM floor) | ratio |")
    print("|---|---|---|---|")
    for name, real, model, ratio in rows:
        if not all(math.isfinite(x) for x in (real, model, ratio)):
            raise SystemExit(f"{name}: not a finite figure ({real}, {model})")
        print(f"| {name} | {real:.4g} | {model:.4g} | {ratio:.3f} |")
    print(
        f"(SFT: micro-batch {args.micro_batch} x 2 of {args.seq} tokens, {sft_s:.3f} s a step at {args.peak_tflops:g} "
        f"TFLOPS peak; decode: batch {args.decode_batch}, {args.decode_prompt}-token prompts, at {args.hbm_tbps:g} TB/s)"
    )


if __name__ == "__main__":
    main()

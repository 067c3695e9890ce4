"""Choosing a layout for plan.py's dry runs (--gpu-memory-gb): the candidates (micro-batch
size, activation checkpointing, gradient sync, sharding; PPO's chunk, rollout placement and
reward placement) ranked by the time model (costs.py), pruned by the memory model, and
simulated in that order (simulate.py) until one fits: the fastest layout that fits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator


from costs import (
    GIB,
    GPUS_PER_NODE,
    HBM_TBPS,
    MFU,
    Network,
    PEAK_TFLOPS,
    ppo_memory,
    ppo_round_seconds,
    training_memory,
    training_step_seconds,
    hours,
    size,
)
from simulate import PPOParts, lm_model, lm_step, simulate_ppo, simulate_training


# -- choosing a layout -----------------------------------------------------------------------------------------

# What the dry run's choice leaves of a GPU's memory for what no simulation sees: the CUDA
# context, NCCL's buffers, cuBLAS's workspace, the caching allocator's fragmentation (the module
# docstring's 10-15%).
HEADROOM = 0.12
# The memory model is held within 10% of the simulation by tests: a layout it puts further than
# that above the usable memory cannot fit, and is not simulated.
MODEL_SLACK = 0.10


def usable_bytes(gpu_gb: float) -> float:
    """What a layout may hold on a GPU of gpu_gb GiB: all but HEADROOM."""
    return gpu_gb * (1 - HEADROOM) * GIB


# The flags a layout sets; their defaults are the trainer's own, read from its parser
# (plan.layout_defaults) and handed to choose_lm / choose_ppo.
LAYOUT_FLAGS = (
    "--micro-batch-size",
    "--activation-checkpointing",
    "--grad-sync",
    "--shard-ranks",
    "--chunk-size",
    "--reshard-in-rollout",
    "--reward-placement",
    "--frozen-bf16",
)


@dataclass
class Candidate:
    """A layout the dry run may choose: the value of each flag it sets (False for a switch off,
    None for --shard-ranks over all ranks), the run's seconds by the time model, the memory
    model's bytes, the trainer's defaults of those flags, and once simulated the peak a rank
    holds."""

    flags: dict
    seconds: float
    modelled: float
    defaults: dict
    simulated: float | None = None
    measured: dict | None = None  # the simulation's parts (PPO: simulate_ppo's), for the tables after

    def changed(self) -> dict:
        return {k: v for k, v in self.flags.items() if v != self.defaults[k]}

    def command_flags(self) -> str:
        return " ".join(k if v is True else f"{k} {v}" for k, v in self.changed().items())


def choose(candidates: list[Candidate], usable: float, simulate, *, slack: float = MODEL_SLACK) -> list[Candidate]:
    """The candidates ranked by the time model (then by fewer flags), each marked: those the
    memory model puts above usable x (1 + slack) are pruned unsimulated; the rest are simulated
    in that order (simulate(candidate) -> bytes) until one fits `usable`. Returns the ranking up
    to and including the chosen one, the last (its .simulated <= usable), or the whole ranking
    when nothing fits."""
    ranked = sorted(candidates, key=lambda c: (round(c.seconds, 6), len(c.changed())))
    for i, c in enumerate(ranked):
        if c.modelled > usable * (1 + slack):
            continue
        c.simulated = simulate(c)
        if c.simulated <= usable:
            return ranked[: i + 1]
    return ranked


def torchrun(world: int, script: str) -> str:
    """How to start `script` on `world` GPUs, GPUS_PER_NODE a node."""
    if world == 1:
        return f"python {script}"
    if world <= GPUS_PER_NODE:
        return f"torchrun --nproc-per-node {world} {script}"
    return (
        f"torchrun --nnodes {world // GPUS_PER_NODE} --nproc-per-node {GPUS_PER_NODE} --rdzv-backend c10d "
        f"--rdzv-endpoint HOST:29500 {script}"
    )


def print_choice(ranked: list[Candidate], *, gpu_gb: float, world: int, command: str, log=print):
    """The dry run's answer, above its tables: the fastest layout that fits, and why each faster
    one did not."""
    usable = usable_bytes(gpu_gb)
    if not ranked:
        log(f"no layout: --batch-size is not a multiple of --micro-batch-size x {world} ranks for any micro-batch")
        return None
    chosen = ranked[-1] if ranked and ranked[-1].simulated is not None and ranked[-1].simulated <= usable else None
    log(
        f"the fastest layout that fits {gpu_gb:g} GiB ({size(usable)} usable, {HEADROOM:.0%} headroom) on {world} "
        f"GPU(s), by the time model's hours, the memory model pruning and the simulation deciding:"
    )
    for c in ranked if chosen is None else ranked[:-1]:
        why = (
            f"simulated {size(c.simulated)}" if c.simulated is not None else f"the memory model says {size(c.modelled)}"
        )
        log(f"  not {c.command_flags() or '(the defaults)'}: {hours(c.seconds)}, {why}")
    if chosen is None:
        log(f"  nothing fits {gpu_gb:g} GiB on {world} GPU(s)")
        return None
    log(
        f"  chosen: {chosen.command_flags() or '(the defaults)'}: {hours(chosen.seconds)}, simulated "
        f"{size(chosen.simulated)} (the memory model {size(chosen.modelled)})"
    )
    log(f"  {torchrun(world, command)} {chosen.command_flags()}".rstrip())
    return chosen


def layouts(choices: dict[str, list]) -> Iterator[dict]:
    """Every layout of `choices` (a flag -> the values tried), as the flags that set it: each
    combination once, the last flag's values varying fastest."""
    for values in itertools.product(*choices.values()):
        yield dict(zip(choices, values))


def shard_choices(world: int) -> list[int | None]:
    """FSDP over all ranks, and on more than one node HSDP with a node's GPUs a shard group."""
    return [None] + ([GPUS_PER_NODE] if world > GPUS_PER_NODE and world % GPUS_PER_NODE == 0 else [])


def choose_lm(
    config,
    kind: str,
    train_step: Callable,
    *,
    world: int,
    gpu_gb: float,
    batch: int,
    seq: int,
    steps: int,
    mean_tokens: int,
    defaults: dict,
    bf16: bool = True,
    net_args: dict | None = None,
    peak_tflops: float = PEAK_TFLOPS,
    mfu: float = MFU,
    micros=(1, 2, 4, 8, 16),
    shards: list | None = None,
) -> list[Candidate]:
    """choose() for SFT (kind "sft") or the reward model ("rm", items are pairs): a run of
    `steps` steps of `batch` items on `world` GPUs, memory at the longest sequence (`seq`
    tokens), time at `mean_tokens` an item (--plan-tokens-per-item), over micro-batch size,
    activation checkpointing, --grad-sync and (more than a node) --shard-ranks (or only `shards`).
    `defaults`: the trainer's own values of those flags (plan.layout_defaults)."""
    per_item = 2 if kind == "rm" else 1
    choices = {
        "--micro-batch-size": [m for m in micros if batch % (world * m) == 0],
        "--activation-checkpointing": (False, True),
        "--grad-sync": ("every", "last"),
        "--shard-ranks": shard_choices(world) if shards is None else shards,
    }
    candidates = []
    for flags in layouts(choices):
        micro, ac, sync, shard = flags.values()
        # What the time and the memory model share: the layout, and a micro-batch of sequences.
        layout = dict(world=world, micro_batch=micro * per_item, bf16=bf16, activation_checkpointing=ac, grad_sync=sync)
        t = training_step_seconds(
            config,
            batch=batch * per_item,
            seq_len=mean_tokens,
            head=kind == "sft",
            net=Network(world, shard, **(net_args or {})),
            peak_tflops=peak_tflops,
            mfu=mfu,
            **layout,
        )
        m = training_memory(config, seq_len=seq, logits=kind == "sft", shard=shard, **layout)
        candidates.append(Candidate(flags, steps * t["seconds"], m["total"] * GIB, defaults))

    def simulate(c):
        f = c.flags
        return simulate_training(
            lambda: lm_model(config, kind, f["--activation-checkpointing"]),
            lm_step(kind, seq, train_step),
            world=world,
            shard=f["--shard-ranks"],
            micro_batch=f["--micro-batch-size"],
            bf16=bf16,
            grad_sync=f["--grad-sync"],
        ).total

    return choose(candidates, usable_bytes(gpu_gb), simulate)


def choose_ppo(
    config,
    parts: PPOParts,
    *,
    world: int,
    gpu_gb: float,
    rounds: int,
    rollout_size: int,
    batch_size: int,
    ppo_epochs: int,
    prompt_len: int,
    new_tokens: int,
    trainable_blocks: int,
    score_batch_size: int,
    bottom_batch_size: int,
    defaults: dict,
    net_args: dict | None = None,
    peak_tflops: float = PEAK_TFLOPS,
    mfu: float = MFU,
    hbm_tbps: float = HBM_TBPS,
    chunks=(8, 4, 2, 1),
) -> list[Candidate]:
    """choose() for PPO: `rounds` rounds on `world` GPUs, over the micro-batch size, the chunk
    size, --reshard-in-rollout, --reward-placement, --frozen-bf16 and (more than a node)
    --shard-ranks. The chunk sizes tried are the default (8) and smaller: a smaller chunk holds
    a smaller KV cache and decodes more steps."""
    shape = dict(prompt_len=prompt_len, new_tokens=new_tokens, trainable_blocks=trainable_blocks)
    choices = {
        "--micro-batch-size": [m for m in (1, 2, 4, 8, 16) if batch_size % (world * m) == 0],
        "--chunk-size": [c for c in chunks if c <= rollout_size // world],
        "--reshard-in-rollout": (False, True),
        "--reward-placement": ("sharded", "replicated"),
        "--frozen-bf16": (False, True),
        "--shard-ranks": shard_choices(world),
    }
    candidates = []
    for flags in layouts(choices):
        micro, chunk, shard = flags["--micro-batch-size"], flags["--chunk-size"], flags["--shard-ranks"]
        gathered, reward_sharded = not flags["--reshard-in-rollout"], flags["--reward-placement"] == "sharded"
        t = ppo_round_seconds(
            config,
            world=world,
            rollout_size=rollout_size,
            chunk_size=chunk,
            score_batch_size=score_batch_size,
            batch_size=batch_size,
            ppo_epochs=ppo_epochs,
            micro_batch=micro,
            gathered_rollout=gathered,
            reward_sharded=reward_sharded,
            net=Network(world, shard, **(net_args or {})),
            peak_tflops=peak_tflops,
            mfu=mfu,
            hbm_tbps=hbm_tbps,
            **shape,
        )
        m = ppo_memory(
            config,
            world=world,
            chunk=chunk,
            micro_batch=micro,
            gathered_rollout=gathered,
            reward_sharded=reward_sharded,
            frozen_bf16=flags["--frozen-bf16"],
            shard=shard,
            **shape,
        )
        candidates.append(Candidate(flags, rounds * t["total"], m["total"] * GIB, defaults))

    def simulate(c):
        f = c.flags
        sim = simulate_ppo(
            config,
            parts,
            world=world,
            shard=f["--shard-ranks"],
            rollout_size=rollout_size,
            chunk_size=f["--chunk-size"],
            score_batch_size=score_batch_size,
            bottom_batch_size=bottom_batch_size,
            batch_size=batch_size,
            micro_batches=[f["--micro-batch-size"]],
            gathered_rollout=not f["--reshard-in-rollout"],
            reward_sharded=f["--reward-placement"] == "sharded",
            frozen_bf16=f["--frozen-bf16"],
            **shape,
        )
        c.measured = sim  # the dry run's tables show the chosen one's parts without simulating it again
        return max(m.total for m in sim.values())

    return choose(candidates, usable_bytes(gpu_gb), simulate)
